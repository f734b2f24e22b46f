//! Evaluating a rule's condition against one reading.
//!
//! Owns the variables a condition sees (the reading's fields, `agg.NAME`, `device`,
//! `stream`, `topic`) and the choice between the native fast path and the CEL interpreter.
//! Input: a reading, the rule's aggregates. Output: `Some(bool)`, or `None` when the
//! condition cannot be evaluated (missing field, wrong type, not a boolean).
//!
//! Invariants:
//! - The fast path and CEL agree (see `fast`); CEL runs only when the fast path cannot decide.
//! - Nothing here allocates on the fast path except the aggregates list of rules that have
//!   aggregates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::common::value::CowVal;
use cel::context::VariableResolver;

use super::fast::{Outcome, AGG_VAR};
use super::rule::Rule;
use super::state::Instance;
use crate::reading::{Millis, Reading, Value};

/// Pushes the reading's fields into the rule's windows; returns the aggregates with a value.
pub(super) fn update_windows<'r>(
    rule: &'r Rule,
    inst: &mut Instance,
    reading: &Reading,
    now: Millis,
) -> Vec<(&'r str, f64)> {
    if rule.aggregates.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(rule.aggregates.len());
    for (agg, window) in rule.aggregates.iter().zip(inst.windows.iter_mut()) {
        if let Some(v) = reading.fields.get(&agg.field).and_then(Value::as_f64) {
            window.push(now, v, agg.window, agg.func);
        }
        if let Some(v) = window.value(agg.func) {
            out.push((agg.name.as_str(), v));
        }
    }
    out
}

/// Sets `values` to what an event shows of `reading`: its fields, and `agg.NAME` for each
/// aggregate (over a field of that name). In place, keeping the keys it has: a device
/// that sends the same fields each time costs no allocation for its numbers and
/// booleans. An absence rule does this for every reading it sees.
pub(super) fn set_values(
    values: &mut BTreeMap<String, Value>,
    reading: &Reading,
    aggs: &[(&str, f64)],
) {
    // The usual case, the same fields as last time and no aggregates: one walk of both
    // sorted maps, one comparison per key.
    if aggs.is_empty()
        && values.len() == reading.fields.len()
        && values.keys().eq(reading.fields.keys())
    {
        for (slot, value) in values.values_mut().zip(reading.fields.values()) {
            slot.clone_from(value);
        }
        return;
    }
    let is_agg = |key: &str| {
        let name = key.strip_prefix(AGG_VAR).and_then(|k| k.strip_prefix('.'));
        name.is_some_and(|name| aggs.iter().any(|(a, _)| *a == name))
    };
    values.retain(|key, _| reading.fields.contains_key(key) || is_agg(key));
    for (key, value) in &reading.fields {
        put(values, key, value);
    }
    let mut key = String::new();
    for (name, v) in aggs {
        key.clear();
        key.push_str(AGG_VAR);
        key.push('.');
        key.push_str(name);
        put(values, &key, &Value::Number(*v));
    }
}

/// Sets `key` to `value`, allocating the key only when it is new.
fn put(values: &mut BTreeMap<String, Value>, key: &str, value: &Value) {
    match values.get_mut(key) {
        Some(slot) => slot.clone_from(value),
        None => {
            values.insert(key.to_owned(), value.clone());
        }
    }
}

/// Evaluates a condition to a boolean; `None` when it errors or is not boolean.
pub(super) fn eval(env: &Arc<cel::Env>, expr: &super::rule::Expr, vars: &Vars<'_>) -> Option<bool> {
    if let Some(fast) = &expr.fast {
        match fast.eval(&vars.reading.fields, vars.aggs) {
            Outcome::Bool(b) => return Some(b),
            Outcome::Error => return None,
            Outcome::Fallback => {}
        }
    }
    eval_cel(env, expr, vars)
}

/// Evaluates with the CEL interpreter only.
pub(super) fn eval_cel(
    env: &Arc<cel::Env>,
    expr: &super::rule::Expr,
    vars: &Vars<'_>,
) -> Option<bool> {
    let mut ctx = cel::Context::with_env(Arc::clone(env));
    ctx.set_variable_resolver(vars);
    match expr.program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => Some(b),
        _ => None,
    }
}

/// The variables a condition sees: the reading's fields by name, `agg.NAME`, and
/// `device`, `stream`, `topic` (unless a field has that name).
pub(super) struct Vars<'a> {
    pub reading: &'a Reading,
    pub aggs: &'a [(&'a str, f64)],
}

impl VariableResolver for Vars<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let value = match self.reading.fields.get(name) {
            Some(Value::Number(n)) => cel::Value::Float(*n),
            Some(Value::Bool(b)) => cel::Value::Bool(*b),
            Some(Value::Text(s)) => cel::Value::String(Arc::new(s.clone())),
            None => match name {
                AGG_VAR => {
                    let map: HashMap<String, f64> =
                        self.aggs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
                    cel::Value::from(map)
                }
                "device" => cel::Value::String(Arc::new(self.reading.device.clone())),
                "stream" => cel::Value::String(Arc::new(self.reading.stream.clone())),
                "topic" => cel::Value::String(Arc::new(self.reading.topic.clone())),
                _ => return None,
            },
        };
        value.try_into().ok().map(CowVal::Owned)
    }
}

/// Both evaluation paths for one expression, for the differential test of the fast path:
/// (fast result if it did not fall back, CEL result).
#[cfg(test)]
pub(super) fn eval_both(
    env: &Arc<cel::Env>,
    expr: &super::rule::Expr,
    reading: &Reading,
    aggs: &[(&str, f64)],
) -> (Option<Option<bool>>, Option<bool>) {
    let vars = Vars { reading, aggs };
    let fast = expr
        .fast
        .as_ref()
        .and_then(|f| match f.eval(&reading.fields, aggs) {
            Outcome::Bool(b) => Some(Some(b)),
            Outcome::Error => Some(None),
            Outcome::Fallback => None,
        });
    (fast, eval_cel(env, expr, &vars))
}
