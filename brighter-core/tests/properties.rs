//! Property tests on what comes from the network: the header codec and the JSON
//! mapper take arbitrary keys, values and bodies (not UTF-8, huge, empty,
//! repeated) without panicking, and a header survives encode → decode.

#![allow(clippy::unwrap_used)]

use brighter_core::conformance::property_cases;
use brighter_core::{
    Error, JsonMapper, Message, MessageHeader, MessageMapper, MessageType, Request, wire,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: Uuid,
    sku: String,
    quantity: u32,
}
impl Request for Order {
    fn id(&self) -> Uuid {
        self.id
    }
}

/// Keys: mostly the codec's own (so their parsers are exercised), some free.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(wire::ID.to_owned()),
        Just(wire::TOPIC.to_owned()),
        Just(wire::MESSAGE_TYPE.to_owned()),
        Just(wire::TIMESTAMP.to_owned()),
        Just(wire::CORRELATION_ID.to_owned()),
        Just(wire::CONTENT_TYPE.to_owned()),
        Just(wire::PARTITION_KEY.to_owned()),
        Just(wire::HANDLED_COUNT.to_owned()),
        Just(wire::DELAY_MS.to_owned()),
        Just(wire::TRACEPARENT.to_owned()),
        Just(wire::BAGGAGE.to_owned()),
        Just("ce_source".to_owned()),
        Just("ce_id".to_owned()),
        Just("cloudEvents_time".to_owned()),
        ".{0,40}",
    ]
}

/// Values: valid ids and numbers, arbitrary text, arbitrary bytes.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Uuid::now_v7().to_string().into_bytes()),
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        ".{0,64}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(property_cases(2000)))]

    #[test]
    fn decoding_arbitrary_headers_never_panics(pairs in vec((key(), value()), 0..40)) {
        match wire::decode(pairs, |_| None) {
            Ok(header) => {
                prop_assert!(!header.id.is_nil(), "a decoded header has an id");
                prop_assert!(!header.topic.is_empty(), "a decoded header has a topic");
            }
            Err(error) => prop_assert!(matches!(error, Error::Mapping(_)), "{error}"),
        }
    }

    #[test]
    fn a_header_survives_encode_and_decode(
        topic in "[a-z][a-z0-9.-]{0,30}",
        partition_key in proptest::option::of(".{1,30}"),
        reply_to in proptest::option::of("[a-z.]{1,20}"),
        handled_count in any::<u32>(),
        bag in btree_map("[a-z][a-z0-9-]{0,20}", ".{0,40}", 0..10),
    ) {
        let mut header = MessageHeader::new(topic, MessageType::Event);
        header.partition_key = partition_key;
        header.reply_to = reply_to.map(Into::into);
        header.handled_count = handled_count;
        // Keys the codec owns are not free-form bag entries.
        header.bag = bag.into_iter().filter(|(k, _)| !wire::is_reserved(k)).collect();
        let decoded = wire::decode(wire::encode(&header, wire::CloudEventsBinding::Kafka), |_| None).unwrap();
        prop_assert_eq!(decoded.id, header.id);
        prop_assert_eq!(&decoded.topic, &header.topic);
        prop_assert_eq!(decoded.message_type, header.message_type);
        prop_assert_eq!(decoded.correlation_id, header.correlation_id);
        prop_assert_eq!(&decoded.partition_key, &header.partition_key);
        prop_assert_eq!(&decoded.reply_to, &header.reply_to);
        prop_assert_eq!(decoded.handled_count, header.handled_count);
        prop_assert_eq!(&decoded.bag, &header.bag);
    }

    #[test]
    fn mapping_arbitrary_bodies_never_panics(
        body in prop_oneof![vec(any::<u8>(), 0..256), ".{0,256}".prop_map(String::into_bytes)],
        content_type in prop_oneof![Just("application/json".to_owned()), ".{0,30}"],
    ) {
        let mut header = MessageHeader::new("orders", MessageType::Command);
        header.content_type = content_type.into();
        let message = Message::new(header, body);
        let mapped: Result<Order, Error> = JsonMapper.to_request(&message);
        if let Err(error) = mapped {
            prop_assert!(matches!(error, Error::Mapping(_)), "{error}");
        }
    }
}
