//! The rule set: every rule of a directory, validated together and indexed for lookup.
//!
//! Owns [`RuleSet`]: loading a directory (`*.toml`, not `*.test.toml`) or single texts,
//! cross-file checks (duplicate rule names), and the index that finds the rules that
//! apply to a reading.
//! Input: rule files. Output: an immutable, `Send + Sync` set the engine evaluates.
//!
//! Invariants:
//! - A `RuleSet` exists only when every file is valid; otherwise the loader returns every
//!   problem of every file as [`Diagnostics`].
//! - `applicable` returns rule indices in load order (file name, then position), and only
//!   those whose stream, topic filter and device pattern match: rules with a `stream` are
//!   found by a hash lookup, rules with only a `topic` through a topic-level trie, so a
//!   reading never meets the rules of other streams.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::diagnostics::{Diagnostic, Diagnostics, Source};
use super::load::parse_file;
use super::rule::Rule;
use crate::hashing::FastHashMap;
use crate::reading::Reading;

/// The suffix of rule test files, which the rule loader skips.
pub const TEST_SUFFIX: &str = ".test.toml";

/// A validated, indexed set of rules.
pub struct RuleSet {
    rules: Vec<Rule>,
    by_stream: FastHashMap<String, Vec<usize>>,
    by_topic: TopicIndex,
    unscoped: Vec<usize>,
    files: usize,
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rules)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl RuleSet {
    /// An empty set (no rules): the engine then does nothing.
    pub fn empty() -> RuleSet {
        RuleSet::build(Vec::new(), 0, Arc::new(cel::Env::stdlib()))
    }

    /// Parses one file's text. `file_name` is used in diagnostics.
    pub fn parse(file_name: &str, text: &str) -> Result<RuleSet, Diagnostics> {
        RuleSet::parse_many(&[(file_name.to_string(), text.to_string())])
    }

    /// Parses several (file name, text) pairs as one set.
    pub fn parse_many(files: &[(String, String)]) -> Result<RuleSet, Diagnostics> {
        let env = Arc::new(cel::Env::stdlib());
        let mut diags = Diagnostics::default();
        let mut rules: Vec<Rule> = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for (file, text) in files {
            let parsed = parse_file(file, text, &env);
            diags.extend(Diagnostics(parsed.diags));
            let src = Source::new(file, text);
            for (name, at) in parsed.names {
                match seen.get(&name) {
                    Some(first) => {
                        let msg =
                            format!("duplicate rule name `{name}` (first defined in {first})");
                        diags.push(src.at(at, msg));
                    }
                    None => {
                        seen.insert(name, file.clone());
                    }
                }
            }
            rules.extend(parsed.rules);
        }
        if !diags.is_empty() {
            diags.sort();
            return Err(diags);
        }
        Ok(RuleSet::build(rules, files.len(), env))
    }

    /// Loads every `*.toml` rule file of `dir` (skipping `*.test.toml`), sorted by name.
    pub fn load_dir(dir: &Path) -> Result<RuleSet, Diagnostics> {
        let paths = rule_files(dir).map_err(|d| Diagnostics(vec![d]))?;
        RuleSet::load_files(&paths)
    }

    /// Loads the given rule files as one set.
    pub fn load_files(paths: &[PathBuf]) -> Result<RuleSet, Diagnostics> {
        let mut texts = Vec::new();
        let mut diags = Diagnostics::default();
        for path in paths {
            let name = path.display().to_string();
            match std::fs::read_to_string(path) {
                Ok(text) => texts.push((name, text)),
                Err(e) => diags.push(Diagnostic {
                    file: name,
                    line: 1,
                    col: 1,
                    message: format!("cannot read rule file: {e}"),
                }),
            }
        }
        match (RuleSet::parse_many(&texts), diags.is_empty()) {
            (Ok(set), true) => Ok(set),
            (Ok(_), false) => Err(diags),
            (Err(more), _) => {
                diags.extend(more);
                diags.sort();
                Err(diags)
            }
        }
    }

    fn build(rules: Vec<Rule>, files: usize, env: Arc<cel::Env>) -> RuleSet {
        let mut by_stream: FastHashMap<String, Vec<usize>> = FastHashMap::default();
        let mut by_topic = TopicIndex::default();
        let mut unscoped = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match (&rule.stream, &rule.topic) {
                (Some(s), _) => by_stream.entry(s.clone()).or_default().push(i),
                (None, Some(t)) => by_topic.insert(t.levels(), i),
                (None, None) => unscoped.push(i),
            }
        }
        RuleSet {
            rules,
            by_stream,
            by_topic,
            unscoped,
            files,
            env,
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many files the set was loaded from.
    pub fn files(&self) -> usize {
        self.files
    }

    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The CEL environment the rules were compiled with (and are evaluated with).
    pub(crate) fn env(&self) -> &Arc<cel::Env> {
        &self.env
    }

    /// Fills `out` with the indices of the rules that apply to `reading`, in load order.
    pub fn applicable(&self, reading: &Reading, out: &mut Vec<usize>) {
        out.clear();
        let keep =
            |i: &usize| self.rules[*i].applies_to(&reading.stream, &reading.topic, &reading.device);
        if let Some(list) = self.by_stream.get(&reading.stream) {
            out.extend(list.iter().filter(|i| keep(i)));
        }
        self.by_topic.matches(&reading.topic, &mut |i| {
            if keep(&i) {
                out.push(i);
            }
        });
        out.extend(self.unscoped.iter().filter(|i| keep(i)));
        // Each bucket is in load order; merging three small sorted runs.
        if out.len() > 1 {
            out.sort_unstable();
        }
    }
}

/// The `*.toml` rule files of a directory (not `*.test.toml`), sorted by name.
pub fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    list_files(dir, |name| {
        name.ends_with(".toml") && !name.ends_with(TEST_SUFFIX)
    })
}

