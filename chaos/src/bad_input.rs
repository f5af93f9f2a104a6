//! Case 4: a corpus of malformed messages, written with the raw clients and
//! interleaved with good ones. Each bad one must land in the invalid-message
//! channel (or, for the repeated id, the dead-letter channel) with its reason;
//! every good one must be handled once; the pump must not panic or restart.

use std::collections::HashMap;
use std::time::Duration;

use brighter_core::pipeline::OnDuplicate;
use brighter_core::{Dispatcher, Message, wire};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use crate::Outcome;
use crate::rig::{Res, Rig, Transport, ping_message, wait_until};

/// The subscription's body limit in this case.
const MAX_BODY: usize = 64 * 1024;
const GOOD: u64 = 100;

/// A message as raw header pairs and body.
#[derive(Clone)]
struct Raw {
    name: &'static str,
    pairs: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Where it must land: "dead-letter" or "invalid"; `None` for a good one.
    expect: Option<&'static str>,
    /// Published by the `deep` worker process (RabbitMQ only), not here.
    deep: bool,
}

fn pairs(message: &Message) -> Vec<(String, Vec<u8>)> {
    wire::encode(&message.header, wire::CloudEventsBinding::Kafka)
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect()
}

fn with(mut pairs: Vec<(String, Vec<u8>)>, key: &str, value: &[u8]) -> Vec<(String, Vec<u8>)> {
    pairs.retain(|(k, _)| k != key);
    pairs.push((key.to_owned(), value.to_vec()));
    pairs
}

fn without(mut pairs: Vec<(String, Vec<u8>)>, key: &str) -> Vec<(String, Vec<u8>)> {
    pairs.retain(|(k, _)| k != key);
    pairs
}

