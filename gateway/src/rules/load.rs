//! Loading one rule file: TOML text to compiled [`Rule`]s, with every problem positioned.
//!
//! Owns the rule file schema (the keys documented in `rules/README.md`).
//! Input: a file name and its text. Output: the rules that are valid, and a
//! [`Diagnostic`] for every problem: TOML syntax, unknown keys, wrong types, bad
//! durations, CEL syntax errors mapped from the expression into the file, references to
//! undeclared aggregates, missing or conflicting keys.
//!
//! Invariants:
//! - The whole file is walked even after a problem; one bad rule does not hide another.
//! - A CEL position is mapped through the TOML string's own span, so it points at the
//!   character inside the file (exact for strings without escape sequences).
//! - A CEL expression is compiled only through [`cel_guard::compile`], within
//!   [`MAX_EXPR_BYTES`] and [`MAX_EXPR_DEPTH`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use cel::common::ast::{Expr as Ast, IdedExpr};
use toml_edit::{ImDocument, Item, TableLike};

use super::action::Known;
use super::cel_guard::{self, Refused, MAX_EXPR_BYTES, MAX_EXPR_DEPTH};
use super::diagnostics::{char_position, content_start, map_position, Diagnostic, Source};
use super::fast::AGG_VAR;
use super::rule::{AggFn, Aggregate, DeviceMatch, Expr, Rule, RuleKind, TopicFilter, WindowSpec};
use crate::reading::Millis;

const RULE_KEYS: &[&str] = &[
    "name",
    "event",
    "description",
    "stream",
    "topic",
    "device",
    "condition",
    "clear",
    "absent_for",
    "for",
    "keep_firing_for",
    "cooldown",
    "severity",
    "labels",
    "annotations",
    "aggregate",
    "action",
];
const AGGREGATE_KEYS: &[&str] = &["name", "field", "fn", "window", "samples", "min_span"];
/// Severity when a rule gives none.
pub const DEFAULT_SEVERITY: &str = "warning";

/// What one file gave: its valid rules, the name (and byte offset of the name's value) of
/// every rule it declares, valid or not, and every problem.
pub struct Parsed {
    pub rules: Vec<Rule>,
    pub names: Vec<(String, usize)>,
    pub diags: Vec<Diagnostic>,
}

/// Parses one rule file. Rules with problems are left out; every problem is returned.
pub fn parse_file(file: &str, text: &str, env: &cel::Env) -> Parsed {
    let src = Source::new(file, text);
    let mut cx = Cx {
        src: &src,
        env,
        diags: Vec::new(),
    };
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            let msg = format!("TOML syntax: {}", e.message().trim_end());
            return Parsed {
                rules: Vec::new(),
                names: Vec::new(),
                diags: vec![src.at(at, msg)],
            };
        }
    };
    let mut rules = Vec::new();
    let mut names = Vec::new();
    for (key, item) in doc.as_table().iter() {
        if key != "rule" {
            cx.unknown_key(doc.as_table(), key, &["rule"], "at the top level");
            continue;
        }
        match item.as_array_of_tables() {
            Some(tables) => {
                for table in tables.iter() {
                    if let Some(item) = table.get("name") {
                        if let (Some(n), Some(span)) = (item.as_str(), item.span()) {
                            names.push((n.to_string(), span.start));
                        }
                    }
                    let before = cx.diags.len();
                    let rule = cx.rule(table, table.span());
                    if let (Some(rule), true) = (rule, cx.diags.len() == before) {
                        rules.push(rule);
                    }
                }
            }
            None => cx.error(
                item.span(),
                "`rule` must be an array of tables: write `[[rule]]`",
            ),
        }
    }
    Parsed {
        rules,
        names,
        diags: cx.diags,
    }
}

pub(super) struct Cx<'a> {
    pub(super) src: &'a Source<'a>,
    env: &'a cel::Env,
    diags: Vec<Diagnostic>,
}

/// One table of a `[[rule.NAME]]` item, with its span in the file.
pub(super) type SubTable<'t> = (&'t dyn TableLike, Option<Range<usize>>);

