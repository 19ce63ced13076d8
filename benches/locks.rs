//! One thread taking a lock alone, as a producer takes its shard lock on
//! every `add`: `SpinLock` (a `lock cmpxchg` per entry) against
//! `BiasedLock` with the std shim's `membarrier`-based bias (plain stores
//! once the thread owns the lock), and the single-threaded cost of one
//! `try_add` (plus a `try_take` per 1000) on each.
//!
//! ```text
//! cargo bench --bench locks
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snail::relax::Yield;
use snail::{ArrayStorage, BiasedLock, RawBatcher, RawLock, SpinLock};
use snail_std::bias::ThreadBias;

type Biased = BiasedLock<ThreadBias, Yield>;
type Spin = SpinLock<Yield>;
type Core<L> = RawBatcher<u64, ArrayStorage<u64, 1000, 3, L, 1>, L, Yield>;

fn lock_alone<L: RawLock>(lock: &L, iters: u64) {
    let mut x = 0u64;
    for i in 0..iters {
        lock.lock(|| x = x.wrapping_add(black_box(i)));
    }
    black_box(x);
}

fn add_alone<L: RawLock>(core: &Core<L>, iters: u64) {
    let mut sum = 0u64;
    for i in 0..iters {
        if core.try_add(i).is_err() {
            unreachable!("a buffer is always free");
        }
        if i % 1000 == 999 {
            let batch = core.try_take().expect("a full batch");
            sum = sum.wrapping_add(batch.iter().sum::<u64>());
        }
    }
    core.flush();
    while core.try_take().is_some() {}
    black_box(sum);
}

/// Times `run(iters)` for criterion's `iter_custom`.
fn timed(iters: u64, run: impl FnOnce(u64)) -> Duration {
    let start = std::time::Instant::now();
    run(iters);
    start.elapsed()
}

fn locks(c: &mut Criterion) {
    // Registers `membarrier` (as `Batcher::spawn` would).
    let _ = snail_std::bias::expedited_after_probe();
    let mut group = c.benchmark_group("lock-alone");
    group
        .throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("spin", |b| {
        let lock = Spin::new();
        b.iter_custom(|iters| timed(iters, |n| lock_alone(&lock, n)))
    });
    group.bench_function("biased", |b| {
        let lock = Biased::new();
        b.iter_custom(|iters| timed(iters, |n| lock_alone(&lock, n)))
    });
    group.finish();

    let mut group = c.benchmark_group("add-alone");
    group
        .throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("spin", |b| {
        let core = Core::<Spin>::new();
        b.iter_custom(|iters| timed(iters, |n| add_alone(&core, n)))
    });
    group.bench_function("biased", |b| {
        let core = Core::<Biased>::new();
        b.iter_custom(|iters| timed(iters, |n| add_alone(&core, n)))
    });
    group.finish();
}

criterion_group!(benches, locks);
criterion_main!(benches);
