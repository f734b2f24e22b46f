//! The command topic patterns of `[downlink]`: `downlink.upstream_topic` (under the
//! upstream prefix) and `downlink.device_topic` (on the embedded broker), each with a
//! `{device}` and a `{command}` level.
//!
//! Invariants:
//! - a pattern has `{device}` and `{command}` exactly once each, as whole levels, and no
//!   wildcards or other placeholders (checked by [`CommandTopic::parse`]);
//! - a topic matches a pattern only with non-empty device and command levels, so
//!   [`CommandTopic::fill`] of what [`CommandTopic::parse_topic`] returned gives the topic back.

use std::fmt;

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Command,
}

/// A command topic pattern such as `devices/{device}/commands/{command}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTopic {
    levels: Vec<Level>,
}

impl CommandTopic {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<CommandTopic, String> {
        let mut levels = Vec::new();
        for level in text.split('/') {
            levels.push(match level {
                "{device}" => Level::Device,
                "{command}" => Level::Command,
                l if l.contains(['{', '}', '+', '#']) => {
                    return Err(format!(
                        "'{l}': levels are literals, {{device}} or {{command}}; no wildcards"
                    ))
                }
                l => Level::Literal(l.to_owned()),
            });
        }
        for (placeholder, want) in [("{device}", Level::Device), ("{command}", Level::Command)] {
            if levels.iter().filter(|l| **l == want).count() != 1 {
                return Err(format!("must contain {placeholder} once, as a whole level"));
            }
        }
        if text.starts_with('$') {
            return Err("must not start with '$'".into());
        }
        Ok(CommandTopic { levels })
    }

    /// The subscription filter covering every topic of the pattern.
    pub fn filter(&self) -> String {
        self.render("+", "+")
    }

    /// The topic of `command` for `device`.
    pub fn fill(&self, device: &str, command: &str) -> String {
        self.render(device, command)
    }

    /// The device and command of `topic`, when it matches the pattern.
    pub fn parse_topic<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.len() != self.levels.len() {
            return None;
        }
        let (mut device, mut command) = (None, None);
        for (level, part) in self.levels.iter().zip(parts) {
            match level {
                Level::Literal(l) if l == part => {}
                Level::Literal(_) => return None,
                Level::Device => device = Some(part),
                Level::Command => command = Some(part),
            }
        }
        let (device, command) = (device?, command?);
        (!device.is_empty() && !command.is_empty()).then_some((device, command))
    }

    /// Whether the subscription `filter` covers only commands of `device`: the pattern's
    /// levels with `device` at `{device}` and, at `{command}`, one command or `+`.
    pub fn is_device_filter(&self, filter: &str, device: &str) -> bool {
        let parts: Vec<&str> = filter.split('/').collect();
        parts.len() == self.levels.len()
            && self
                .levels
                .iter()
                .zip(parts)
                .all(|(level, part)| match level {
                    Level::Literal(l) => l == part,
                    Level::Device => part == device,
                    Level::Command => {
                        part == "+" || (!part.is_empty() && !part.contains(['+', '#']))
                    }
                })
    }

    fn render(&self, device: &str, command: &str) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device => device,
                Level::Command => command,
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

impl fmt::Display for CommandTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("{device}", "{command}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_fill_parse_and_filter() {
        let t = CommandTopic::parse("devices/{device}/commands/{command}").unwrap();
        assert_eq!(t.filter(), "devices/+/commands/+");
        assert_eq!(t.fill("t-1", "fan"), "devices/t-1/commands/fan");
        assert_eq!(
            t.parse_topic("devices/t-1/commands/fan"),
            Some(("t-1", "fan"))
        );
        assert_eq!(t.parse_topic("devices/t-1/commands/fan/x"), None);
        assert_eq!(t.parse_topic("devices//commands/fan"), None);
        assert_eq!(t.parse_topic("devicez/t-1/commands/fan"), None);
        assert_eq!(t.to_string(), "devices/{device}/commands/{command}");
    }

    #[test]
    fn device_filters_cover_only_the_devices_commands() {
        let t = CommandTopic::parse("devices/{device}/commands/{command}").unwrap();
        assert!(t.is_device_filter("devices/t-1/commands/+", "t-1"));
        assert!(t.is_device_filter("devices/t-1/commands/fan", "t-1"));
        assert!(!t.is_device_filter("devices/t-2/commands/+", "t-1"));
        assert!(!t.is_device_filter("devices/+/commands/+", "t-1"));
        assert!(!t.is_device_filter("devices/t-1/commands/#", "t-1"));
        assert!(!t.is_device_filter("devices/t-1/#", "t-1"));
        assert!(!t.is_device_filter("devices/t-1/commands/", "t-1"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "devices/{device}/commands",
            "devices/{device}/{command}/{device}",
            "devices/+/{device}/{command}",
            "devices/{device}/x{command}",
            "devices/{device}/{stream}/{command}",
            "$sys/{device}/{command}",
        ] {
            assert!(CommandTopic::parse(bad).is_err(), "{bad}");
        }
    }
}
