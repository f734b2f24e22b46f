//! Commands to a simulated device: the topics it subscribes to and what a command says.
//!
//! A device whose scenario has a `thermal` field listens on
//! `devices/{id}/commands/{switch}` for each switch its models read (the gateway's rule
//! actions publish there). A command turns the switch on or off.
//!
//! Input: the device id and its [`Switches`]; the topic and payload of a PUBLISH.
//! Output: topic filters to subscribe to; the switch and its new state.
//!
//! Invariant: a payload that says neither on nor off changes nothing (the driver counts
//! it as ignored), so a malformed command cannot flip a switch.

use crate::model::Switches;

/// The topic a device receives the commands for `switch` on.
pub fn command_topic(device: &str, switch: &str) -> String {
    format!("devices/{device}/commands/{switch}")
}

/// Every command topic of a device with these switches.
pub fn command_topics(device: &str, switches: &Switches) -> Vec<String> {
    switches.names().map(|s| command_topic(device, s)).collect()
}

/// The switch a command on `topic` is for, when `topic` is one of `device`'s command topics.
pub fn switch_of<'t>(device: &str, topic: &'t str) -> Option<&'t str> {
    topic
        .strip_prefix("devices/")?
        .strip_prefix(device)?
        .strip_prefix("/commands/")
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// What a command payload asks for: `{"on": true}` / `{"on": false}` (other keys are
/// ignored), a bare JSON `true` / `false`, or the text `on` / `off`.
pub fn parse_on(payload: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    match text {
        "on" | "ON" => return Some(true),
        "off" | "OFF" => return Some(false),
        _ => {}
    }
    match serde_json::from_str::<serde_json::Value>(text).ok()? {
        serde_json::Value::Bool(on) => Some(on),
        serde_json::Value::Object(map) => map.get("on")?.as_bool(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_say_on_or_off() {
        assert_eq!(parse_on(br#"{"on": true, "reason": "hot"}"#), Some(true));
        assert_eq!(parse_on(br#"{"on":false}"#), Some(false));
        assert_eq!(parse_on(b"true"), Some(true));
        assert_eq!(parse_on(b" off\n"), Some(false));
        assert_eq!(parse_on(b"on"), Some(true));
        assert_eq!(parse_on(br#"{"on": "yes"}"#), None);
        assert_eq!(parse_on(br#"{"speed": 3}"#), None);
        assert_eq!(parse_on(b"\xff"), None);
        assert_eq!(parse_on(b"1"), None);
    }

    #[test]
    fn topics_name_the_device_and_the_switch() {
        let switches = Switches::new(["fan".to_string()]);
        assert_eq!(
            command_topics("t-0001", &switches),
            ["devices/t-0001/commands/fan"]
        );
        assert_eq!(
            switch_of("t-0001", "devices/t-0001/commands/fan"),
            Some("fan")
        );
        assert_eq!(switch_of("t-0001", "devices/t-00011/commands/fan"), None);
        assert_eq!(switch_of("t-0001", "devices/t-0001/commands/fan/x"), None);
        assert_eq!(switch_of("t-0001", "devices/t-0001/telemetry"), None);
    }
}