/// The bad messages; `original` is a good message already in the stream.
fn corpus(topic: &str, original: &Message) -> Vec<Raw> {
    let fresh = |seq| ping_message(topic, seq);
    let id = || Uuid::now_v7().to_string();
    let bad = |name, pairs, body: Vec<u8>| Raw {
        name,
        pairs,
        body,
        expect: Some("invalid"),
        deep: false,
    };
    // Headers of a good message, with a new id, around a body that is wrong.
    let around = |body: String| {
        let m = fresh(0);
        (pairs(&m), body.into_bytes())
    };
    let mut raws = Vec::new();
    let mut push = |name, (pairs, body): (Vec<(String, Vec<u8>)>, Vec<u8>)| {
        raws.push(bad(name, pairs, body));
    };
    push(
        "invalid JSON",
        around(format!("{{\"id\": \"{}\", \"seq\": ", id())),
    );
    push(
        "wrong schema",
        around(format!("{{\"id\": 42, \"seq\": \"{}\"}}", id())),
    );
    push(
        "unknown type",
        around(format!("{{\"sku\": \"{}\", \"quantity\": 1}}", id())),
    );
    push("missing field", around(format!("{{\"id\": \"{}\"}}", id())));
    push(
        "null id",
        around(format!("{{\"id\": null, \"seq\": 1, \"n\": \"{}\"}}", id())),
    );
    push(
        "negative number",
        around(format!("{{\"id\": \"{}\", \"seq\": -1}}", id())),
    );
    push(
        "number out of range",
        around(format!("{{\"id\": \"{}\", \"seq\": 1e400}}", id())),
    );
    push(
        "lone surrogate",
        around(format!("{{\"id\": \"\\ud800{}\", \"seq\": 1}}", id())),
    );
    push(
        "trailing garbage",
        around(format!("{{\"id\": \"{}\", \"seq\": 1}} garbage", id())),
    );
    push(
        "byte-order mark",
        around(format!("\u{feff}{{\"id\": \"{}\", \"seq\": 1}}", id())),
    );
    push("JSON null", around("null".into()));
    push("JSON array", around(format!("[\"{}\"]", id())));
    push("JSON string", around(format!("\"{}\"", id())));
    push(
        "nesting 100,000 deep",
        around(format!("{}{}", "[".repeat(100_000), id())),
    );
    push("XML", around(format!("<ping id=\"{}\" seq=\"1\"/>", id())));
    push("empty body", around(String::new()));
    let m = fresh(0);
    let binary: Vec<u8> = [&[0u8, 0xff, 0xfe, 0x80, 0xc3, 0x28][..], m.id().as_bytes()].concat();
    push("binary body", (pairs(&m), binary));
    // Broken headers around a good body.
    let m = fresh(0);
    push(
        "missing id",
        (without(pairs(&m), wire::ID), m.body.to_vec()),
    );
    let m = fresh(0);
    push(
        "id not a UUID",
        (with(pairs(&m), wire::ID, b"not-a-uuid"), m.body.to_vec()),
    );
    let m = fresh(0);
    push(
        "empty id",
        (with(pairs(&m), wire::ID, b""), m.body.to_vec()),
    );
    let m = fresh(0);
    push(
        "non-UTF-8 header value",
        (
            with(pairs(&m), wire::CORRELATION_ID, &[0xff, 0xfe, 0x80]),
            m.body.to_vec(),
        ),
    );
    let m = fresh(0);
    push(
        "non-UTF-8 message type",
        (
            with(pairs(&m), wire::MESSAGE_TYPE, &[0xc3, 0x28]),
            m.body.to_vec(),
        ),
    );
    let m = fresh(0);
    let mut many = pairs(&m);
    many.extend((0..2_000).map(|i| (format!("x-junk-{i}"), b"1".to_vec())));
    push("2,000 headers", (many, m.body.to_vec()));
    let m = fresh(0);
    let padded = format!(
        "{{\"id\": \"{}\", \"seq\": 1, \"pad\": \"{}\"}}",
        m.id(),
        "x".repeat(MAX_BODY * 3)
    );
    push("body over the size limit", (pairs(&m), padded.into_bytes()));
    // Hostile header values (issue 23): too long for AMQP short strings,
    // absurd numbers and times, huge or malformed trace and CloudEvents
    // fields. Each rides on a body that is not JSON, so it must be parked as
    // invalid; what is tested is that the copy the pump writes survives its
    // headers (no panic, no refused copy, no loop).
    let hostile: Vec<(&'static str, String, Vec<u8>)> = vec![
        (
            "content type of 1 KB",
            wire::CONTENT_TYPE.into(),
            format!("application/x-{}", "a".repeat(1_000)).into_bytes(),
        ),
        ("empty content type", wire::CONTENT_TYPE.into(), Vec::new()),
        (
            "reply-to of 300 B",
            wire::REPLY_TO.into(),
            "r".repeat(300).into_bytes(),
        ),
        (
            "reply-to of 64 KB",
            wire::REPLY_TO.into(),
            "r".repeat(64 * 1024).into_bytes(),
        ),
        (
            "topic header of 300 B",
            wire::TOPIC.into(),
            "t".repeat(300).into_bytes(),
        ),
        (
            "id of 1 KB",
            wire::ID.into(),
            "i".repeat(1_000).into_bytes(),
        ),
        (
            "correlation id of 1 KB",
            wire::CORRELATION_ID.into(),
            "c".repeat(1_000).into_bytes(),
        ),
        (
            "message type of 500 B",
            wire::MESSAGE_TYPE.into(),
            "m".repeat(500).into_bytes(),
        ),
        (
            "partition key of 10 KB",
            wire::PARTITION_KEY.into(),
            "k".repeat(10_000).into_bytes(),
        ),
        (
            "handled count of 20 digits",
            wire::HANDLED_COUNT.into(),
            b"99999999999999999999".to_vec(),
        ),
        (
            "negative handled count",
            wire::HANDLED_COUNT.into(),
            b"-5".to_vec(),
        ),
        (
            "delay of 10^18 ms",
            wire::DELAY_MS.into(),
            b"1000000000000000000".to_vec(),
        ),
        ("negative delay", wire::DELAY_MS.into(), b"-1000".to_vec()),
        (
            "timestamp not a time",
            wire::TIMESTAMP.into(),
            b"yesterday".to_vec(),
        ),
        (
            "timestamp in year 9999999",
            wire::TIMESTAMP.into(),
            b"9999999-01-01T00:00:00Z".to_vec(),
        ),
        (
            "traceparent of 10 KB",
            wire::TRACEPARENT.into(),
            "00-".repeat(3_400).into_bytes(),
        ),
        (
            "tracestate of 10 KB",
            wire::TRACESTATE.into(),
            "k=v,".repeat(2_500).into_bytes(),
        ),
        (
            "CloudEvents source of 5 KB",
            "ce_source".into(),
            "s".repeat(5_000).into_bytes(),
        ),
        (
            "CloudEvents type with control bytes",
            "ce_type".into(),
            b"\x00\x01\x1b[2J".to_vec(),
        ),
        ("header key of 255 B", "k".repeat(255), b"v".to_vec()),
        (
            "foreign header of 64 KB",
            "x-foreign".into(),
            "f".repeat(64 * 1024).into_bytes(),
        ),
    ];
    for (name, key, value) in hostile {
        let m = fresh(0);
        push(
            name,
            (
                with(pairs(&m), &key, &value),
                format!("not JSON {}", id()).into_bytes(),
            ),
        );
    }
    let m = fresh(0);
    let mut wide = pairs(&m);
    wide.extend((0..200).map(|i| (format!("x-wide-{i}"), vec![b'w'; 500])));
    push(
        "200 headers of 500 B",
        (wide, format!("not JSON {}", id()).into_bytes()),
    );
    // Copies a few bytes over the broker's limit (issue 23, class 2): the
    // original's headers fill RabbitMQ's default frame (128 KiB) but for
    // about 200 bytes, so the invalid copy with its reason would not fit; it
    // must be parked without them. On Kafka the same message is far inside
    // the limit and parks as it is.
    let m = fresh(0);
    let mut edge = pairs(&m);
    let used: usize = edge.iter().map(|(k, v)| 1 + k.len() + 5 + v.len()).sum();
    let fill = 131_072 - 20 - 200 - used;
    edge.push(("x-fill".into(), vec![b'f'; fill - (1 + 6 + 5) - 64]));
    push(
        "headers a reason short of a frame",
        (edge, format!("not JSON {}", id()).into_bytes()),
    );
    // The same id as a good message, another body: a duplicate.
    let repeat = serde_json::json!({"id": original.id(), "seq": 999_999}).to_string();
    raws.push(Raw {
        name: "repeated id",
        pairs: pairs(original),
        body: repeat.into_bytes(),
        expect: Some("dead-letter"),
        deep: false,
    });
    raws
}

