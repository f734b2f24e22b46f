//! Topic patterns such as `devices/{device}/{stream}`: the subscription filter they
//! stand for, and how a concrete topic yields a device id and a stream name.
//! [`TopicPatterns`] is the list `ingest.topic_pattern` may hold (fleets with two topic
//! schemes): the first pattern that matches a topic decodes it.

use std::fmt;

/// Stream name used when the pattern has no `{stream}` placeholder.
pub const DEFAULT_STREAM: &str = "telemetry";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Device,
    Stream,
}

/// A parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    segments: Vec<Segment>,
}

/// The parts a topic matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMatch<'a> {
    pub device: &'a str,
    pub stream: &'a str,
}

impl TopicPattern {
    /// Parses a pattern; `{device}` is required, `{stream}` optional, each at most once,
    /// each a whole segment; literal segments may not contain MQTT wildcards.
    pub fn parse(pattern: &str) -> Result<TopicPattern, String> {
        if pattern.is_empty() {
            return Err("must not be empty".into());
        }
        let mut segments = Vec::new();
        for part in pattern.split('/') {
            let segment = match part {
                "{device}" => Segment::Device,
                "{stream}" => Segment::Stream,
                _ if part.contains(['{', '}']) => {
                    return Err(format!(
                        "segment '{part}': only whole-segment {{device}} and {{stream}} placeholders are supported"
                    ))
                }
                _ if part.contains(['+', '#']) => {
                    return Err(format!(
                        "segment '{part}': wildcards are not allowed, use {{device}} and {{stream}}"
                    ))
                }
                _ => Segment::Literal(part.to_string()),
            };
            if !matches!(segment, Segment::Literal(_)) && segments.contains(&segment) {
                return Err(format!("placeholder '{part}' appears twice"));
            }
            segments.push(segment);
        }
        if !segments.contains(&Segment::Device) {
            return Err("must contain the {device} placeholder".into());
        }
        Ok(TopicPattern { segments })
    }

    /// The MQTT subscription filter: each placeholder becomes `+`.
    pub fn filter(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Device | Segment::Stream => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Matches a concrete topic; `None` when it does not fit the pattern.
    pub fn matches<'a>(&self, topic: &'a str) -> Option<TopicMatch<'a>> {
        let mut device = None;
        let mut stream = DEFAULT_STREAM;
        let mut parts = topic.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Device if !part.is_empty() => device = Some(part),
                Segment::Stream if !part.is_empty() => stream = part,
                _ => return None,
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(TopicMatch {
            device: device?,
            stream,
        })
    }
}

/// One or more topic patterns, in the order they are tried; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPatterns(Vec<TopicPattern>);

impl TopicPatterns {
    /// `None` for an empty list.
    pub fn new(patterns: Vec<TopicPattern>) -> Option<TopicPatterns> {
        (!patterns.is_empty()).then_some(TopicPatterns(patterns))
    }

    /// The first pattern that matches `topic`.
    pub fn find(&self, topic: &str) -> Option<&TopicPattern> {
        self.0.iter().find(|p| p.matches(topic).is_some())
    }

    pub fn iter(&self) -> impl Iterator<Item = &TopicPattern> {
        self.0.iter()
    }

    /// The subscription filters, one per pattern, joined with ", " (for logs).
    pub fn filters(&self) -> String {
        self.0
            .iter()
            .map(TopicPattern::filter)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl From<TopicPattern> for TopicPatterns {
    fn from(p: TopicPattern) -> Self {
        TopicPatterns(vec![p])
    }
}

impl fmt::Display for TopicPatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Device => "{device}",
                Segment::Stream => "{stream}",
            })
            .collect::<Vec<_>>()
            .join("/");
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pattern_gives_filter_and_parts() {
        let p = TopicPattern::parse("devices/{device}/{stream}").unwrap();
        assert_eq!(p.filter(), "devices/+/+");
        let m = p.matches("devices/t-1/telemetry").unwrap();
        assert_eq!((m.device, m.stream), ("t-1", "telemetry"));
        assert!(p.matches("devices/t-1").is_none());
        assert!(p.matches("devices/t-1/a/b").is_none());
        assert!(p.matches("other/t-1/telemetry").is_none());
        assert!(p.matches("devices//telemetry").is_none());
    }

    #[test]
    fn the_first_pattern_that_matches_decodes() {
        let ps = TopicPatterns::new(vec![
            TopicPattern::parse("devices/{device}/{stream}").unwrap(),
            TopicPattern::parse("site/{device}").unwrap(),
        ])
        .unwrap();
        assert_eq!(
            ps.find("devices/a/t").unwrap().to_string(),
            "devices/{device}/{stream}"
        );
        assert_eq!(ps.find("site/b").unwrap().to_string(), "site/{device}");
        assert!(ps.find("site/b/c").is_none());
        assert_eq!(ps.filters(), "devices/+/+, site/+");
        assert_eq!(ps.to_string(), "devices/{device}/{stream}, site/{device}");
        assert!(TopicPatterns::new(vec![]).is_none());
    }

    #[test]
    fn stream_is_optional() {
        let p = TopicPattern::parse("site/a/{device}").unwrap();
        assert_eq!(p.filter(), "site/a/+");
        assert_eq!(p.matches("site/a/x").unwrap().stream, DEFAULT_STREAM);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "devices/+/x",
            "devices/#",
            "devices/{stream}",
            "d/{device}/{device}",
            "d/x{device}",
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
