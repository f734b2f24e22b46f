use super::*;
use crate::decode::TopicPattern;
use test_support::wait_until;

fn setup(devices: &[&str]) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.passwd");
    let mut creds = Credentials::default();
    let passwords = devices.iter().map(|d| creds.add(d).unwrap()).collect();
    creds.save(&path).unwrap();
    (dir, path, passwords)
}

#[tokio::test]
async fn right_password_is_accepted_then_served_from_the_cache() {
    let (_dir, path, pw) = setup(&["t-1"]);
    let auth = Authenticator::start(&path).unwrap();
    assert_eq!(auth.check("t-1", "t-1", &pw[0]).await, Ok(()));
    assert_eq!(auth.stats().cached.load(Ordering::Relaxed), 0);
    assert_eq!(auth.check("t-1", "t-1", &pw[0]).await, Ok(()));
    assert_eq!(auth.stats().cached.load(Ordering::Relaxed), 1);
    assert_eq!(auth.stats().accepted.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn wrong_password_unknown_device_and_foreign_client_id_are_refused() {
    let (_dir, path, pw) = setup(&["t-1", "t-2"]);
    let auth = Authenticator::start(&path).unwrap();
    assert_eq!(
        auth.check("t-1", "t-1", "nope").await,
        Err(Denied::Password)
    );
    assert_eq!(
        auth.check("t-1", "t-1", &pw[1]).await,
        Err(Denied::Password)
    );
    assert_eq!(
        auth.check("t-9", "t-9", &pw[0]).await,
        Err(Denied::UnknownDevice)
    );
    assert_eq!(
        auth.check("t-2", "t-1", &pw[0]).await,
        Err(Denied::ClientId)
    );
    // A cached success for t-1 does not let a wrong password in.
    assert_eq!(auth.check("t-1", "t-1", &pw[0]).await, Ok(()));
    assert_eq!(
        auth.check("t-1", "t-1", "nope").await,
        Err(Denied::Password)
    );
    assert_eq!(auth.stats().refused(), 5);
}

#[tokio::test]
async fn file_changes_are_picked_up_and_a_removed_device_loses_its_cache() {
    let (_dir, path, pw) = setup(&["t-1"]);
    let auth = Authenticator::start(&path).unwrap();
    assert_eq!(auth.check("t-1", "t-1", &pw[0]).await, Ok(()));

    let mut creds = Credentials::load(&path).unwrap();
    let new_pw = creds.add("t-2").unwrap();
    assert!(creds.remove("t-1"));
    creds.save(&path).unwrap();
    wait_until("reload", Duration::from_secs(10), || {
        auth.device_count() == 1 && auth.stats().reloads.load(Ordering::Relaxed) == 1
    });
    assert_eq!(auth.check("t-2", "t-2", &new_pw).await, Ok(()));
    assert_eq!(
        auth.check("t-1", "t-1", &pw[0]).await,
        Err(Denied::UnknownDevice)
    );

    // A broken edit keeps the credentials in force.
    std::fs::write(&path, "t-3:plaintext\n").unwrap();
    std::thread::sleep(RELOAD_INTERVAL * 3);
    assert!(auth.reload().is_err());
    assert_eq!(auth.check("t-2", "t-2", &new_pw).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_passwords_is_bounded_and_does_not_delay_cached_devices() {
    let (_dir, path, pw) = setup(&["t-1"]);
    let auth = Authenticator::start(&path).unwrap();
    assert_eq!(auth.check("t-1", "t-1", &pw[0]).await, Ok(()));
    let flood = VERIFY_QUEUE + VERIFIER_THREADS + 30;
    let tasks: Vec<_> = (0..flood)
        .map(|i| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.check("t-1", "t-1", &format!("guess-{i}")).await })
        })
        .collect();
    // Let the flood fill the queue, then a known device reconnects.
    wait_until("the flood to queue", Duration::from_secs(10), || {
        auth.stats().refused_busy.load(Ordering::Relaxed) > 0
    });
    assert_eq!(auth.check("t-1", "t-1", &pw[0]).await, Ok(()));
    let still_verifying = tasks.iter().filter(|t| !t.is_finished()).count();
    assert!(
        still_verifying > 0,
        "the cached check should not wait for the flood"
    );
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            Err(Denied::Busy) => busy += 1,
            Err(Denied::Password) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        busy >= flood - VERIFY_QUEUE - VERIFIER_THREADS,
        "busy {busy} of {flood}"
    );
    assert_eq!(
        auth.stats().refused_busy.load(Ordering::Relaxed),
        busy as u64
    );
}

#[test]
fn a_device_may_publish_on_its_own_topics_and_subscribe_to_its_own_events() {
    use rumqttd::Access::{Publish, Subscribe};
    let patterns = TopicPatterns::new(vec![
        TopicPattern::parse("site/{device}/{stream}").unwrap(),
        TopicPattern::parse("plant/{device}").unwrap(),
    ])
    .unwrap();
    let commands = CommandTopic::parse("devices/{device}/commands/{command}").unwrap();
    let allow = topic_authorizer(patterns, "events/{type}/{device}", commands);
    // Either pattern, with the device's own id.
    assert!(allow("t-1", Publish, "plant/t-1"));
    assert!(!allow("t-1", Publish, "plant/t-2"));
    assert!(allow("t-1", Publish, "site/t-1/telemetry"));
    assert!(allow("t-1", Publish, "site/t-1/status"));
    assert!(!allow("t-1", Publish, "site/t-2/telemetry"));
    assert!(!allow("t-1", Publish, "site/t-1"));
    assert!(!allow(
        "t-1",
        Publish,
        "events/SensorTemperatureExceeded/t-1"
    ));
    assert!(!allow("t-1", Publish, "elsewhere"));
    assert!(allow("t-1", Subscribe, "events/+/t-1"));
    assert!(!allow("t-1", Subscribe, "events/+/t-2"));
    assert!(!allow("t-1", Subscribe, "events/#"));
    assert!(!allow("t-1", Subscribe, "site/+/telemetry"));
    assert!(allow("t-1", Subscribe, "devices/t-1/commands/+"));
    assert!(allow("t-1", Subscribe, "devices/t-1/commands/fan"));
    assert!(!allow("t-1", Subscribe, "devices/t-2/commands/+"));
    assert!(!allow("t-1", Subscribe, "devices/+/commands/+"));
}
