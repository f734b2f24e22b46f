//! The guard around compiling a CEL expression from a rule file.
//!
//! Owns the limits on an expression ([`MAX_EXPR_BYTES`], [`MAX_EXPR_DEPTH`]) and the
//! short-lived thread it is parsed on. Input: the CEL source of a `condition` or
//! `clear`. Output: a [`cel::Program`], or why there is none ([`Refused`]); the loader
//! (`load.rs`) turns that into diagnostics.
//!
//! Invariants:
//! - an expression longer than [`MAX_EXPR_BYTES`] is never parsed;
//! - a program that comes back is at most [`MAX_EXPR_DEPTH`] deep, so evaluating and
//!   dropping it cannot overflow the stack of the thread that evaluates the rules;
//! - parsing, the depth check and dropping a refused tree happen on a thread with a
//!   [`COMPILE_STACK`] stack, because the CEL parser recurses once or more per operator
//!   (`1+1+...+1`, `!!!...x`, `((...))`) and a stack overflow aborts the process.

use cel::common::ast::{EntryExpr, Expr as Ast, IdedExpr};

/// Longest CEL expression accepted, in bytes (far more than any real condition).
pub const MAX_EXPR_BYTES: usize = 4096;
/// Deepest CEL syntax tree accepted: evaluation and drop recurse over the tree. An
/// unoptimized build overflows a 2 MiB stack evaluating `x + x + ... > 0` some 55 deep.
pub const MAX_EXPR_DEPTH: usize = 32;
/// Stack of the thread a CEL expression is parsed on: enough for [`MAX_EXPR_BYTES`] of
/// the most deeply recursing syntax in an unoptimized build. Reserved, not committed.
const COMPILE_STACK: usize = 64 << 20;

/// Why [`compile`] gave no program.
pub(super) enum Refused {
    /// CEL syntax errors: (line, column) and message of each.
    Syntax(Vec<((isize, isize), String)>),
    TooLong,
    TooDeep,
    NoThread(std::io::Error),
}

/// Compiles a CEL expression within [`MAX_EXPR_BYTES`] and [`MAX_EXPR_DEPTH`]. Parsing,
/// the depth check and dropping a refused tree all happen on a thread with a
/// [`COMPILE_STACK`] stack; what it returns is shallow enough for any thread.
pub(super) fn compile(env: &cel::Env, source: &str) -> Result<cel::Program, Refused> {
    if source.len() > MAX_EXPR_BYTES {
        return Err(Refused::TooLong);
    }
    std::thread::scope(|scope| {
        let parse = std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn_scoped(scope, || match env.compile(source) {
                Ok(program) if depth(program.expression()) > MAX_EXPR_DEPTH => {
                    Err(Refused::TooDeep)
                }
                Ok(program) => Ok(program),
                Err(errors) => Err(Refused::Syntax(
                    errors.errors.into_iter().map(|e| (e.pos, e.msg)).collect(),
                )),
            })
            .map_err(Refused::NoThread)?;
        // The parser does not panic on any input (fuzzed); if it ever does, the loader
        // panics as it would have without the thread.
        parse
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The depth of a CEL syntax tree (a leaf is 1), without recursion.
fn depth(root: &IdedExpr) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(root, 1)];
    while let Some((e, d)) = todo.pop() {
        deepest = deepest.max(d);
        todo.extend(children(e).into_iter().map(|c| (c, d + 1)));
    }
    deepest
}

/// The direct subexpressions of a CEL expression.
pub(super) fn children(e: &IdedExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        Ast::Select(sel) => vec![&*sel.operand],
        Ast::Call(call) => call
            .target
            .as_deref()
            .into_iter()
            .chain(&call.args)
            .collect(),
        Ast::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Ast::List(l) => l.elements.iter().collect(),
        Ast::Map(m) => m
            .entries
            .iter()
            .flat_map(|x| match &x.expr {
                EntryExpr::MapEntry(me) => vec![&me.key, &me.value],
                EntryExpr::StructField(sf) => vec![&sf.value],
            })
            .collect(),
        Ast::Struct(s) => s
            .entries
            .iter()
            .filter_map(|x| match &x.expr {
                EntryExpr::StructField(sf) => Some(&sf.value),
                EntryExpr::MapEntry(_) => None,
            })
            .collect(),
        Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => Vec::new(),
    }
}
