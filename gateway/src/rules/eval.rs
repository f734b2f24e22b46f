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

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::value::CowVal;
use cel::context::VariableResolver;

use super::fast::{Outcome, AGG_VAR};
use super::rule::Rule;
use super::state::{Instance, Values};
use crate::reading::{Millis, Reading, Value};

/// A rule's aggregates over its windows, by name: inline for up to four (no allocation
/// per reading for the usual rule).
pub(super) type Aggregates<'r> = smallvec::SmallVec<[(&'r str, f64); 4]>;

/// Pushes the reading's fields into the rule's windows; returns the aggregates with a value.
pub(super) fn update_windows<'r>(
    rule: &'r Rule,
    inst: &mut Instance,
    reading: &Reading,
    now: Millis,
) -> Aggregates<'r> {
    let mut out = Aggregates::new();
    for (agg, window) in rule.aggregates.iter().zip(inst.windows.iter_mut()) {
        if let Some(v) = reading.fields.get(&agg.field).and_then(Value::as_f64) {
            window.push(now, v, agg.window, agg.func);
        }
        if window.span() < agg.min_span {
            continue;
        }
        if let Some(v) = window.value(agg.func) {
            out.push((agg.name.as_str(), v));
        }
    }
    out
}

/// Sets `values` to what an event shows of `reading`: its fields, and `agg.NAME` for each
/// aggregate (over a field of that name). In place when the keys are those it has: a
/// device that sends the same fields each time costs no allocation for its numbers and
/// booleans. An absence rule does this for every reading it sees.
pub(super) fn set_values(values: &mut Values, reading: &Reading, aggs: &[(&str, f64)]) {
    // The usual case, the same fields as last time and no aggregates: one walk of both
    // sorted key lists.
    if aggs.is_empty() && values.overwrite(&reading.fields) {
        return;
    }
    let agg_keys: Vec<(String, f64)> = (aggs.iter())
        .map(|(name, v)| (format!("{AGG_VAR}.{name}"), *v))
        .collect();
    // A field named like an aggregate is shadowed by the aggregate.
    let fields = (reading.fields.iter())
        .filter(|(key, _)| !agg_keys.iter().any(|(a, _)| a == *key))
        .map(|(key, value)| (key.as_str(), value.clone()));
    let mut entries: Vec<(&str, Value)> = fields
        .chain(
            agg_keys
                .iter()
                .map(|(key, v)| (key.as_str(), Value::Number(*v))),
        )
        .collect();
    // Without repeats: the shadowed fields are out, and a rule's aggregate names are
    // unique (`load` refuses a name declared twice).
    entries.sort_by(|a, b| a.0.cmp(b.0));
    values.replace(entries.into_iter());
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
