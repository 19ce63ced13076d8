//! The standard workload (`BENCHMARK.md`) under criterion: every
//! implementation at 1, 2, 4, 8, 16 and 64 producers.
//!
//! ```text
//! cargo bench --bench throughput                 # everything (a few minutes)
//! cargo bench --bench throughput -- 'p16/'       # one producer count
//! SNAIL_BENCH_ITEMS=4000000 cargo bench --bench throughput
//! ```
//!
//! Items per iteration: `SNAIL_BENCH_ITEMS` (default 2 million). For a quick
//! table with ratios, use `cargo run --release --example throughput`.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

mod workload;

use workload::Impl;

const PRODUCERS: [usize; 6] = [1, 2, 4, 8, 16, 64];

fn items() -> u64 {
    std::env::var("SNAIL_BENCH_ITEMS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(2_000_000)
}

fn throughput(c: &mut Criterion) {
    let items = items();
    for producers in PRODUCERS {
        let mut group = c.benchmark_group(format!("p{producers}"));
        group
            .throughput(Throughput::Elements(items))
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for imp in Impl::ALL {
            if !imp.supports(producers) {
                continue;
            }
            group.bench_function(BenchmarkId::from_parameter(imp.name()), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| imp.run(producers, items)).sum());
            });
        }
        group.finish();
    }
}

criterion_group!(benches, throughput);
criterion_main!(benches);
