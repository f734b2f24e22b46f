use super::*;
use crate::reading::Value;

const NOW: Millis = 1_764_235_200_000;

fn pattern() -> TopicPattern {
    TopicPattern::parse("devices/{device}/{stream}").unwrap()
}

fn one(payload: &[u8], content_type: Option<&str>) -> Result<Vec<Reading>, DecodeError> {
    decode(
        &pattern(),
        "devices/t-1/telemetry",
        payload,
        content_type,
        NOW,
    )
}

fn num(r: &Reading, field: &str) -> f64 {
    r.fields[field].as_f64().unwrap()
}

#[test]
fn json_object_with_and_without_time() {
    let r = &one(br#"{"temperature":21.5,"ok":true,"label":"a"}"#, None).unwrap()[0];
    assert_eq!((r.device.as_str(), r.stream.as_str()), ("t-1", "telemetry"));
    assert_eq!(r.time, NOW);
    assert_eq!(num(r, "temperature"), 21.5);
    assert_eq!(r.fields["ok"], Value::Bool(true));
    assert_eq!(r.fields["label"], Value::Text("a".into()));
    assert_eq!(r.format, Format::Json);

    let ms = &one(br#"{"ts":1764235201123,"t":1}"#, None).unwrap()[0];
    assert_eq!(ms.time, 1_764_235_201_123);
    let secs = &one(br#"{"time":1764235201.5,"t":1}"#, None).unwrap()[0];
    assert_eq!(secs.time, 1_764_235_201_500);
    let text = &one(br#"{"ts":"2025-11-27T09:20:01+01:00","t":1}"#, None).unwrap()[0];
    assert_eq!(text.time, 1_764_231_601_000);
}

#[test]
fn json_nested_objects_are_flattened_and_nulls_skipped() {
    let r = &one(br#"{"env":{"t":1,"h":{"rel":2}},"gone":null}"#, None).unwrap()[0];
    assert_eq!(num(r, "env.t"), 1.0);
    assert_eq!(num(r, "env.h.rel"), 2.0);
    assert!(!r.fields.contains_key("gone"));
}

#[test]
fn cbor_map() {
    let mut map = std::collections::BTreeMap::new();
    map.insert("temperature", serde_cbor::Value::Float(22.25));
    map.insert("ts", serde_cbor::Value::Integer(1_764_235_202_000));
    let bytes = serde_cbor::to_vec(&map).unwrap();
    let r = &one(&bytes, None).unwrap()[0];
    assert_eq!(r.format, Format::Cbor);
    assert_eq!(num(r, "temperature"), 22.25);
    assert_eq!(r.time, 1_764_235_202_000);
}

#[test]
fn senml_json_resolves_base_fields() {
    let pack = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"bu":"%RH","v":20.0,"n":"humidity"},
        {"n":"temperature","u":"Cel","v":23.1},
        {"n":"humidity","v":21.0,"t":60}]"#;
    let rs = one(pack, None).unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].time, 1_320_067_464_000);
    assert_eq!(num(&rs[0], "humidity"), 20.0);
    assert_eq!(num(&rs[0], "temperature"), 23.1);
    assert_eq!(rs[0].units["humidity"], "%RH");
    assert_eq!(rs[0].units["temperature"], "Cel");
    assert_eq!(rs[1].time, 1_320_067_524_000);
    assert_eq!(num(&rs[1], "humidity"), 21.0);
    assert_eq!(rs[0].format, Format::SenmlJson);
}

#[test]
fn senml_relative_time_and_values() {
    let rs = one(br#"[{"n":"a","v":1,"t":-5},{"n":"b","vb":false,"t":-5},{"n":"c","vs":"x","t":-5},{"n":"e","s":3,"t":-5}]"#, None).unwrap();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].time, NOW - 5000);
    assert_eq!(rs[0].fields["b"], Value::Bool(false));
    assert_eq!(rs[0].fields["c"], Value::Text("x".into()));
    assert_eq!(num(&rs[0], "e.sum"), 3.0);
    let bv = one(br#"[{"bv":10,"n":"a","v":1.5}]"#, None).unwrap();
    assert_eq!(num(&bv[0], "a"), 11.5);
}

#[test]
fn senml_cbor_integer_labels() {
    use serde_cbor::Value as V;
    let rec = |pairs: Vec<(i128, V)>| {
        V::Map(pairs.into_iter().map(|(k, v)| (V::Integer(k), v)).collect())
    };
    let pack = V::Array(vec![
        rec(vec![
            (-2, V::Text("t-1/".into())),
            (-3, V::Float(1_764_235_200.25)),
            (0, V::Text("temperature".into())),
            (1, V::Text("Cel".into())),
            (2, V::Float(30.5)),
        ]),
        rec(vec![(0, V::Text("door".into())), (4, V::Bool(true))]),
    ]);
    let bytes = serde_cbor::to_vec(&pack).unwrap();
    let rs = one(&bytes, None).unwrap();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].format, Format::SenmlCbor);
    assert_eq!(rs[0].time, 1_764_235_200_250);
    assert_eq!(num(&rs[0], "temperature"), 30.5);
    assert_eq!(rs[0].fields["door"], Value::Bool(true));
}

#[test]
fn content_type_overrides_sniffing() {
    let err = one(br#"{"t":1}"#, Some("application/senml+json")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("senml-json: expected a SenML pack"),
        "{err}"
    );
    assert!(one(br#"{"t":1}"#, Some("application/json; charset=utf-8")).is_ok());
    assert!(one(br#"{"t":1}"#, Some("application/x-unknown")).is_ok());
}

#[test]
fn malformed_inputs_are_errors_not_panics() {
    let deep_json = "[".repeat(10_000);
    let mut deep_cbor = vec![0x81u8; 10_000];
    deep_cbor.push(0x01);
    let huge = vec![b'a'; 1 << 20];
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "empty payload"),
        (b"not json {", "neither JSON"),
        (b"{\"t\":", "invalid JSON"),
        (b"{}", "no fields"),
        (b"{\"t\":[1,2]}", "array values are not supported"),
        (b"{\"ts\":\"yesterday\",\"t\":1}", "RFC 3339"),
        (b"[]", "empty SenML pack"),
        (b"[1]", "expected a map"),
        (b"[{\"v\":1}]", "no name"),
        (b"[{\"n\":\"a\"}]", "no record with a value"),
        (b"[{\"n\":\"a\",\"v\":\"x\"}]", "must be a number"),
        (b"[{\"n\":\"a\",\"v\":1,\"x_\":1}]", "mandatory field"),
        (deep_json.as_bytes(), "JSON nested deeper than 32 levels"),
        (&deep_cbor, "senml-cbor"),
        (&huge, "neither JSON"),
        (&[0xa1, 0x61], "invalid CBOR"),
        (&[0xbf], "invalid CBOR"),
    ];
    for (payload, expected) in cases {
        let err = one(payload, None).expect_err(expected).to_string();
        assert!(
            err.contains(expected),
            "payload {:?}: got '{err}', expected '{expected}'",
            String::from_utf8_lossy(&payload[..payload.len().min(20)])
        );
    }
}

#[test]
fn json_is_accepted_up_to_the_depth_limit_and_refused_past_it() {
    // Objects nested so that the innermost value sits at `depth`.
    let nested = |depth: usize| format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    let deepest = &one(nested(MAX_DEPTH).as_bytes(), None).unwrap()[0];
    let name = vec!["a"; MAX_DEPTH].join(".");
    assert_eq!(num(deepest, &name), 1.0);
    let err = one(nested(MAX_DEPTH + 1).as_bytes(), None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("json: invalid JSON: JSON nested deeper than 32 levels"),
        "{err}"
    );
}

#[test]
fn json_numbers_and_repeated_keys() {
    let r = &one(
        br#"{"big":18446744073709551615,"neg":-3,"f":2.5e3,"t":1,"t":2}"#,
        None,
    )
    .unwrap()[0];
    assert_eq!(num(r, "big"), 18_446_744_073_709_551_615u64 as f64);
    assert_eq!(num(r, "neg"), -3.0);
    assert_eq!(num(r, "f"), 2500.0);
    // A repeated key keeps its last value.
    assert_eq!(num(r, "t"), 2.0);
    // Trailing bytes after the document are refused, as before.
    let err = one(br#"{"t":1} x"#, None).unwrap_err();
    assert!(err.to_string().contains("trailing characters"), "{err}");
}

#[test]
fn topic_outside_the_pattern_is_an_error() {
    let err = decode(&pattern(), "elsewhere/x", b"{\"t\":1}", None, NOW).unwrap_err();
    assert_eq!(err, DecodeError::Topic("elsewhere/x".into()));
}

/// The tree path for a JSON object: what `decode` did for every JSON object before the
/// direct path (`object::decode_json`), and still does when that one declines.
fn through_the_tree(payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
    let format = Format::Json;
    let mut base = one(br#"{"x":1}"#, None).unwrap().remove(0);
    base.fields.clear();
    base.time = NOW;
    let tree = parse(format, payload).map_err(|reason| DecodeError::invalid(format, reason))?;
    object::decode(tree, base)
        .map(|r| vec![r])
        .map_err(|reason| DecodeError::invalid(format, reason))
}

#[test]
fn a_json_object_decodes_straight_as_it_does_through_the_tree() {
    let deep_ok = format!("{}1{}", r#"{"a":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
    let too_deep = format!(
        "{}1{}",
        r#"{"a":"#.repeat(MAX_DEPTH + 1),
        "}".repeat(MAX_DEPTH + 1)
    );
    let cases: Vec<Vec<u8>> = [
        r#"{"ts":1764235200123,"seq":42,"temperature":21.5,"humidity":40.1}"#,
        r#"{"time":1764235201.5,"t":-3,"ok":false,"label":"a\"b","n":null}"#,
        r#"{"env":{"t":1,"deep":{"h":2,"ts":5}},"ts":"2025-11-27T09:20:01+01:00"}"#,
        r#"{"":{"ts":1764235201,"x":1},"y":2}"#,
        r#"{"a":1,"a":{"b":2},"a":3,"ts":1,"ts":1764235202}"#,
        r#"{"t\u00e9":1,"\n":"\u00e9","big":18446744073709551615,"neg":-9223372036854775808}"#,
        r#"  {"t":1}  "#,
        r#"{"t":1} x"#,
        r#"{"t":[1,2]}"#,
        r#"{"t":1e400}"#,
        r#"{"ts":"yesterday","t":1}"#,
        r#"{"ts":-1,"t":1}"#,
        r#"{"n":null}"#,
        r#"{}"#,
        r#"{"t":1"#,
        r#"{"t":{}}"#,
        r#"{"t":1,}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([deep_ok.into_bytes(), too_deep.into_bytes()])
    .collect();
    for payload in cases {
        let text = String::from_utf8_lossy(&payload).into_owned();
        let tree = through_the_tree(&payload);
        assert_eq!(one(&payload, None), tree, "{text}");
        // What the tree decodes, the direct path decodes too (rather than declining),
        // also into a reading with an earlier message's fields.
        let earlier = one(br#"{"t":"x","a":2,"zz":1,"env.t":false}"#, None).unwrap();
        for mut reading in [
            earlier[0].clone(),
            Reading {
                fields: Default::default(),
                ..earlier[0].clone()
            },
        ] {
            reading.time = NOW;
            let taken = object::decode_json(&payload, MAX_DEPTH, &mut reading).is_some();
            assert_eq!(taken, tree.is_ok(), "{text}");
            match &tree {
                Ok(tree) => assert_eq!(&reading, &tree[0], "{text}"),
                Err(_) => assert!(reading.fields.is_empty() && reading.time == NOW, "{text}"),
            }
        }
    }
}

#[test]
fn a_reading_kept_for_reuse_decodes_the_next_message_as_a_new_one_would() {
    // Each message decoded into readings taken from the spare ones (left over from the
    // message before: other device, stream, fields, units, format) equals the same
    // message decoded afresh.
    let messages: [(&str, &[u8]); 10] = [
        (
            "devices/boiler-room-7/heating",
            br#"[{"bn":"b/","n":"t","u":"Cel","v":61.5},{"n":"p","u":"bar","v":1.9}]"#,
        ),
        ("devices/t-1/telemetry", br#"{"temperature":21.5}"#),
        (
            "devices/t-22/env",
            br#"{"ts":1764235201123,"h":40,"ok":true}"#,
        ),
        ("devices/x/y", &[0xa1, 0x61, 0x74, 0x01]),
        ("devices/t-1/telemetry", br#"{"env":{"t":1},"x":"s"}"#),
        (
            "devices/t-1/telemetry",
            br#"{"x":"s","env":{"t":2,"u":"v"}}"#,
        ),
        (
            "devices/t-1/telemetry",
            br#"{"a":1,"a":{"b":2},"a":3,"x":null}"#,
        ),
        ("devices/t-1/telemetry", br#"{"a":null,"x":true,"a.b":"c"}"#),
        ("devices/t-1/telemetry", br#"{"t":1,"h":2,"p":3,"q":4}"#),
        ("devices/t-1/telemetry", br#"{"t":5}"#),
    ];
    let mut spare = Spare::default();
    let mut out = Vec::new();
    for round in 0..2 {
        for (topic, payload) in messages {
            let fresh = decode(&pattern(), topic, payload, None, NOW).unwrap();
            let kept = spare.readings.len();
            decode_into(&pattern(), topic, payload, None, NOW, &mut out, &mut spare).unwrap();
            assert_eq!(out, fresh, "{topic}");
            if round == 1 {
                assert!(
                    spare.readings.len() < kept,
                    "a kept reading was used for {topic}"
                );
            }
            spare.keep(out.drain(..));
        }
    }
    // A message that does not decode adds nothing.
    let bad = decode_into(
        &pattern(),
        "devices/t-1/telemetry",
        br#"{"t":[1]}"#,
        None,
        NOW,
        &mut out,
        &mut spare,
    );
    assert!(bad.is_err() && out.is_empty());

    // The same keys again keep their entries: no key is allocated anew. The kept
    // reading's keys get room a new key would not have, so that the decoded reading
    // shows whose keys it holds.
    let same = br#"{"t":1,"h":2}"#;
    spare.clear();
    decode_into(
        &pattern(),
        "devices/t-1/telemetry",
        same,
        None,
        NOW,
        &mut out,
        &mut spare,
    )
    .unwrap();
    for reading in &mut out {
        reading.fields = (reading.fields.iter())
            .map(|(key, value)| {
                let mut roomy = String::with_capacity(64);
                roomy.push_str(key);
                (roomy, value.clone())
            })
            .collect();
    }
    spare.keep(out.drain(..));
    decode_into(
        &pattern(),
        "devices/t-2/telemetry",
        same,
        None,
        NOW,
        &mut out,
        &mut spare,
    )
    .unwrap();
    assert!(
        out[0].fields.keys().all(|key| key.capacity() == 64),
        "{:?}",
        out[0]
    );
    out.clear();

    // A reading with a long topic is not kept; none is kept past the limit.
    let long = format!("devices/{}/telemetry", "d".repeat(Spare::LONGEST));
    let mut long_one = decode(&pattern(), &long, br#"{"t":1}"#, None, NOW).unwrap();
    spare.clear();
    spare.keep(long_one.drain(..));
    assert!(spare.readings.is_empty());
    let many = vec![one(br#"{"t":1}"#, None).unwrap().remove(0); Spare::KEEP + 10];
    spare.keep(many.into_iter());
    assert_eq!(spare.readings.len(), Spare::KEEP);
}
