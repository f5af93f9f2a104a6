//! The AsyncAPI document of a processor and dispatcher: servers from the
//! transports' endpoints, channels, operations and their bindings, messages
//! with their schemas and headers, the reply of `call`. (The official parser
//! validates every sample's document in scripts/test.)

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::schemars::JsonSchema;
use brighter_core::{
    AsyncApi, Channel, ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher,
    Endpoint, Error, Event, Handler, Message, Producer, Publication, RequestContext, Subscription,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Command, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "brighter_core::schemars")]
struct PlaceOrder {
    id: Uuid,
    #[brighter(partition_key)]
    sku: String,
}

#[derive(Event, Serialize, Deserialize)]
struct OrderPlaced {
    id: Uuid,
}

#[derive(Command, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "brighter_core::schemars")]
struct Quote {
    id: Uuid,
    cents: u64,
}

struct Handle;
impl Handler<PlaceOrder> for Handle {
    async fn handle(&self, _: &PlaceOrder, _: &mut RequestContext) -> Result<(), Error> {
        Ok(())
    }
}
impl Handler<OrderPlaced> for Handle {
    async fn handle(&self, _: &OrderPlaced, _: &mut RequestContext) -> Result<(), Error> {
        Ok(())
    }
}

/// A transport that only describes itself.
#[derive(Clone)]
struct Described(Endpoint);

#[async_trait]
impl Producer for Described {
    fn endpoint(&self) -> Option<Endpoint> {
        Some(self.0.clone())
    }
    async fn send(&self, _: &Message) -> Result<(), Error> {
        Ok(())
    }
}

#[async_trait]
impl ChannelFactory for Described {
    async fn create_channel(&self, _: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        Err(Error::configuration("describes only"))
    }
    fn endpoint(&self) -> Option<Endpoint> {
        Some(self.0.clone())
    }
}

fn document(endpoint: Endpoint) -> serde_json::Value {
    let transport = Described(endpoint);
    let processor = CommandProcessor::builder()
        .command::<PlaceOrder>(Handle)
        .event::<OrderPlaced>(Handle)
        .publication::<PlaceOrder>(Publication::command("orders.place").replies_with::<Quote>())
        .publication::<OrderPlaced>(Publication::event("orders.placed"))
        .producer(transport.clone())
        .reply_channels(transport.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<PlaceOrder>("placing", "orders.place", Arc::new(transport))
                .channel("orders.placing"),
        )
        .build()
        .unwrap();
    AsyncApi::new("orders", "1.2.3")
        .description("test")
        .processor(&processor)
        .dispatcher(&dispatcher)
        .document()
}

#[test]
fn an_amqp_service_is_described_with_its_exchange_queues_and_headers() {
    let doc = document(Endpoint {
        name: "rabbitmq".into(),
        host: "rabbit:5672".into(),
        protocol: "amqp".into(),
        pathname: Some("/shop".into()),
        exchange: Some(("shop".into(), "topic".into())),
        partitions: None,
    });
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["version"], "1.2.3");
    assert_eq!(
        doc["servers"]["rabbitmq"],
        serde_json::json!({"host": "rabbit:5672", "protocol": "amqp", "pathname": "/shop"})
    );
    let send = &doc["channels"]["orders.place"];
    assert_eq!(send["address"], "orders.place");
    assert_eq!(send["bindings"]["amqp"]["is"], "routingKey");
    assert_eq!(send["bindings"]["amqp"]["exchange"]["name"], "shop");
    assert_eq!(send["servers"][0]["$ref"], "#/servers/rabbitmq");
    let queue = &doc["channels"]["queue.orders.placing"];
    assert_eq!(queue["bindings"]["amqp"]["queue"]["name"], "orders.placing");
    let receive = &doc["operations"]["receive.placing"];
    assert_eq!(receive["action"], "receive");
    assert_eq!(
        receive["channel"]["$ref"],
        "#/channels/queue.orders.placing"
    );
    assert_eq!(doc["operations"]["send.PlaceOrder"]["action"], "send");
    assert_eq!(doc["operations"]["send.OrderPlaced"]["action"], "send");
    // The reply of call: a channel with no fixed address, named by the header.
    let reply = &doc["operations"]["send.PlaceOrder"]["reply"];
    assert_eq!(
        reply["address"]["location"],
        "$message.header#/x-brighter-reply-to"
    );
    assert_eq!(
        doc["channels"]["replies"]["address"],
        serde_json::Value::Null
    );
    assert_eq!(
        doc["components"]["messages"]["Quote"]["payload"]["properties"]["cents"]["type"],
        "integer"
    );
    let place = &doc["components"]["messages"]["PlaceOrder"];
    assert_eq!(place["payload"]["properties"]["sku"]["type"], "string");
    assert_eq!(place["headers"]["$ref"], "#/components/schemas/AmqpHeaders");
    let headers = &doc["components"]["schemas"]["AmqpHeaders"]["properties"];
    for name in [
        "x-brighter-id",
        "x-brighter-correlation-id",
        "traceparent",
        "cloudEvents_type",
    ] {
        assert!(headers.get(name).is_some(), "header {name}");
    }
    // A type without a schema still has a payload, which says so.
    let placed = &doc["components"]["messages"]["OrderPlaced"]["payload"];
    assert!(
        placed["description"]
            .as_str()
            .unwrap()
            .contains("no schemars::JsonSchema")
    );
}

#[test]
fn a_kafka_service_is_described_with_its_topics_groups_and_keys() {
    let doc = document(Endpoint {
        name: "kafka".into(),
        host: "k1:9092,k2:9092".into(),
        protocol: "kafka".into(),
        pathname: None,
        exchange: None,
        partitions: Some((6, 3)),
    });
    assert_eq!(doc["servers"]["kafka"]["host"], "k1:9092,k2:9092");
    let topic = &doc["channels"]["orders.place"]["bindings"]["kafka"];
    assert_eq!(topic["topic"], "orders.place");
    assert_eq!(topic["partitions"], 6);
    assert_eq!(topic["replicas"], 3);
    let receive = &doc["operations"]["receive.placing"];
    assert_eq!(
        receive["bindings"]["kafka"]["groupId"]["enum"][0],
        "orders.placing"
    );
    assert_eq!(receive["channel"]["$ref"], "#/channels/orders.place");
    let place = &doc["components"]["messages"]["PlaceOrder"];
    assert_eq!(place["bindings"]["kafka"]["key"]["type"], "string");
    assert_eq!(
        place["headers"]["$ref"],
        "#/components/schemas/KafkaHeaders"
    );
    assert!(doc["components"]["schemas"]["KafkaHeaders"]["properties"]["ce_type"].is_object());
}
