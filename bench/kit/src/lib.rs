//! What the benchmarks share: the median of runs, the `--quick` flag, and
//! [`record`], which prints a scenario's figures and, when `BENCH_RESULTS`
//! names a file, appends them to it as one JSON object per line for
//! `scripts/bench` to turn into `bench/results.json`, `BENCHMARKS.md` and the
//! chart. Every figure is ours against a baseline measured in the same run.

#![deny(unsafe_code)]
#![allow(clippy::print_stdout)]

use std::io::Write;

/// The process's CPU time so far: user and system time of every thread,
/// including threads that have exited (librdkafka's, lapin's, tokio's), from
/// `getrusage(RUSAGE_SELF)`. The difference over a run divided by its messages
/// is the client CPU per message.
pub fn cpu_time() -> std::time::Duration {
    // SAFETY: getrusage only writes the struct it is given, which is zeroed
    // and lives for the call.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return std::time::Duration::ZERO;
        }
        usage
    };
    let time = |t: libc::timeval| {
        std::time::Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + std::time::Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A throughput run: messages (or transactions) per second, and the client
/// CPU per message in microseconds.
pub type Run = (f64, f64);

/// The [`Run`] of `n` messages handled since `start`, with [`cpu_time`] at
/// `start` being `cpu`.
pub fn rate_and_cpu(n: usize, start: std::time::Instant, cpu: std::time::Duration) -> Run {
    let spent = cpu_time().saturating_sub(cpu);
    (
        n as f64 / start.elapsed().as_secs_f64(),
        spent.as_secs_f64() * 1e6 / n.max(1) as f64,
    )
}

/// The median rate and the median CPU per message of `runs`.
pub fn medians(runs: Vec<Run>) -> Run {
    let (rates, cpus): (Vec<f64>, Vec<f64>) = runs.into_iter().unzip();
    (median(rates), median(cpus))
}

/// Prints and records ours against one baseline, both [`Run`]s: the rate row
/// (`<what> vs <baseline>`, msg/s) and its client CPU row.
pub fn record_runs(
    what: &str,
    baseline: &str,
    (ours, base): (Run, Run),
    (rate_goal, cpu_goal): (Goal, Goal),
    note: &str,
) {
    println!(
        "  {what}: ours {:>8.0} msg/s {:.2} µs CPU/msg   {baseline}: {:>8.0} msg/s {:.2} µs CPU/msg   ratio {:.2}, CPU {:.2}",
        ours.0,
        ours.1,
        base.0,
        base.1,
        ours.0 / base.0,
        ours.1 / base.1
    );
    let name = format!("{what} vs {baseline}");
    record(&name, ours.0, base.0, "msg/s", rate_goal, note);
    record_cpu(&name, ours.1, base.1, cpu_goal, note);
}

/// Records the client CPU per message of a scenario, ours against the
/// baseline, as a row of its own named `<name>: client CPU per message`.
pub fn record_cpu(name: &str, ours_us: f64, baseline_us: f64, goal: Goal, note: &str) {
    record(
        &format!("{name}: client CPU per message"),
        ours_us,
        baseline_us,
        "µs/msg",
        goal,
        note,
    );
}

/// Records a figure whose goal is absolute (at most `at_most` `unit`): its
/// baseline column is the goal, so the ratio is at most 1 when it is met.
pub fn record_absolute(name: &str, ours: f64, unit: &str, at_most: f64, note: &str) {
    record(
        &format!("{name} (baseline: the goal)"),
        ours,
        at_most,
        unit,
        Goal::AtMost(1.0),
        note,
    );
}

/// The environment variable naming the file results are appended to.
pub const RESULTS_VAR: &str = "BENCH_RESULTS";

/// The `main` of a benchmark run with `harness = false`: answers cargo's
/// `--list` with `name`, else runs `run(quick)` on a multi-threaded runtime.
pub fn main<F: std::future::Future<Output = ()>>(name: &str, run: impl FnOnce(bool) -> F) {
    if std::env::args().any(|a| a == "--list") {
        println!("{name}: bench");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the benchmark");
    runtime.block_on(run(quick()));
}

/// Whether `--quick` was passed: smaller counts, fewer runs.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

/// The median of `values` (the upper one of an even count); 0 when empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `q` quantile (0..=1) of `values`, nearest rank; 0 when empty.
pub fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// What the ratio ours / baseline should be.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// Ratio at least this (throughput: higher is better).
    AtLeast(f64),
    /// Ratio at most this (time, latency, allocations: lower is better).
    AtMost(f64),
    /// No goal: reported for context.
    None,
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::AtLeast(x) => format!(">= {x}"),
            Goal::AtMost(x) => format!("<= {x}"),
            Goal::None => "-".to_owned(),
        }
    }

    fn met(self, ratio: f64) -> Option<bool> {
        match self {
            Goal::AtLeast(x) => Some(ratio >= x),
            Goal::AtMost(x) => Some(ratio <= x),
            Goal::None => None,
        }
    }
}

/// Prints one scenario's result and appends it to `$BENCH_RESULTS` when set.
/// The ratio is `ours / baseline`.
pub fn record(name: &str, ours: f64, baseline: f64, unit: &str, goal: Goal, note: &str) {
    let ratio = if baseline == 0.0 {
        0.0
    } else {
        ours / baseline
    };
    record_with_ratio(name, ours, baseline, ratio, unit, goal, note);
}

/// [`record`] with a ratio measured otherwise, e.g. the median of per-round
/// ratios of paired runs, which machine drift between rounds does not skew.
pub fn record_with_ratio(
    name: &str,
    ours: f64,
    baseline: f64,
    ratio: f64,
    unit: &str,
    goal: Goal,
    note: &str,
) {
    let met = goal.met(ratio);
    println!(
        "RESULT {name}: ours {ours:.3} {unit}, baseline {baseline:.3} {unit}, ratio {ratio:.3}, goal {} -> {}",
        goal.describe(),
        match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "no goal",
        }
    );
    let Ok(path) = std::env::var(RESULTS_VAR) else {
        return;
    };
    let line = serde_json::json!({
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "unit": unit,
        "goal": goal.describe(),
        "meets_goal": met,
        "note": note,
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(error) = written {
        eprintln!("cannot append to {path}: {error}");
    }
}
