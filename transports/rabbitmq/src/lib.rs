//! RabbitMQ transport (lapin) for brighter: producer and consumer channel. Not built yet: see the RabbitMQ transport issue.
