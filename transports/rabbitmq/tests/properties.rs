//! Property tests on what RabbitMQ hands the consumer: deliveries with arbitrary
//! properties and header tables (every AMQP value kind, nested tables, bytes
//! that are not UTF-8) decode or fail with a mapping error, never panic; a
//! message survives encode → decode.

#![allow(clippy::unwrap_used)]

use brighter_core::conformance::property_cases;
use brighter_core::{Error, Message, MessageHeader, MessageType, wire};
use brighter_rabbitmq::{decode_message, encode_properties};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use uuid::Uuid;

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(wire::ID.to_owned()),
        Just(wire::TOPIC.to_owned()),
        Just(wire::MESSAGE_TYPE.to_owned()),
        Just(wire::TIMESTAMP.to_owned()),
        Just(wire::CORRELATION_ID.to_owned()),
        Just(wire::HANDLED_COUNT.to_owned()),
        Just(wire::DELAY_MS.to_owned()),
        Just(wire::TRACEPARENT.to_owned()),
        "[ -~]{0,40}",
    ]
}

/// Every kind of AMQP field value, some nested.
fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        Just(AMQPValue::LongString(LongString::from(
            Uuid::now_v7().to_string()
        ))),
        vec(any::<u8>(), 0..64).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        ".{0,40}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<f64>().prop_map(AMQPValue::Double),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            vec(("[a-z]{1,8}", inner), 0..4).prop_map(|pairs| {
                let mut table = FieldTable::default();
                for (k, v) in pairs {
                    table.insert(ShortString::from(k), v);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(property_cases(2000)))]

    #[test]
    fn decoding_arbitrary_deliveries_never_panics(
        headers in proptest::option::of(vec((key(), value()), 0..30)),
        message_id in proptest::option::of(prop_oneof![Just(Uuid::now_v7().to_string()), ".{0,40}"]),
        correlation_id in proptest::option::of(".{0,40}"),
        kind in proptest::option::of(".{0,20}"),
        routing_key in ".{0,40}",
        body in vec(any::<u8>(), 0..256),
    ) {
        let mut properties = BasicProperties::default();
        if let Some(pairs) = headers {
            let mut table = FieldTable::default();
            for (k, v) in pairs {
                table.insert(ShortString::from(k), v);
            }
            properties = properties.with_headers(table);
        }
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(id.into());
        }
        if let Some(kind) = kind {
            properties = properties.with_type(kind.into());
        }
        match decode_message(&properties, &routing_key, body) {
            Ok(message) => prop_assert!(!message.id().is_nil()),
            Err(error) => prop_assert!(matches!(error, Error::Mapping(_)), "{error}"),
        }
    }

    #[test]
    fn a_message_survives_encode_and_decode(
        reply_to in proptest::option::of("[a-z.]{1,20}"),
        handled_count in any::<u32>(),
        bag in btree_map("[a-z][a-z0-9-]{0,20}", ".{0,40}", 0..10),
        body in vec(any::<u8>(), 0..256),
    ) {
        let mut header = MessageHeader::new("orders", MessageType::Event);
        header.reply_to = reply_to.map(Into::into);
        header.handled_count = handled_count;
        header.bag = bag.into_iter().filter(|(k, _)| !wire::is_reserved(k)).collect();
        let message = Message::new(header, body);
        let decoded =
            decode_message(&encode_properties(&message), "orders", message.body.to_vec()).unwrap();
        prop_assert_eq!(decoded.id(), message.id());
        prop_assert_eq!(decoded.header.message_type, message.header.message_type);
        prop_assert_eq!(decoded.header.correlation_id, message.header.correlation_id);
        prop_assert_eq!(&decoded.header.reply_to, &message.header.reply_to);
        prop_assert_eq!(decoded.header.handled_count, message.header.handled_count);
        prop_assert_eq!(&decoded.header.bag, &message.header.bag);
        prop_assert_eq!(&decoded.body, &message.body);
    }
}

#[test]
fn values_too_long_for_short_string_properties_travel_in_the_headers_without_a_panic() {
    for len in [255usize, 256, 1_000, 70_000] {
        let mut header = MessageHeader::new("orders", MessageType::Command);
        header.content_type = format!("application/json; pad={}", "a".repeat(len)).into();
        header.reply_to = Some("r".repeat(len + 1).into());
        let message = Message::new(header, "{}");
        let properties = encode_properties(&message);
        assert!(
            properties.content_type().is_none(),
            "{len}: left out of the short-string property"
        );
        assert!(properties.reply_to().is_none());
        assert!(properties.message_id().is_some(), "the short ones stay");
        let read = decode_message(&properties, "orders", b"{}".to_vec()).unwrap();
        assert_eq!(
            read.header.content_type, message.header.content_type,
            "{len}"
        );
        assert_eq!(read.header.reply_to, message.header.reply_to);
    }
    // At the limit, both places.
    let mut header = MessageHeader::new("orders", MessageType::Command);
    header.reply_to = Some("r".repeat(255).into());
    let properties = encode_properties(&Message::new(header, "{}"));
    assert_eq!(properties.reply_to().as_ref().unwrap().as_str().len(), 255);
}