/// The `*.test.toml` rule test files of a directory, sorted by name.
pub fn test_files(dir: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    list_files(dir, |name| name.ends_with(TEST_SUFFIX))
}

fn list_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, Diagnostic> {
    let entries = std::fs::read_dir(dir).map_err(|e| Diagnostic {
        file: dir.display().to_string(),
        line: 1,
        col: 1,
        message: format!("cannot read rules directory: {e}"),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    paths.sort();
    Ok(paths)
}

/// MQTT topic filters by level: literal children, `+` and `#`.
#[derive(Debug, Default)]
struct TopicIndex {
    literal: FastHashMap<String, TopicIndex>,
    plus: Option<Box<TopicIndex>>,
    hash: Vec<usize>,
    here: Vec<usize>,
}

impl TopicIndex {
    fn insert<'a>(&mut self, mut levels: impl Iterator<Item = &'a str>, rule: usize) {
        match levels.next() {
            None => self.here.push(rule),
            Some("#") => self.hash.push(rule),
            Some("+") => self
                .plus
                .get_or_insert_with(Default::default)
                .insert(levels, rule),
            Some(l) => self
                .literal
                .entry(l.to_string())
                .or_default()
                .insert(levels, rule),
        }
    }

    fn matches(&self, topic: &str, f: &mut dyn FnMut(usize)) {
        if self.literal.is_empty() && self.plus.is_none() && self.hash.is_empty() {
            return;
        }
        self.walk(Some(topic), f);
    }

    /// `rest` is the part of the topic not matched yet (`None` once every level is).
    fn walk(&self, rest: Option<&str>, f: &mut dyn FnMut(usize)) {
        // `a/#` also matches `a`.
        self.hash.iter().for_each(|&i| f(i));
        match rest {
            None => self.here.iter().for_each(|&i| f(i)),
            Some(rest) => {
                let (level, next) = match rest.split_once('/') {
                    Some((level, next)) => (level, Some(next)),
                    None => (rest, None),
                };
                if let Some(child) = self.literal.get(level) {
                    child.walk(next, f);
                }
                if let Some(plus) = &self.plus {
                    plus.walk(next, f);
                }
            }
        }
    }
}
