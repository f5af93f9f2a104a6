//! `send` of a no-op command: (a) no steps and (b) tracing + retry + circuit breaker,
//! against two baselines measured in the same run: a direct call of the handler and
//! a tokio oneshot round trip. Also counts heap allocations per send.
//!
//! Run with: cargo bench -p brighter-core --bench send
//! (`-- --calls oneshot|send|policies N` makes only N such calls, for
//! counting instructions with `valgrind --tool=callgrind`.)
#![allow(unsafe_code, missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use brighter_core::pipeline::{
    CircuitBreaker, CircuitBreakerConfig, Pipeline, RequestTracing, Retry,
};
use brighter_core::{Command, CommandProcessor, Error, Handler, Request, RequestContext};
use criterion::{Criterion, criterion_group};
use uuid::Uuid;

/// Counts allocations; forwards everything to the system allocator.
struct Counting;
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Noop {
    id: Uuid,
}
impl Request for Noop {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Noop {}

struct NoopHandler;
impl Handler<Noop> for NoopHandler {
    async fn handle(&self, _: &Noop, _: &mut RequestContext) -> Result<(), Error> {
        Ok(())
    }
}

fn bare() -> CommandProcessor {
    CommandProcessor::builder()
        .command(NoopHandler)
        .build()
        .unwrap()
}

fn with_policies() -> CommandProcessor {
    let breaker = CircuitBreaker::new(
        "bench",
        CircuitBreakerConfig::new(5, Duration::from_secs(30)),
    );
    CommandProcessor::builder()
        .command_with(
            Pipeline::new()
                .step(RequestTracing)
                .step(Retry::new(3))
                .step(breaker),
            NoopHandler,
        )
        .build()
        .unwrap()
}

async fn oneshot_round_trip() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tx.send(()).unwrap();
    rx.await.unwrap();
}

/// Nanoseconds per call over 20k calls.
async fn time_calls<F: std::future::Future<Output = ()>>(mut f: impl FnMut() -> F) -> f64 {
    const N: u32 = 20_000;
    let start = std::time::Instant::now();
    for _ in 0..N {
        f().await;
    }
    start.elapsed().as_nanos() as f64 / f64::from(N)
}

fn allocations_per_call<F: std::future::Future<Output = ()>>(
    rt: &tokio::runtime::Runtime,
    mut f: impl FnMut() -> F,
) -> f64 {
    const N: u64 = 10_000;
    rt.block_on(async {
        f().await; // warm up lazily initialised state
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..N {
            f().await;
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
    })
}

/// A runtime, the two processors and the command every measurement uses.
fn fixture() -> (
    tokio::runtime::Runtime,
    CommandProcessor,
    CommandProcessor,
    Noop,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, bare(), with_policies(), Noop { id: Uuid::now_v7() })
}

fn bench(c: &mut Criterion) {
    let (rt, bare, policies, cmd) = fixture();

    let mut group = c.benchmark_group("send");
    group.bench_function("baseline: direct handler call", |b| {
        b.to_async(&rt).iter(|| async {
            let mut ctx = RequestContext::new();
            black_box(NoopHandler.handle(black_box(&cmd), &mut ctx).await).unwrap();
        })
    });
    group.bench_function("baseline: tokio oneshot round trip", |b| {
        b.to_async(&rt).iter(oneshot_round_trip)
    });
    group.bench_function("(a) send, no steps", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bare.send(black_box(&cmd)).await).unwrap() })
    });
    group.bench_function("(b) send, tracing + retry + circuit breaker", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(policies.send(black_box(&cmd)).await).unwrap() })
    });
    group.finish();
}

/// Paired ratios and allocation counts, recorded for `scripts/bench`.
fn ratios() {
    let (rt, bare, policies, cmd) = fixture();
    // Criterion measures one benchmark after the other, so machine drift between
    // them shows up in their ratio. Paired rounds alternate the two, 20k calls
    // each, and report the median of the per-round ratios (and of the times).
    let rounds = if benchkit::quick() { 11 } else { 31 };
    let paired = |b: &mut dyn FnMut() -> f64| {
        let (mut ratios, mut ours, mut base) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let baseline = rt.block_on(time_calls(oneshot_round_trip));
            let t = b();
            ratios.push(t / baseline);
            ours.push(t);
            base.push(baseline);
        }
        (
            benchkit::median(ratios),
            benchkit::median(ours),
            benchkit::median(base),
        )
    };
    let (a, a_ns, base_ns) =
        paired(&mut || rt.block_on(time_calls(|| async { bare.send(&cmd).await.unwrap() })));
    let (b, b_ns, _) =
        paired(&mut || rt.block_on(time_calls(|| async { policies.send(&cmd).await.unwrap() })));
    println!("paired ratios to a oneshot round trip (median of {rounds} alternating rounds):");
    println!("  (a) send, no steps: {a:.2}");
    println!("  (b) send, tracing + retry + circuit breaker: {b:.2}  (goal < 1.5)");
    let note = format!(
        "{rounds} paired rounds of 20,000 calls, alternating with the baseline; times are medians, the ratio is the median of the per-round ratios"
    );
    benchkit::record_with_ratio(
        "send (tracing + retry + breaker) vs tokio oneshot round trip",
        b_ns,
        base_ns,
        b,
        "ns/call",
        benchkit::Goal::AtMost(1.5),
        &note,
    );
    benchkit::record_with_ratio(
        "send (no steps) vs tokio oneshot round trip",
        a_ns,
        base_ns,
        a,
        "ns/call",
        benchkit::Goal::None,
        &note,
    );

    let oneshot = allocations_per_call(&rt, oneshot_round_trip);
    let bare_allocs = allocations_per_call(&rt, || async { bare.send(&cmd).await.unwrap() });
    let policy_allocs = allocations_per_call(&rt, || async { policies.send(&cmd).await.unwrap() });
    println!("allocations per call:");
    println!("  oneshot round trip: {oneshot:.2}");
    println!("  (a) send, no steps: {bare_allocs:.2}");
    println!("  (b) send, tracing + retry + circuit breaker: {policy_allocs:.2}");
    benchkit::record(
        "heap allocations per send (tracing + retry + breaker)",
        policy_allocs,
        1.0,
        "allocations",
        benchkit::Goal::AtMost(1.0),
        "absolute count (baseline column fixed at 1): the goal is at most 1 per send",
    );
}

criterion_group!(benches, bench);

/// `--calls MODE N`: `N` calls of `oneshot`, `send` (no steps) or
/// `policies` (tracing + retry + breaker) and nothing else, for counting
/// instructions under callgrind (`scripts/bench` runs two counts of each and
/// takes the difference per call).
fn calls(mode: &str, n: u32) {
    let (rt, bare, policies, cmd) = fixture();
    rt.block_on(async {
        for _ in 0..n {
            match mode {
                "oneshot" => oneshot_round_trip().await,
                "send" => bare.send(&cmd).await.unwrap(),
                _ => policies.send(&cmd).await.unwrap(),
            }
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--calls") {
        let n = args
            .get(at + 2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000);
        calls(args.get(at + 1).map_or("policies", String::as_str), n);
        return;
    }
    // `--ratios-only` (scripts/bench) skips the criterion timings.
    if !std::env::args().any(|a| a == "--ratios-only") {
        benches();
        criterion::Criterion::default()
            .configure_from_args()
            .final_summary();
    }
    ratios();
}
