use serde_json::Value as Json;

use super::*;

fn session(generation: u64, since: Millis) -> Session {
    Session {
        generation,
        since,
        mqtt5: false,
        keep_alive: 60,
        clean_session: true,
    }
}

fn connected(generation: u64, since: Millis) -> Change {
    Change::Connected {
        client_id: "t-17".into(),
        session: session(generation, since),
    }
}

fn disconnected(generation: u64, since: Millis, reason: DisconnectReason) -> Change {
    Change::Disconnected {
        client_id: "t-17".into(),
        session: session(generation, since),
        reason,
    }
}

fn json(event: &Event<DeviceData>) -> Json {
    serde_json::from_slice(&event.to_json()).unwrap()
}

#[test]
fn a_connect_is_a_cloudevent_with_the_connections_settings() {
    let event = device_event("gw-1", &connected(7, 1_700_000_000_123), 1_700_000_000_500);
    let j = json(&event);
    assert_eq!(j["specversion"], "1.0");
    assert_eq!(j["type"], "DeviceConnected");
    assert_eq!(j["source"], "gateway/gw-1/devices");
    assert_eq!(j["subject"], "t-17");
    // The time the connection's report arrived, not when the event was built.
    assert_eq!(j["time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(j["datacontenttype"], "application/json");
    assert_eq!(j["replayed"], false);
    assert_eq!(
        j["data"],
        serde_json::json!({"state": "connected", "device": "t-17", "client_id": "t-17",
            "protocol": "3.1.1", "keep_alive": 60, "clean_session": true})
    );
    assert_eq!(j["id"].as_str().unwrap().len(), 32);
}

#[test]
fn a_disconnect_says_why_and_since_when() {
    let change = disconnected(7, 1_700_000_000_123, DisconnectReason::KeepAliveExpired);
    let event = device_event("gw-1", &change, 1_700_000_060_000);
    let j = json(&event);
    assert_eq!(j["type"], "DeviceDisconnected");
    assert_eq!(j["time"], "2023-11-14T22:14:20.000Z");
    assert_eq!(j["data"]["state"], "disconnected");
    assert_eq!(j["data"]["reason"], "keep_alive_expired");
    assert_eq!(j["data"]["connected_since"], "2023-11-14T22:13:20.123Z");
    let back = Event::<DeviceData>::from_json(&event.to_json()).unwrap();
    assert_eq!(back, event);
}

#[test]
fn ids_are_stable_per_connection_and_differ_between_events() {
    let up = device_event("gw-1", &connected(7, 1_000), 1_000);
    assert_eq!(up.id, device_event("gw-1", &connected(7, 1_000), 5_000).id);
    let ids = [
        up.id.clone(),
        device_event("gw-1", &connected(8, 1_000), 1_000).id,
        device_event("gw-1", &connected(7, 1_001), 1_001).id,
        device_event("gw-2", &connected(7, 1_000), 1_000).id,
        device_event(
            "gw-1",
            &disconnected(7, 1_000, DisconnectReason::Clean),
            1_000,
        )
        .id,
    ];
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
}

#[test]
fn the_local_topic_uses_the_event_type_device_and_state() {
    let up = device_event("gw-1", &connected(1, 0), 0);
    assert_eq!(
        up.local_topic(crate::events::DEFAULT_LOCAL_TOPIC),
        "events/DeviceConnected/t-17"
    );
    let down = device_event("gw-1", &disconnected(1, 0, DisconnectReason::Lost), 0);
    assert_eq!(
        down.local_topic("alerts/{rule}/{state}"),
        "alerts/device/disconnected"
    );
}

#[test]
fn stats_count_by_reason_and_know_who_is_connected() {
    let (hook, _rx) = PresenceHook::bounded(1);
    let stats = DeviceEventStats::new(hook);
    stats.record(&connected(1, 50));
    assert_eq!(stats.connected_since("t-17"), Some(50));
    stats.record(&disconnected(1, 50, DisconnectReason::Lost));
    assert_eq!(stats.connected_since("t-17"), None);
    assert_eq!(stats.connects(), 1);
    assert_eq!(stats.disconnects(DisconnectReason::Lost), 1);
    assert_eq!(stats.disconnects(DisconnectReason::Clean), 0);
}
