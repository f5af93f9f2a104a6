//! `#[derive(Command)]`, `#[derive(Event)]` and `#[derive(Request)]`.

#![allow(clippy::unwrap_used)]

use brighter_core::{Command, Event, Request};
use uuid::Uuid;

#[derive(Command)]
struct ReserveStock {
    id: Uuid,
    #[brighter(partition_key)]
    sku: u32,
}

#[derive(Event)]
struct StockReserved {
    #[brighter(id)]
    reservation: Uuid,
}

#[derive(Request)]
struct Lookup {
    id: Uuid,
}

fn is_command<C: brighter_core::Command>(_: &C) {}
fn is_event<E: brighter_core::Event>(_: &E) {}

#[test]
fn derived_requests_take_their_id_and_partition_key_from_fields() {
    let id = Uuid::now_v7();
    let reserve = ReserveStock { id, sku: 42 };
    is_command(&reserve);
    assert_eq!(reserve.id(), id);
    assert_eq!(reserve.partition_key().as_deref(), Some("42"));

    let reserved = StockReserved { reservation: id };
    is_event(&reserved);
    assert_eq!(reserved.id(), id);
    assert_eq!(reserved.partition_key(), None);

    assert_eq!(Lookup { id }.id(), id);
}

/// Described: it derives `JsonSchema` too.
#[derive(Command, brighter_core::schemars::JsonSchema)]
#[schemars(crate = "brighter_core::schemars")]
#[allow(dead_code)]
struct PlaceOrder {
    id: Uuid,
    sku: String,
    quantity: u32,
    gift: Option<Wrapping>,
}

#[derive(brighter_core::schemars::JsonSchema)]
#[schemars(crate = "brighter_core::schemars")]
#[allow(dead_code)]
struct Wrapping {
    colour: String,
}

#[test]
fn a_request_deriving_json_schema_has_its_schema_others_none() {
    let schema = PlaceOrder::json_schema().expect("a schema");
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["properties"]["id"]["format"], "uuid");
    assert_eq!(schema["properties"]["quantity"]["type"], "integer");
    let required = schema["required"].as_array().expect("required");
    assert!(required.iter().any(|r| r == "sku"));
    let text = schema.to_string();
    assert!(!text.contains("$ref"), "subschemas are inlined: {text}");
    assert!(!text.contains("$schema"), "{text}");
    assert!(
        text.contains("colour"),
        "the nested type is inlined: {text}"
    );
    assert!(ReserveStock::json_schema().is_none());
    assert!(Lookup::json_schema().is_none());
}
