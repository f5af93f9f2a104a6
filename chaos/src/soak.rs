//! Case 6: a soak at a fixed rate over both transports (post → Postgres outbox →
//! broker → pump → Postgres inbox → effect row), with this process's resident
//! memory sampled every second: after warm-up it must grow by less than 10%.

use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::Outcome;
use crate::restart::Flow;
use crate::rig::{Ping, Res, Rig, Transport, wait_until};

/// Posts in flight at most.
const MAX_IN_FLIGHT: usize = 256;

/// This process's resident set, in KiB (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs `seconds` at `rate` messages a second, split over RabbitMQ and Kafka.
pub(crate) async fn soak(seconds: u64, rate: u64) -> Res<Outcome> {
    if rate == 0 || seconds < 30 {
        return Err("the soak needs --rate > 0 and --seconds >= 30".into());
    }
    let mut rigs = Vec::new();
    for transport in [Transport::Rabbit, Transport::Kafka] {
        let rig = Rig::new(transport, "soak").await?;
        let flow = Flow::start(&rig, true, Duration::from_secs(1)).await?;
        let sender = rig.sender(flow.outbox.clone())?;
        rigs.push((rig, flow, sender));
    }
    let started = Instant::now();
    let sampling = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Some(kib) = rss_kib() {
                samples.push((started.elapsed().as_secs(), kib));
            }
            if started.elapsed().as_secs() > seconds {
                return samples;
            }
        }
    });

    // Posts in flight are bounded, so a slow moment shows as fewer posts, not
    // as the suite's own queue growing in the memory being measured.
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut posts = JoinSet::new();
    let mut attempted = vec![0u64; rigs.len()];
    let mut sent = vec![0u64; rigs.len()];
    let mut failed = 0u64;
    let mut tick =
        tokio::time::interval(Duration::from_secs(1) / u32::try_from(rate).unwrap_or(u32::MAX));
    let mut seq = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let which = (seq % rigs.len() as u64) as usize;
        let sender = rigs[which].2.clone();
        let ping = Ping {
            id: Uuid::now_v7(),
            seq,
        };
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        posts.spawn(async move {
            let posted = sender.post(&ping).await.map(|_| which);
            drop(permit);
            posted
        });
        attempted[which] += 1;
        seq += 1;
        while let Some(done) = posts.try_join_next() {
            match done {
                Ok(Ok(which)) => sent[which] += 1,
                _ => failed += 1,
            }
        }
    }
    while let Some(done) = posts.join_next().await {
        match done {
            Ok(Ok(which)) => sent[which] += 1,
            _ => failed += 1,
        }
    }
    let samples = sampling.await?;
    let csv: String = samples
        .iter()
        .map(|(t, kib)| format!("{t},{kib}\n"))
        .collect();
    std::fs::create_dir_all("target/chaos")?;
    std::fs::write(
        "target/chaos/soak-rss.csv",
        format!("seconds,rss_kib\n{csv}"),
    )?;

    let mut handled_once = true;
    let mut handled = 0;
    // A post that failed left its message in the outbox for the sweeper: every
    // attempted message must be handled, once.
    for ((rig, _, _), attempted) in rigs.iter().zip(&attempted) {
        wait_until(Duration::from_secs(120), || async {
            rig.handled().await >= *attempted
        })
        .await;
        let (rows, distinct) = rig.effects().await?;
        handled_once &= rows as u64 == *attempted && distinct as u64 == *attempted;
        handled += rows;
    }
    for (rig, flow, _) in rigs {
        flow.stop().await;
        rig.drop_schema().await;
    }

    // Warm-up: the first fifth of the run, at least 60 s when the run allows.
    let warm = (seconds / 5).max(60.min(seconds / 2));
    let window = 15.min(seconds / 10).max(1);
    let baseline = median(
        samples
            .iter()
            .filter(|(t, _)| *t >= warm && *t < warm + window)
            .map(|(_, kib)| *kib)
            .collect(),
    );
    let last = median(
        samples
            .iter()
            .filter(|(t, _)| *t + window >= seconds)
            .map(|(_, kib)| *kib)
            .collect(),
    );
    let peak = samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
    let growth = if baseline == 0 {
        f64::INFINITY
    } else {
        (last as f64 - baseline as f64) / baseline as f64
    };
    let total: u64 = sent.iter().sum();
    Ok(Outcome::new(
        failed == 0 && handled_once && growth < 0.10,
        format!(
            "{total} posted at {rate}/s over RabbitMQ and Kafka ({failed} failed), {handled} handled, once each: {handled_once}; \
             RSS {:.1} MiB after {warm} s warm-up, {:.1} MiB at the end ({:+.1}%), peak {:.1} MiB, {} samples",
            mib(baseline),
            mib(last),
            growth * 100.0,
            mib(peak),
            samples.len()
        ),
    ))
}
