//! `brighter`: operating services built with brighter, from a terminal.
//!
//! - `brighter outbox stats|list|show|parked|requeue|purge-dispatched`: a
//!   service's Postgres outbox (`DATABASE_URL`, `--schema`);
//! - `brighter dlq --transport rabbitmq|kafka list|show|replay CHANNEL`: a
//!   subscription's dead-letter queue (`AMQP_ADDR`) or topic
//!   (`KAFKA_BROKERS`); replay sends messages back to the subscription that
//!   dead-lettered them, with their headers, once;
//! - `brighter activity CORRELATION_ID --service NAME=SCHEMA ...`: one
//!   conversation rebuilt from the services' outboxes and inboxes;
//! - `brighter asyncapi URL|FILE`: a service's AsyncAPI document, summarized.
//!
//! Tables by default, `--json` for scripts. Connection settings come from the
//! environment variables the samples use; credentials are never printed.
//!
//! Install with: cargo install brighter-cli

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod activity;
mod asyncapi;
mod dlq;
mod outbox;
mod report;

use std::process::ExitCode;

use brighter::uuid::Uuid;
use clap::{Parser, Subcommand, ValueEnum};

use report::Report;

/// Operates services built with brighter: outboxes, dead-letter channels,
/// conversations, AsyncAPI documents.
#[derive(Debug, Parser)]
#[command(name = "brighter", version)]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A service's Postgres outbox (DATABASE_URL).
    Outbox {
        /// The outbox's schema.
        #[arg(long, default_value = "brighter")]
        schema: String,
        /// The outbox's table.
        #[arg(long, default_value = "outbox")]
        table: String,
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// A subscription's dead-letter channel: a RabbitMQ queue (AMQP_ADDR) or a
    /// Kafka topic (KAFKA_BROKERS).
    Dlq {
        /// The broker.
        #[arg(long, value_enum)]
        transport: Transport,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// One conversation, rebuilt from the outboxes and inboxes of the services
    /// it crossed (one database, DATABASE_URL; a schema per service).
    Activity {
        /// The conversation's correlation id.
        correlation_id: Uuid,
        /// A service and the schema of its outbox and inbox, e.g. orders=orders_prod.
        #[arg(long = "service", value_name = "NAME=SCHEMA", required = true)]
        services: Vec<String>,
        /// The outbox tables' name.
        #[arg(long, default_value = "outbox")]
        outbox_table: String,
        /// The inbox tables' name.
        #[arg(long, default_value = "inbox")]
        inbox_table: String,
    },
    /// A service's AsyncAPI document, from a URL (e.g. http://shop:8080/asyncapi.json)
    /// or a file: its servers, channels and operations (the document itself with --json).
    Asyncapi {
        /// Where the document is.
        source: String,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxAction {
    /// Rows by state and topic, and the age of the oldest outstanding one.
    Stats,
    /// Rows, oldest first.
    List {
        /// all, outstanding, scheduled, parked or dispatched.
        #[arg(long, default_value = "all")]
        state: String,
        /// Only this topic's.
        #[arg(long)]
        topic: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One message: its state, every header field, its body.
    Show {
        /// The message id.
        id: Uuid,
    },
    /// Messages parked after failing to send too often, with their last error.
    Parked {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Puts parked messages back in line for the sweeper.
    Requeue {
        /// The message ids.
        #[arg(required = true)]
        ids: Vec<Uuid>,
    },
    /// Deletes messages dispatched longer ago than --older-than.
    PurgeDispatched {
        /// e.g. 7d, 12h, 30m.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// What is in CHANNEL's dead-letter queue or topic (nothing is taken out).
    List {
        /// The subscription's channel: its queue (RabbitMQ) or consumer group (Kafka).
        channel: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter: its reason, headers and body.
    Show {
        /// The subscription's channel.
        channel: String,
        /// The message id.
        id: Uuid,
    },
    /// Sends dead letters back to the subscription that dead-lettered them,
    /// with their headers, once: all of them (not replayed before), or those
    /// named.
    Replay {
        /// The subscription's channel.
        channel: String,
        /// Only these message ids.
        ids: Vec<Uuid>,
    },
}

/// A broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// RabbitMQ at AMQP_ADDR.
    Rabbitmq,
    /// Kafka at KAFKA_BROKERS.
    Kafka,
}

/// Errors of the command line: the framework's, or of its own.
type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn run(cli: Cli) -> Res<Report> {
    match cli.command {
        Command::Outbox {
            schema,
            table,
            action,
        } => outbox::run(&schema, &table, action).await,
        Command::Dlq { transport, action } => dlq::run(transport, action).await,
        Command::Activity {
            correlation_id,
            services,
            outbox_table,
            inbox_table,
        } => activity::run(correlation_id, &services, &outbox_table, &inbox_table).await,
        Command::Asyncapi { source } => asyncapi::run(&source).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(report) => {
            report.print(json);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", report::redacted(&error.to_string()));
            ExitCode::FAILURE
        }
    }
}
