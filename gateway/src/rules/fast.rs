//! A native fast path for the common shape of conditions: numeric comparisons of fields,
//! aggregates and number literals, joined by `&&`, `||`, `!`, and `has(agg.NAME)`.
//!
//! Owns [`Fast`], compiled from a CEL AST at load when the whole expression has that shape.
//! Input: the reading's fields and the rule's aggregate values. Output: the same boolean (or
//! error) the CEL interpreter gives, without its per-evaluation allocations.
//!
//! Invariants:
//! - Same result as CEL, or [`Outcome::Fallback`]: whenever an operand is not a number
//!   (a text or boolean field, `device`, a field named `agg`...), the caller evaluates the
//!   expression with CEL instead. The differential test in this module checks it.
//! - `&&` / `||` follow CEL's commutative error rules: `false && error` is false,
//!   `true || error` is true, either order.

use cel::common::ast::{Expr as Ast, IdedExpr, LiteralValue};
use std::collections::BTreeMap;

use crate::reading::Value;

/// The CEL variable aggregates are read from: `agg.NAME`.
pub const AGG_VAR: &str = "agg";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug)]
pub enum Operand {
    Field(String),
    Agg(String),
    Num(f64),
}

/// A condition compiled to native code.
#[derive(Debug)]
pub enum Fast {
    Lit(bool),
    Cmp(Operand, CmpOp, Operand),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
    HasAgg(String),
}

/// The result of a fast evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Bool(bool),
    /// CEL would fail (missing field, missing aggregate).
    Error,
    /// An operand is outside the fast path: evaluate with CEL.
    Fallback,
}

/// Compiles the expression if all of it is in the fast path's shape.
pub fn compile(e: &IdedExpr) -> Option<Fast> {
    match &e.expr {
        Ast::Literal(LiteralValue::Boolean(b)) => Some(Fast::Lit(*b.inner())),
        Ast::Select(sel) if sel.test => match &sel.operand.expr {
            Ast::Ident(n) if n == AGG_VAR => Some(Fast::HasAgg(sel.field.clone())),
            _ => None,
        },
        Ast::Call(call) if call.target.is_none() => {
            let args = &call.args;
            match (call.func_name.as_str(), args.len()) {
                ("_&&_", 2) => Some(Fast::And(
                    Box::new(compile(&args[0])?),
                    Box::new(compile(&args[1])?),
                )),
                ("_||_", 2) => Some(Fast::Or(
                    Box::new(compile(&args[0])?),
                    Box::new(compile(&args[1])?),
                )),
                ("!_", 1) => Some(Fast::Not(Box::new(compile(&args[0])?))),
                (name, 2) => {
                    let op = match name {
                        "_<_" => CmpOp::Lt,
                        "_<=_" => CmpOp::Le,
                        "_>_" => CmpOp::Gt,
                        "_>=_" => CmpOp::Ge,
                        "_==_" => CmpOp::Eq,
                        "_!=_" => CmpOp::Ne,
                        _ => return None,
                    };
                    Some(Fast::Cmp(operand(&args[0])?, op, operand(&args[1])?))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn operand(e: &IdedExpr) -> Option<Operand> {
    match &e.expr {
        Ast::Literal(LiteralValue::Double(d)) => Some(Operand::Num(*d.inner())),
        Ast::Literal(LiteralValue::Int(i)) => Some(Operand::Num(*i.inner() as f64)),
        Ast::Literal(LiteralValue::UInt(u)) => Some(Operand::Num(*u.inner() as f64)),
        Ast::Ident(name) if name != AGG_VAR => Some(Operand::Field(name.clone())),
        Ast::Select(sel) if !sel.test => match &sel.operand.expr {
            Ast::Ident(n) if n == AGG_VAR => Some(Operand::Agg(sel.field.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// What an operand resolves to.
enum Resolved {
    Num(f64),
    Error,
    Fallback,
}

impl Fast {
    pub fn eval(&self, fields: &BTreeMap<String, Value>, aggs: &[(&str, f64)]) -> Outcome {
        match self {
            Fast::Lit(b) => Outcome::Bool(*b),
            Fast::HasAgg(name) => {
                if fields.contains_key(AGG_VAR) {
                    return Outcome::Fallback;
                }
                Outcome::Bool(aggs.iter().any(|(n, _)| *n == name.as_str()))
            }
            Fast::Not(inner) => match inner.eval(fields, aggs) {
                Outcome::Bool(b) => Outcome::Bool(!b),
                other => other,
            },
            Fast::And(a, b) => logical(a, b, false, fields, aggs),
            Fast::Or(a, b) => logical(a, b, true, fields, aggs),
            Fast::Cmp(l, op, r) => {
                let (l, r) = match (resolve(l, fields, aggs), resolve(r, fields, aggs)) {
                    (Resolved::Fallback, _) | (_, Resolved::Fallback) => return Outcome::Fallback,
                    (Resolved::Num(l), Resolved::Num(r)) => (l, r),
                    _ => return Outcome::Error,
                };
                Outcome::Bool(match op {
                    CmpOp::Lt => l < r,
                    CmpOp::Le => l <= r,
                    CmpOp::Gt => l > r,
                    CmpOp::Ge => l >= r,
                    CmpOp::Eq => l == r,
                    CmpOp::Ne => l != r,
                })
            }
        }
    }
}

/// `&&` (short = false) or `||` (short = true) with CEL's commutative error handling.
fn logical(
    a: &Fast,
    b: &Fast,
    short: bool,
    fields: &BTreeMap<String, Value>,
    aggs: &[(&str, f64)],
) -> Outcome {
    match a.eval(fields, aggs) {
        Outcome::Fallback => Outcome::Fallback,
        Outcome::Bool(x) if x == short => Outcome::Bool(short),
        Outcome::Bool(_) => b.eval(fields, aggs),
        Outcome::Error => match b.eval(fields, aggs) {
            Outcome::Bool(y) if y == short => Outcome::Bool(short),
            Outcome::Fallback => Outcome::Fallback,
            _ => Outcome::Error,
        },
    }
}

fn resolve(o: &Operand, fields: &BTreeMap<String, Value>, aggs: &[(&str, f64)]) -> Resolved {
    match o {
        Operand::Num(n) => Resolved::Num(*n),
        Operand::Field(name) => match fields.get(name) {
            Some(Value::Number(n)) => Resolved::Num(*n),
            Some(_) => Resolved::Fallback,
            None if matches!(name.as_str(), "device" | "stream" | "topic") => Resolved::Fallback,
            None => Resolved::Error,
        },
        Operand::Agg(name) => {
            if fields.contains_key(AGG_VAR) {
                return Resolved::Fallback;
            }
            match aggs.iter().find(|(n, _)| *n == name.as_str()) {
                Some((_, v)) => Resolved::Num(*v),
                None => Resolved::Error,
            }
        }
    }
}
