//! What the command line's tests share: running `brighter`, and waiting.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

/// What a run of `brighter` printed, and whether it succeeded.
pub(crate) struct Run {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) ok: bool,
}

impl Run {
    /// Its standard output as JSON (run with `--json`).
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `brighter ARGS` with this process's environment (`DATABASE_URL`,
/// `AMQP_ADDR`, `KAFKA_BROKERS`) and `env` on top, and prints what it
/// printed. A run that has not ended in two minutes is killed and fails the
/// test: the command line must end on its own.
pub(crate) async fn brighter(args: &[&str], env: &[(&str, &str)]) -> Run {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_brighter"))
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("`brighter {}` did not end in two minutes", args.join(" ")))
        .unwrap();
    let run = Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        ok: output.status.success(),
    };
    println!(
        "$ brighter {}\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    run
}

/// Waits until `done` holds (checking every 100 ms), failing after `limit`.
pub(crate) async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pool on `DATABASE_URL`.
pub(crate) async fn pool() -> brighter::sqlx::PgPool {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    brighter::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap()
}

/// A fresh name: lower-case letters and digits.
pub(crate) fn fresh(prefix: &str) -> String {
    let id = brighter::uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[id.len() - 12..])
}

/// One scalar of `sql`.
pub(crate) async fn scalar(pool: &brighter::sqlx::PgPool, sql: &str) -> i64 {
    brighter::sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}