impl Cx<'_> {
    pub(super) fn error(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let at = span.map_or(0, |s| s.start);
        self.diags.push(self.src.at(at, message));
    }

    fn unknown_key(&mut self, table: &dyn TableLike, key: &str, known: &[&str], place: &str) {
        let span = table.get_key_value(key).and_then(|(k, _)| k.span());
        self.error(
            span,
            format!(
                "unknown key `{key}` {place} (expected one of: {})",
                known.join(", ")
            ),
        );
    }

    /// The tables of a `[[rule.NAME]]` item (an array of tables, or an array of inline
    /// tables), each with its span; `None` after reporting an item of another shape.
    /// An entry that is not a table is reported and left out.
    pub(super) fn sub_tables<'t>(
        &mut self,
        item: &'t Item,
        name: &str,
    ) -> Option<Vec<SubTable<'t>>> {
        if let Some(aot) = item.as_array_of_tables() {
            return Some(
                aot.iter()
                    .map(|t| (t as &dyn TableLike, t.span()))
                    .collect(),
            );
        }
        let Some(arr) = item.as_array() else {
            self.error(
                item.span(),
                format!("`{name}` must be an array of tables: write `[[rule.{name}]]`"),
            );
            return None;
        };
        let mut tables = Vec::new();
        for value in arr.iter() {
            match value.as_inline_table() {
                Some(t) => tables.push((t as &dyn TableLike, value.span())),
                None => self.error(value.span(), format!("each `{name}` must be a table")),
            }
        }
        Some(tables)
    }

    pub(super) fn check_keys(&mut self, table: &dyn TableLike, known: &[&str], place: &str) {
        let unknown: Vec<String> = table
            .iter()
            .map(|(k, _)| k.to_string())
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        for key in unknown {
            self.unknown_key(table, &key, known, place);
        }
    }

    pub(super) fn string(
        &mut self,
        table: &dyn TableLike,
        key: &str,
    ) -> Option<(String, Range<usize>)> {
        let item = table.get(key)?;
        let span = item.span().unwrap_or(0..0);
        match item.as_str() {
            Some(s) => Some((s.to_string(), span)),
            None => {
                let found = item.type_name();
                self.error(
                    Some(span),
                    format!("`{key}` must be a string, found {found}"),
                );
                None
            }
        }
    }

    pub(super) fn required(
        &mut self,
        table: &dyn TableLike,
        key: &str,
        at: &Option<Range<usize>>,
        place: &str,
    ) -> Option<(String, Range<usize>)> {
        if table.get(key).is_none() {
            self.error(
                at.clone(),
                format!("missing required key `{key}` in {place}"),
            );
            return None;
        }
        self.string(table, key)
    }

    pub(in crate::rules) fn duration(
        &mut self,
        table: &dyn TableLike,
        key: &str,
    ) -> Option<Millis> {
        let (text, span) = self.string(table, key)?;
        match humantime::parse_duration(text.trim()) {
            Ok(d) => Some(d.as_millis() as Millis),
            Err(e) => {
                self.error(
                    Some(span),
                    format!(
                        "bad duration {text:?} for `{key}`: {e} (e.g. \"30s\", \"5m\", \"1h 30m\")"
                    ),
                );
                None
            }
        }
    }

    pub(in crate::rules) fn string_map(
        &mut self,
        table: &dyn TableLike,
        key: &str,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(item) = table.get(key) else {
            return out;
        };
        let Some(map) = item.as_table_like() else {
            let found = item.type_name();
            self.error(
                item.span(),
                format!("`{key}` must be a table of strings, found {found}"),
            );
            return out;
        };
        for (k, v) in map.iter() {
            match v.as_str() {
                Some(s) => {
                    out.insert(k.to_string(), s.to_string());
                }
                None => {
                    let found = v.type_name();
                    self.error(
                        v.span(),
                        format!("`{key}.{k}` must be a string, found {found}"),
                    );
                }
            }
        }
        out
    }

    fn rule(&mut self, table: &dyn TableLike, at: Option<Range<usize>>) -> Option<Rule> {
        self.check_keys(table, RULE_KEYS, "in [[rule]]");
        let name = self.required(table, "name", &at, "[[rule]]");
        let event = self.required(table, "event", &at, "[[rule]]");
        let description = self.string(table, "description").map(|(s, _)| s);
        let stream = self.string(table, "stream").map(|(s, _)| s);
        let topic = self.string(table, "topic").and_then(|(s, span)| {
            TopicFilter::parse(&s)
                .map_err(|e| self.error(Some(span), format!("bad `topic`: {e}")))
                .ok()
        });
        let device = self.string(table, "device").map(|(s, _)| DeviceMatch(s));
        if let Some((n, span)) = &name {
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || n.is_empty()
            {
                self.error(
                    Some(span.clone()),
                    format!("bad rule name {n:?}: use letters, digits, `-`, `_` and `.`"),
                );
            }
        }
        if let Some((e, span)) = &event {
            if e.is_empty() || e.contains(['/', '+', '#']) {
                self.error(
                    Some(span.clone()),
                    format!(
                        "bad event type {e:?}: it must be non-empty and contain no `/`, `+` or `#`"
                    ),
                );
            }
        }
        let (aggregates, declared) = self.aggregates(table);
        let for_ms = self.duration(table, "for").unwrap_or(0);
        let keep_firing_for_ms = self.duration(table, "keep_firing_for").unwrap_or(0);
        let cooldown_ms = self.duration(table, "cooldown").unwrap_or(0);
        let severity = self
            .string(table, "severity")
            .map_or_else(|| DEFAULT_SEVERITY.to_string(), |(s, _)| s);
        let labels = self.string_map(table, "labels");
        let annotations = self.string_map(table, "annotations");
        let kind = self.kind(table, &at, &declared);
        let actions = match (&name, &event) {
            (Some((name, _)), Some((event, _))) => {
                let known = Known {
                    rule: name,
                    event,
                    stream: stream.as_deref(),
                    labels: &labels,
                    aggregates: &declared,
                };
                self.actions(table, &known)
            }
            _ => Vec::new(),
        };
        Some(Rule {
            name: name?.0,
            file: self.src.file.to_string(),
            event: event?.0,
            description,
            stream,
            topic,
            device,
            kind: kind?,
            for_ms,
            keep_firing_for_ms,
            cooldown_ms,
            severity,
            labels,
            annotations,
            aggregates,
            actions: actions.into(),
        })
    }

    fn kind(
        &mut self,
        table: &dyn TableLike,
        at: &Option<Range<usize>>,
        aggregates: &[String],
    ) -> Option<RuleKind> {
        let has = |k: &str| table.get(k).is_some();
        let key_span = |k: &str| table.get_key_value(k).and_then(|(k, _)| k.span());
        match (has("condition"), has("absent_for")) {
            (true, true) => {
                self.error(
                    key_span("absent_for"),
                    "a rule has either `condition` or `absent_for`, not both",
                );
                None
            }
            (false, false) => {
                self.error(
                    at.clone(),
                    "missing `condition` (or `absent_for` for an absence rule) in [[rule]]",
                );
                None
            }
            (false, true) => {
                for k in ["clear", "for", "aggregate"] {
                    if has(k) {
                        self.error(key_span(k), format!("`{k}` does not apply to an absence rule (`absent_for` is how long it must hold)"));
                    }
                }
                let after = self.duration(table, "absent_for")?;
                if after <= 0 {
                    self.error(
                        table.get("absent_for").and_then(Item::span),
                        "`absent_for` must be longer than 0s",
                    );
                    return None;
                }
                Some(RuleKind::Absence { after })
            }
            (true, false) => {
                let condition = self.expr(table, "condition", aggregates);
                let clear = if has("clear") {
                    Some(Box::new(self.expr(table, "clear", aggregates)?))
                } else {
                    None
                };
                Some(RuleKind::Condition {
                    condition: Box::new(condition?),
                    clear,
                })
            }
        }
    }

    /// The valid aggregates, and the names of all declared ones (valid or not).
    fn aggregates(&mut self, table: &dyn TableLike) -> (Vec<Aggregate>, Vec<String>) {
        let mut out: Vec<Aggregate> = Vec::new();
        let mut declared: Vec<String> = Vec::new();
        let Some(item) = table.get("aggregate") else {
            return (out, declared);
        };
        let Some(entries) = self.sub_tables(item, "aggregate") else {
            return (out, declared);
        };
        for (t, at) in entries {
            self.check_keys(t, AGGREGATE_KEYS, "in [[rule.aggregate]]");
            let name = self.required(t, "name", &at, "[[rule.aggregate]]");
            let field = self.required(t, "field", &at, "[[rule.aggregate]]");
            let func = self
                .required(t, "fn", &at, "[[rule.aggregate]]")
                .and_then(|(f, span)| {
                    AggFn::parse(&f).or_else(|| {
                        self.error(
                            Some(span),
                            format!(
                                "unknown aggregate function {f:?} (expected one of: {})",
                                AggFn::NAMES
                            ),
                        );
                        None
                    })
                });
            let window = match (t.get("window").is_some(), t.get("samples")) {
                (true, None) => self
                    .duration(t, "window")
                    .filter(|ms| *ms > 0)
                    .map(WindowSpec::Time)
                    .or_else(|| {
                        self.error(
                            t.get("window").and_then(Item::span),
                            "`window` must be a duration longer than 0s",
                        );
                        None
                    }),
                (false, Some(item)) => match item.as_integer() {
                    Some(n) if n >= 1 => Some(WindowSpec::Count(n as usize)),
                    _ => {
                        self.error(item.span(), "`samples` must be an integer of at least 1");
                        None
                    }
                },
                (true, Some(item)) => {
                    self.error(item.span(), "an aggregate has either `window` (a duration) or `samples` (a count), not both");
                    None
                }
                (false, None) => {
                    self.error(at.clone(), "missing `window` (a duration) or `samples` (a count) in [[rule.aggregate]]");
                    None
                }
            };
            let min_span = self.min_span(t, window);
            if let Some((n, span)) = &name {
                declared.push(n.clone());
                let ident = n
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ident {
                    self.error(Some(span.clone()), format!("bad aggregate name {n:?}: it must be an identifier (letters, digits, `_`)"));
                } else if declared.iter().filter(|d| *d == n).count() > 1 {
                    self.error(
                        Some(span.clone()),
                        format!("aggregate `{n}` is declared twice in this rule"),
                    );
                }
            }
            if let (Some((name, _)), Some((field, _)), Some(func), Some(window), Some(min_span)) =
                (name, field, func, window, min_span)
            {
                out.push(Aggregate {
                    name,
                    field,
                    func,
                    window,
                    min_span,
                });
            }
        }
        (out, declared)
    }

    /// An aggregate's `min_span` (0 when it has none): longer than 0s, and shorter than a
    /// time window (whose samples never span the whole window).
    fn min_span(&mut self, t: &dyn TableLike, window: Option<WindowSpec>) -> Option<Millis> {
        let Some(item) = t.get("min_span") else {
            return Some(0);
        };
        let ms = self.duration(t, "min_span")?;
        let problem = match window {
            _ if ms <= 0 => Some("`min_span` must be a duration longer than 0s".to_owned()),
            Some(WindowSpec::Time(w)) if ms >= w => Some(format!(
                "`min_span` must be shorter than the window ({}): the samples in a window never span all of it",
                humantime::format_duration(std::time::Duration::from_millis(w as u64))
            )),
            _ => None,
        };
        match problem {
            Some(problem) => {
                self.error(item.span(), problem);
                None
            }
            None => Some(ms),
        }
    }

    /// Compiles a CEL string, mapping parse errors and unknown `agg.X` references into the file.
    fn expr(&mut self, table: &dyn TableLike, key: &str, aggregates: &[String]) -> Option<Expr> {
        let (source, span) = self.string(table, key)?;
        let start = content_start(self.src.text, &span);
        let at = Some(start..start);
        match cel_guard::compile(self.env, &source) {
            Err(Refused::TooLong) => {
                self.error(
                    at,
                    format!("CEL expression in `{key}` is longer than {MAX_EXPR_BYTES} bytes"),
                );
                None
            }
            Err(Refused::TooDeep) => {
                self.error(
                    at,
                    format!(
                        "CEL expression in `{key}` is nested deeper than {MAX_EXPR_DEPTH} levels"
                    ),
                );
                None
            }
            Err(Refused::NoThread(e)) => {
                self.error(
                    at,
                    format!("cannot compile `{key}`: no thread to parse it on: {e}"),
                );
                None
            }
            Ok(program) => {
                let mut unknown = Vec::new();
                let known: BTreeSet<&str> = aggregates.iter().map(String::as_str).collect();
                agg_refs(program.expression(), &mut |id, field| {
                    if !known.contains(field) {
                        unknown.push((id, field.to_string()));
                    }
                });
                if unknown.is_empty() {
                    let fast = super::fast::compile(program.expression());
                    return Some(Expr {
                        source,
                        program,
                        fast,
                    });
                }
                for (id, field) in unknown {
                    let char_offset = program.source_info().offset_for(id).map_or(0, |(s, _)| s);
                    let (line, col) = char_position(&source, char_offset as usize);
                    let at = map_position(self.src.text, start, span.end, line, col);
                    let declared = if known.is_empty() {
                        "none declared".to_string()
                    } else {
                        known.iter().copied().collect::<Vec<_>>().join(", ")
                    };
                    self.error(
                        Some(at..at),
                        format!("unknown aggregate `{AGG_VAR}.{field}` in `{key}` (declared: {declared})"),
                    );
                }
                None
            }
            Err(Refused::Syntax(errors)) => {
                for (pos, msg) in errors {
                    let (line, col) = (pos.0.max(1) as usize, pos.1.max(1) as usize);
                    let at = map_position(self.src.text, start, span.end, line, col);
                    let msg = msg.strip_prefix("Syntax error: ").unwrap_or(&msg);
                    self.error(Some(at..at), format!("CEL syntax error in `{key}`: {msg}"));
                }
                None
            }
        }
    }
}

/// Calls `f(id, field)` for every `agg.field` in the expression.
fn agg_refs(e: &IdedExpr, f: &mut dyn FnMut(u64, &str)) {
    match &e.expr {
        Ast::Select(sel) if matches!(&sel.operand.expr, Ast::Ident(n) if n == AGG_VAR) => {
            f(sel.operand.id, &sel.field);
        }
        _ => cel_guard::children(e)
            .into_iter()
            .for_each(|c| agg_refs(c, f)),
    }
}
