//! Action templates: the placeholder syntax of an action's topic, URL and payload, checked
//! against the rule they belong to when it loads, and filled in for one event.
//!
//! Invariants: see the action module's header (what a placeholder is, what is filled in
//! at load and what at run time, percent-encoding in URLs, wildcard-free topics).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::reading::Value;
use crate::rules::fast::AGG_VAR;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Device,
    /// `{value.FIELD}`: the event's value of FIELD (`agg.NAME` for an aggregate).
    Value(String),
}

/// A topic or payload with its placeholders resolved as far as the rule allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The text as written in the rule file.
    pub source: String,
    parts: Vec<Part>,
    /// Percent-encode what placeholders bring (a URL).
    escape: bool,
}

/// What a template may refer to, from the rule it belongs to.
pub(in crate::rules) struct Known<'a> {
    pub rule: &'a str,
    pub event: &'a str,
    pub stream: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
    pub aggregates: &'a [String],
}

/// Where a template is used: a topic takes no `{value.FIELD}` and no wildcards; in a URL
/// what placeholders bring is percent-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::rules) enum Place {
    Topic,
    Payload,
    Url,
}

impl Template {
    /// Compiles `source`; on failure every problem as (character offset in `source`, message).
    pub(in crate::rules) fn parse(
        source: &str,
        place: Place,
        known: &Known<'_>,
    ) -> Result<Template, Vec<(usize, String)>> {
        let mut parts: Vec<Part> = Vec::new();
        let mut problems = Vec::new();
        let mut text = String::new();
        let chars: Vec<char> = source.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let Some(len) = placeholder_len(&chars[i..]) else {
                text.push(chars[i]);
                i += 1;
                continue;
            };
            let name: String = chars[i + 1..i + len - 1].iter().collect();
            match resolve(&name, place, known) {
                Ok(Part::Text(t)) if place == Place::Url => text.push_str(&percent_encode(&t)),
                Ok(Part::Text(t)) => text.push_str(&t),
                Ok(part) => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
                Err(message) => problems.push((i, message)),
            }
            i += len;
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if place == Place::Topic {
            topic_problems(source, &parts, &mut problems);
        }
        if problems.is_empty() {
            Ok(Template {
                source: source.to_string(),
                parts,
                escape: place == Place::Url,
            })
        } else {
            Err(problems)
        }
    }

    /// A template of plain text, without placeholders.
    pub(in crate::rules) fn text(source: &str) -> Template {
        Template {
            source: source.to_string(),
            parts: vec![Part::Text(source.to_string())],
            escape: false,
        }
    }

    /// The template filled in for `device` and `values`; a missing value renders as `null`.
    pub fn render(&self, device: &str, values: &BTreeMap<String, Value>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            if self.escape && !matches!(part, Part::Text(_)) {
                let mut one = Template {
                    source: String::new(),
                    parts: vec![part.clone()],
                    escape: false,
                };
                one.source = one.render(device, values);
                out.push_str(&percent_encode(&one.source));
                continue;
            }
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Device => out.push_str(device),
                Part::Value(field) => match values.get(field) {
                    Some(Value::Number(n)) => {
                        let _ = write!(
                            out,
                            "{}",
                            serde_json::Number::from_f64(*n)
                                .map_or_else(|| "null".to_string(), |n| n.to_string())
                        );
                    }
                    Some(Value::Bool(b)) => {
                        let _ = write!(out, "{b}");
                    }
                    Some(Value::Text(s)) => out.push_str(s),
                    None => out.push_str("null"),
                },
            }
        }
        out
    }
}

/// `s` with every byte but URL-unreserved ones (letters, digits, `-`, `.`, `_`, `~`)
/// written as `%XX` (RFC 3986).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Length in chars of the placeholder at the start of `s`, if one starts there.
fn placeholder_len(s: &[char]) -> Option<usize> {
    if s.first() != Some(&'{') {
        return None;
    }
    let name_len = s[1..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .count();
    let starts_well = s
        .get(1)
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_');
    (starts_well && s.get(1 + name_len) == Some(&'}')).then_some(name_len + 2)
}

/// What `{name}` stands for, or why it is not allowed here.
fn resolve(name: &str, place: Place, known: &Known<'_>) -> Result<Part, String> {
    let names = "{device}, {stream}, {event}, {rule}, {label.NAME}";
    match name {
        "device" => Ok(Part::Device),
        "rule" => Ok(Part::Text(known.rule.to_string())),
        "event" => Ok(Part::Text(known.event.to_string())),
        "stream" => known
            .stream
            .map(|s| Part::Text(s.to_string()))
            .ok_or_else(|| "`{stream}` needs the rule to name its `stream`".to_string()),
        _ => {
            if let Some(label) = name.strip_prefix("label.") {
                return known
                    .labels
                    .get(label)
                    .map(|v| Part::Text(v.clone()))
                    .ok_or_else(|| {
                        let declared: Vec<&str> = known.labels.keys().map(String::as_str).collect();
                        format!(
                            "unknown label `{label}` in `{{{name}}}` (labels: {})",
                            if declared.is_empty() {
                                "none".to_string()
                            } else {
                                declared.join(", ")
                            }
                        )
                    });
            }
            if let Some(field) = name.strip_prefix("value.") {
                if place == Place::Topic {
                    return Err(format!(
                        "`{{{name}}}` is not allowed in a topic (a reading's value is not a topic level)"
                    ));
                }
                if let Some(agg) = field.strip_prefix(&format!("{AGG_VAR}.")) {
                    if !known.aggregates.iter().any(|a| a == agg) {
                        return Err(format!(
                            "unknown aggregate `{agg}` in `{{{name}}}` (declared: {})",
                            if known.aggregates.is_empty() {
                                "none".to_string()
                            } else {
                                known.aggregates.join(", ")
                            }
                        ));
                    }
                }
                if field.is_empty() {
                    return Err("`{value.}` names no field".to_string());
                }
                return Ok(Part::Value(field.to_string()));
            }
            let also = match place {
                Place::Topic => "",
                Place::Payload | Place::Url => ", {value.FIELD}",
            };
            Err(format!(
                "unknown placeholder `{{{name}}}` (known: {names}{also})"
            ))
        }
    }
}

/// A topic must be a topic name once filled in: not empty, no wildcards, no `$` start.
fn topic_problems(source: &str, parts: &[Part], problems: &mut Vec<(usize, String)>) {
    if let Some((i, c)) = source
        .chars()
        .enumerate()
        .find(|(_, c)| matches!(c, '+' | '#' | '\0'))
    {
        problems.push((
            i,
            format!("an action topic may not contain {c:?}: it is a topic name, not a filter"),
        ));
    }
    // Labels filled in at load may bring wildcards too.
    for part in parts {
        if let Part::Text(t) = part {
            if t.contains(['+', '#']) && !source.contains(['+', '#']) {
                problems.push((0, format!("an action topic may not contain `+` or `#` (a label value brings one: {t:?})")));
            }
        }
    }
    if source.is_empty() {
        problems.push((0, "an action topic is empty".to_string()));
    } else if source.starts_with('$') {
        problems.push((
            0,
            "an action topic may not start with `$` (reserved by the broker)".to_string(),
        ));
    }
}
