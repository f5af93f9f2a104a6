//! Property tests on what a Kafka broker hands the consumer: records with
//! arbitrary headers (any key, any bytes, null values, repeats), keys and
//! payloads decode or fail with a mapping error, never panic; a message survives
//! the producer's headers → record → decode.

#![allow(clippy::unwrap_used)]

use brighter_core::conformance::property_cases;
use brighter_core::{Error, Message, MessageHeader, MessageType, wire};
use brighter_kafka::{decode_record, encode_headers};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use uuid::Uuid;

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(wire::ID.to_owned()),
        Just(wire::TOPIC.to_owned()),
        Just(wire::MESSAGE_TYPE.to_owned()),
        Just(wire::TIMESTAMP.to_owned()),
        Just(wire::CORRELATION_ID.to_owned()),
        Just(wire::PARTITION_KEY.to_owned()),
        Just(wire::HANDLED_COUNT.to_owned()),
        Just(wire::DELAY_MS.to_owned()),
        Just(wire::TRACEPARENT.to_owned()),
        ".{0,40}",
    ]
}

fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(prop_oneof![
        Just(Uuid::now_v7().to_string().into_bytes()),
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        ".{0,64}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..64),
    ])
}

fn record(
    headers: Option<OwnedHeaders>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
) -> OwnedMessage {
    OwnedMessage::new(
        payload,
        key,
        "orders".into(),
        Timestamp::NotAvailable,
        0,
        0,
        headers,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(property_cases(2000)))]

    #[test]
    fn decoding_arbitrary_records_never_panics(
        pairs in proptest::option::of(vec((key(), value()), 0..40)),
        key in proptest::option::of(vec(any::<u8>(), 0..40)),
        payload in proptest::option::of(vec(any::<u8>(), 0..256)),
    ) {
        let headers = pairs.map(|pairs| {
            pairs.iter().fold(OwnedHeaders::new(), |headers, (k, v)| {
                headers.insert(Header { key: k, value: v.as_deref() })
            })
        });
        match decode_record(&record(headers, key, payload)) {
            Ok(message) => prop_assert!(!message.id().is_nil()),
            Err(error) => prop_assert!(matches!(error, Error::Mapping(_)), "{error}"),
        }
    }

    #[test]
    fn a_message_survives_the_producer_headers_and_decode(
        partition_key in proptest::option::of("[a-z0-9-]{1,30}"),
        handled_count in any::<u32>(),
        bag in btree_map("[a-z][a-z0-9-]{0,20}", ".{0,40}", 0..10),
        body in vec(any::<u8>(), 0..256),
    ) {
        let mut header = MessageHeader::new("orders", MessageType::Command);
        header.partition_key = partition_key.clone();
        header.handled_count = handled_count;
        header.bag = bag.into_iter().filter(|(k, _)| !wire::is_reserved(k)).collect();
        let message = Message::new(header, body);
        let sent = record(
            Some(encode_headers(&message)),
            partition_key.map(String::into_bytes),
            Some(message.body.to_vec()),
        );
        let decoded = decode_record(&sent).unwrap();
        prop_assert_eq!(decoded.id(), message.id());
        prop_assert_eq!(&decoded.header.topic, &message.header.topic);
        prop_assert_eq!(decoded.header.correlation_id, message.header.correlation_id);
        prop_assert_eq!(&decoded.header.partition_key, &message.header.partition_key);
        prop_assert_eq!(decoded.header.handled_count, message.header.handled_count);
        prop_assert_eq!(&decoded.header.bag, &message.header.bag);
        prop_assert_eq!(&decoded.body, &message.body);
    }
}
