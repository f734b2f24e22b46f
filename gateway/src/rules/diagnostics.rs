//! Diagnostics: every problem found in rule and rule-test files, as `file:line:col: message`.
//!
//! Owns [`Diagnostic`], [`Diagnostics`], the byte-offset to line/column mapping, and the
//! mapping of a position inside a TOML string value (a CEL error) back into the file.
//! Input: a file name, its text and byte offsets (spans from the TOML parser, positions
//! from the CEL parser). Output: positioned messages an operator can jump to.
//!
//! Invariants:
//! - Lines and columns are 1-based; columns count characters, not bytes.
//! - A loader never stops at the first problem: it pushes every one it finds.

use std::fmt;
use std::ops::Range;

/// One problem at one place in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found, in file order then position order.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct Diagnostics(pub Vec<Diagnostic>);

fn display_lines(all: &[Diagnostic]) -> String {
    all.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Diagnostics {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    pub(crate) fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub(crate) fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    pub(crate) fn sort(&mut self) {
        self.0
            .sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    }
}

/// One file's text, for turning byte offsets into line/column.
pub(crate) struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a str, text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source {
            file,
            text,
            line_starts,
        }
    }

    /// 1-based (line, column in characters) of a byte offset (clamped to the text).
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, col + 1)
    }

    /// A diagnostic at a byte offset.
    pub fn at(&self, offset: usize, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.position(offset);
        Diagnostic {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }
}

/// Byte offset of the first content character of a TOML string value at `span`.
pub(super) fn content_start(text: &str, span: &Range<usize>) -> usize {
    let raw = text.get(span.clone()).unwrap_or("");
    if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
        let after = span.start + 3;
        let rest = &text[after..];
        after
            + if rest.starts_with("\r\n") {
                2
            } else if rest.starts_with('\n') {
                1
            } else {
                0
            }
    } else {
        span.start + 1
    }
}

/// 1-based (line, column in characters) of a character offset within `s`.
pub(super) fn char_position(s: &str, char_offset: usize) -> (usize, usize) {
    let (mut line, mut col) = (1, 1);
    for c in s.chars().take(char_offset) {
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

/// Walks the file from a string's first content byte to the CEL (line, col), giving the
/// byte offset in the file; stops at the end of the string value.
pub(super) fn map_position(text: &str, start: usize, end: usize, line: usize, col: usize) -> usize {
    let (mut l, mut c) = (1, 1);
    for (i, ch) in text[start..end.max(start)].char_indices() {
        if (l, c) >= (line, col) {
            return start + i;
        }
        if ch == '\n' {
            l += 1;
            c = 1;
        } else {
            c += 1;
        }
    }
    end.saturating_sub(1).max(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let src = Source::new("f.toml", "ab\n\u{e9}x = 1\n");
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(2), (1, 3));
        assert_eq!(src.position(3), (2, 1));
        // 'x' follows a two-byte character: byte 5, column 2.
        assert_eq!(src.position(5), (2, 2));
        assert_eq!(src.at(5, "bad").to_string(), "f.toml:2:2: bad");
    }
}
