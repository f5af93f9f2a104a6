//! Kafka transport (rdkafka) for brighter: producer and consumer channel. Not built yet: see the Kafka transport issue.
