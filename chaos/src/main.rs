//! # chaos
//!
//! The reliability suite behind `scripts/chaos`: each case runs the framework
//! against the local Postgres, RabbitMQ and Kafka-protocol broker, breaks
//! something (kills a process, restarts a service, sends garbage), and checks
//! what a user would: nothing lost, nothing done twice, bad input parked with its
//! reason, memory flat.
//!
//! ```text
//! chaos sweeper-kill  --transport kafka|rabbitmq [--messages N] [--kills K]
//! chaos consumer-kill --transport kafka|rabbitmq [--messages N] [--kills K]
//! chaos scheduled-kill --transport kafka|rabbitmq [--messages N] [--seconds S]
//! chaos saga-kill     --transport kafka|rabbitmq [--messages N] [--kills K] [--seconds S]
//! chaos restart       --service rabbitmq|kafka|postgres [--messages N]
//! chaos bad-input     --transport kafka|rabbitmq
//! chaos soak          [--seconds S] [--rate R]
//! ```
//!
//! Each prints one line, `<case> <target>: <counts>: pass` (or `FAIL`), and
//! exits 0 when the case passed, 1 when it failed.

#![allow(clippy::print_stdout)]

mod bad_input;
mod kill;
mod restart;
mod rig;
mod saga;
mod soak;

use std::process::ExitCode;
use std::time::Duration;

use rig::{Res, Transport};

/// What a case found.
pub(crate) struct Outcome {
    passed: bool,
    counts: String,
}

impl Outcome {
    pub(crate) fn new(passed: bool, counts: String) -> Outcome {
        Outcome { passed, counts }
    }
}

/// `--name value` from the arguments.
fn option(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number(args: &[String], name: &str, default: u64) -> Res<u64> {
    match option(args, name) {
        None => Ok(default),
        Some(value) => value
            .parse()
            .map_err(|_| format!("{name} must be a whole number, got '{value}'").into()),
    }
}

fn transport(args: &[String]) -> Res<Transport> {
    Transport::parse(&option(args, "--transport").ok_or("--transport kafka|rabbitmq is required")?)
}

async fn run(args: &[String]) -> Res<(String, Outcome)> {
    let case = args.first().map(String::as_str).unwrap_or_default();
    let messages = |default| number(args, "--messages", default);
    let kills = || number(args, "--kills", 5).map(|k| u32::try_from(k).unwrap_or(u32::MAX));
    Ok(match case {
        "sweeper-kill" => {
            let t = transport(args)?;
            let outcome = kill::sweeper_kill(t, messages(20_000)?, kills()?).await?;
            (format!("sweeper-kill {}", t.name()), outcome)
        }
        "consumer-kill" => {
            let t = transport(args)?;
            let outcome = kill::consumer_kill(t, messages(20_000)?, kills()?).await?;
            (format!("consumer-kill {}", t.name()), outcome)
        }
        "scheduled-kill" => {
            let t = transport(args)?;
            let ahead = Duration::from_secs(number(args, "--seconds", 30)?);
            let outcome = kill::scheduled_kill(t, messages(1_000)?, ahead).await?;
            (format!("scheduled-kill {}", t.name()), outcome)
        }
        "saga-kill" => {
            let t = transport(args)?;
            let kills = kills()?;
            // Long enough for every saga to finish first: on Kafka each kill
            // stalls the consumer groups for a session timeout (10 s).
            let default = match t {
                Transport::Kafka => 45 + 15 * u64::from(kills),
                Transport::Rabbit => 45,
            };
            let timeout = Duration::from_secs(number(args, "--seconds", default)?);
            let outcome = saga::saga_kill(t, messages(2_000)?, kills, timeout).await?;
            (format!("saga-kill {}", t.name()), outcome)
        }
        "restart" => {
            let service = restart::Service::parse(
                &option(args, "--service")
                    .ok_or("--service rabbitmq|kafka|postgres is required")?,
            )?;
            let outcome = restart::restart(service, messages(6_000)?).await?;
            (format!("restart {}", service.name()), outcome)
        }
        "bad-input" => {
            let t = transport(args)?;
            (
                format!("bad-input {}", t.name()),
                bad_input::bad_input(t).await?,
            )
        }
        "soak" => {
            let seconds = number(args, "--seconds", 300)?;
            let rate = number(args, "--rate", 200)?;
            (format!("soak {seconds}s"), soak::soak(seconds, rate).await?)
        }
        other => {
            return Err(format!("unknown case '{other}'; see the crate docs for the cases").into());
        }
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chaos: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    if args.first().map(String::as_str) == Some("worker") {
        let role = args.get(1).map(String::as_str).unwrap_or_default();
        let result = runtime.block_on(async {
            match role {
                "sweep" => kill::sweep_worker().await,
                "consume" => kill::consume_worker().await,
                "saga" => saga::saga_worker().await,
                "deep" => bad_input::deep_worker().await,
                other => Err(format!("unknown worker '{other}'").into()),
            }
        });
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("chaos worker {role}: {error}");
                ExitCode::from(2)
            }
        };
    }
    match runtime.block_on(run(&args)) {
        Ok((name, outcome)) => {
            let verdict = if outcome.passed { "pass" } else { "FAIL" };
            println!("{name}: {}: {verdict}", outcome.counts);
            if outcome.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            println!("{}: FAIL ({error})", args.join(" "));
            ExitCode::FAILURE
        }
    }
}