/// Good messages with the bad ones spread among them; the repeated id last.
fn stream(topic: &str) -> (Vec<Raw>, usize) {
    let messages: Vec<Message> = (0..GOOD).map(|seq| ping_message(topic, seq)).collect();
    let good: Vec<Raw> = messages
        .iter()
        .map(|m| Raw {
            name: "good",
            pairs: pairs(m),
            body: m.body.to_vec(),
            expect: None,
            deep: false,
        })
        .collect();
    let original = &messages[0];
    let bad = corpus(topic, original);
    let count = bad.len();
    let mut all = Vec::new();
    let mut bad = bad.into_iter();
    for (i, g) in good.into_iter().enumerate() {
        all.push(g);
        if i % 4 == 3
            && let Some(b) = bad.next()
        {
            all.push(b);
        }
    }
    all.extend(bad);
    (all, count)
}

async fn publish_kafka(rig: &Rig, raws: &[Raw]) -> Res<()> {
    let producer: FutureProducer = rig.kafka_config().client().create()?;
    for raw in raws {
        let mut headers = OwnedHeaders::new_with_capacity(raw.pairs.len());
        for (key, value) in &raw.pairs {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        // Keyed by the id header, so the repeated id follows its original.
        let key = raw
            .pairs
            .iter()
            .find(|(k, _)| k == wire::ID)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        producer
            .send(
                FutureRecord::to(&rig.topic)
                    .payload(&raw.body)
                    .key(&key)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn publish_rabbit(rig: &Rig, raws: &[Raw]) -> Res<()> {
    let channel = rig.rabbit().channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for raw in raws.iter().filter(|r| !r.deep) {
        let mut table = FieldTable::default();
        for (key, value) in &raw.pairs {
            table.insert(
                ShortString::from(key.as_str()),
                AMQPValue::LongString(LongString::from(value.clone())),
            );
        }
        // Publishers set these properties too; the missing-id message has none.
        let mut properties = BasicProperties::default()
            .with_headers(table)
            .with_delivery_mode(2);
        if let Some((_, id)) = raw.pairs.iter().find(|(k, _)| k == wire::ID) {
            // A publisher cannot set a property over 255 bytes: the long id
            // goes in the headers only.
            if let Some(id) = std::str::from_utf8(id)
                .ok()
                .and_then(|id| ShortString::try_new(id).ok())
            {
                properties = properties.with_message_id(id);
            }
        }
        let confirm = channel
            .basic_publish(
                rig.exchange.as_str().into(),
                rig.topic.as_str().into(),
                BasicPublishOptions::default(),
                &raw.body,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            return Err(format!("RabbitMQ refused '{}'", raw.name).into());
        }
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(())
}

/// Case 4 on `transport`.
pub(crate) async fn bad_input(transport: Transport) -> Res<Outcome> {
    let rig = Rig::new(transport, "bad").await?;
    rig.prepare().await?;
    rig.create_effects().await?;
    let (mut raws, mut bad) = stream(&rig.topic);
    if transport == Transport::Rabbit {
        // Header tables nested 1,000 deep (issue 23, class 3): lapin's reader
        // overflowed its I/O thread's stack on them and aborted the process.
        // Its writer is recursive too, so a worker with a large stack sends it.
        raws.push(Raw {
            name: "header tables nested 1,000 deep",
            pairs: Vec::new(),
            body: format!("not JSON {}", Uuid::now_v7()).into_bytes(),
            expect: Some("invalid"),
            deep: true,
        });
        bad += 1;
    }
    let dispatcher = Dispatcher::builder(rig.consumer(OnDuplicate::Error).await?)
        .subscription(rig.subscription()?.max_body_size(MAX_BODY))
        .build()?;
    dispatcher.start().await?;
    match transport {
        Transport::Kafka => publish_kafka(&rig, &raws).await?,
        Transport::Rabbit => {
            publish_rabbit(&rig, &raws).await?;
            for raw in raws.iter().filter(|r| r.deep) {
                let body = String::from_utf8_lossy(&raw.body).into_owned();
                let status = rig
                    .spawn_with(
                        "deep",
                        &[("RUST_MIN_STACK", "268435456"), ("CHAOS_DEEP_BODY", &body)],
                    )?
                    .wait()
                    .await?;
                if !status.success() {
                    return Err(format!("the deep-table publisher failed: {status}").into());
                }
            }
        }
    }
    let parked_count = || {
        dispatcher
            .health()
            .first()
            .map(|h| h.dead_lettered + h.invalid)
            .unwrap_or(0)
    };
    let settled = wait_until(Duration::from_secs(120), || async {
        rig.handled().await >= GOOD && parked_count() >= bad as u64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = dispatcher.health().pop().ok_or("no subscription health")?;
    dispatcher.shutdown().await;
    let (rows, distinct) = rig.effects().await?;

    // Read both parking places and match each bad message by its body.
    let [dlq, invalid] = rig.parking();
    let mut landed: HashMap<Vec<u8>, (&'static str, Option<String>)> = HashMap::new();
    for (place, source) in [("dead-letter", &dlq), ("invalid", &invalid)] {
        for received in rig.read_all(source, Duration::from_secs(3)).await? {
            landed.insert(received.body, (place, received.reason));
        }
    }
    let mut wrong = Vec::new();
    for raw in raws.iter().filter(|r| r.expect.is_some()) {
        match landed.remove(&raw.body) {
            Some((place, Some(reason))) if Some(place) == raw.expect && !reason.is_empty() => {}
            Some((place, reason)) => wrong.push(format!("{} in {place} ({reason:?})", raw.name)),
            None => wrong.push(format!("{}: not parked", raw.name)),
        }
    }
    let stray = landed.len();
    rig.drop_schema().await;
    let passed = settled
        && wrong.is_empty()
        && stray == 0
        && rows as u64 == GOOD
        && distinct as u64 == GOOD
        && health.restarts == 0
        && health.is_healthy();
    let mut counts = format!(
        "{GOOD} good handled {rows}x ({distinct} distinct); {bad} bad: {} invalid, {} dead-lettered, {stray} good ones parked; {} pump restarts",
        health.invalid, health.dead_lettered, health.restarts
    );
    if !wrong.is_empty() {
        counts.push_str(&format!("; wrong: {}", wrong.join(", ")));
    }
    Ok(Outcome::new(passed, counts))
}

/// The `deep` worker: publishes one message whose headers hold field tables
/// nested 1,000 deep, with the body in `CHAOS_DEEP_BODY`, to the rig's topic.
pub(crate) async fn deep_worker() -> Res<()> {
    let rig = Rig::from_env().await?;
    let body = std::env::var("CHAOS_DEEP_BODY")?;
    let m = ping_message(&rig.topic, 0);
    let mut table = FieldTable::default();
    for _ in 0..1_000 {
        let mut outer = FieldTable::default();
        outer.insert("a".into(), AMQPValue::FieldTable(table));
        table = outer;
    }
    let mut headers = FieldTable::default();
    for (key, value) in pairs(&m) {
        headers.insert(
            ShortString::from(key.as_str()),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    headers.insert("x-deep".into(), AMQPValue::FieldTable(table));
    let channel = rig.rabbit().channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_publish(
            rig.exchange.as_str().into(),
            rig.topic.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await?
        .await?;
    Ok(())
}
