"""The other side of the CloudEvents interoperability tests
(bench/e2e/tests/cloudevents.rs): the CloudEvents Python SDK (PyPI package
`cloudevents`, its Kafka and AMQP protocol bindings) reading what brighter's
producers write, and writing events for brighter's pump, over real brokers
(confluent-kafka for Kafka, pika for RabbitMQ).

  read-kafka  BROKERS TOPIC COUNT        prints each event the SDK parsed, as JSON
  write-kafka BROKERS TOPIC EVENT_JSON   EVENT_JSON: {"attributes": {...}, "data": {...}}
  read-amqp   URL EXCHANGE ROUTING_KEY COUNT   prints "ready" once bound, then the events
  write-amqp  URL EXCHANGE ROUTING_KEY EVENT_JSON
  write-amqp-binary-name URL EXCHANGE ROUTING_KEY EVENT_JSON
              the same with one more header whose name is not UTF-8

An event is printed as {"attributes": {...}, "data": ...}: every attribute the
SDK's event has (time as ISO 8601), and the data it decoded.
"""

import json
import sys
import uuid
from datetime import datetime

from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def show(event):
    attributes = {}
    for name, value in event.get_attributes().items():
        attributes[name] = value.isoformat() if isinstance(value, datetime) else value
    print(json.dumps({"attributes": attributes, "data": event.get_data()}), flush=True)


def event_from(text):
    spec = json.loads(text)
    return CloudEvent(attributes=spec["attributes"], data=spec.get("data"))


def read_kafka(brokers, topic, count):
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"cloudevents-sdk-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    seen = 0
    try:
        while seen < count:
            record = consumer.poll(30.0)
            if record is None:
                sys.exit(f"no record on {topic} within 30 s ({seen} of {count})")
            if record.error():
                sys.exit(f"consume error: {record.error()}")
            headers = {k: (v or b"") for k, v in (record.headers() or [])}
            message = ce_kafka.KafkaMessage(headers=headers, key=record.key(), value=record.value())
            show(ce_kafka.from_binary(message, JSONFormat(), CloudEvent))
            seen += 1
    finally:
        consumer.close()


def write_kafka(brokers, topic, text):
    from confluent_kafka import Producer

    message = ce_kafka.to_binary(event_from(text), JSONFormat())
    producer = Producer({"bootstrap.servers": brokers})
    errors = []
    producer.produce(
        topic,
        value=message.value,
        key=message.key,
        headers=list(message.headers.items()),
        on_delivery=lambda err, _msg: err and errors.append(err),
    )
    if producer.flush(30.0) != 0 or errors:
        sys.exit(f"produce to {topic} failed: {errors}")


def read_amqp(url, exchange, routing_key, count):
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(exchange=exchange, passive=True)
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key)
    print("ready", flush=True)
    seen = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=30.0):
        if method is None:
            sys.exit(f"no message on {exchange}/{routing_key} within 30 s ({seen} of {count})")
        message = ce_amqp.AMQPMessage(
            properties={"content-type": properties.content_type} if properties.content_type else {},
            application_properties=dict(properties.headers or {}),
            application_data=body,
        )
        show(ce_amqp.from_binary(message, JSONFormat(), CloudEvent))
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if seen == count:
            break
    connection.close()


def write_amqp(url, exchange, routing_key, text, binary_name=False):
    import pika

    message = ce_amqp.to_binary(event_from(text), JSONFormat())
    headers = dict(message.application_properties)
    if binary_name:
        # A header name that is not UTF-8: AMQP short strings are bytes, and
        # pika writes a bytes name as it is.
        headers[b"\xffbinary\xfe"] = "kept"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=message.application_data,
        properties=pika.BasicProperties(
            content_type=message.properties.get("content-type"),
            headers=headers,
            delivery_mode=2,
        ),
        mandatory=True,
    )
    connection.close()


def main(argv):
    commands = {
        "read-kafka": lambda b, t, n: read_kafka(b, t, int(n)),
        "write-kafka": write_kafka,
        "read-amqp": lambda u, e, k, n: read_amqp(u, e, k, int(n)),
        "write-amqp": write_amqp,
        "write-amqp-binary-name": lambda u, e, k, t: write_amqp(u, e, k, t, binary_name=True),
    }
    if len(argv) < 2 or argv[1] not in commands:
        sys.exit(__doc__)
    commands[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
