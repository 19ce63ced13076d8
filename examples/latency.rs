//! Latency of a lightly loaded snail-std batcher: one producer adds items at
//! a steady rate far below capacity, so batches are sealed by linger, not by
//! filling. Each item is the `Instant` of its `add`; the handler records
//! add → handler latency for every item; p50/p99/max are printed.
//!
//! ```text
//! cargo run --release --example latency -- [--rate 10000] [--secs 2] [--linger-us 1000]
//! ```

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

struct Options {
    rate: u64,
    secs: f64,
    linger: Duration,
}

fn options() -> Result<Options, String> {
    let mut opts = Options {
        rate: 10_000,
        secs: 2.0,
        linger: Duration::from_millis(1),
    };
    let mut args = std::env::args().skip(1);
    while let Some(key) = args.next() {
        let value = args.next().ok_or_else(|| format!("{key} needs a value"))?;
        let bad = || format!("bad value {value:?} for {key}");
        match key.as_str() {
            "--rate" => opts.rate = value.parse().ok().filter(|&r| r > 0).ok_or_else(bad)?,
            "--secs" => opts.secs = value.parse().ok().filter(|&s| s > 0.0).ok_or_else(bad)?,
            "--linger-us" => opts.linger = Duration::from_micros(value.parse().map_err(|_| bad())?),
            _ => {
                return Err(format!(
                "usage: latency [--rate ITEMS_PER_S] [--secs S] [--linger-us US] (unknown {key})"
            ))
            }
        }
    }
    Ok(opts)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> ExitCode {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let items = (opts.rate as f64 * opts.secs).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / opts.rate as f64);

    let latencies = Arc::new(Mutex::new(Vec::with_capacity(items as usize)));
    let sink = Arc::clone(&latencies);
    let batcher = snail_std::Batcher::<Instant>::builder()
        .batch_size(1000)
        .queue_size(2000)
        .linger(opts.linger)
        .spawn(move |batch| {
            let now = Instant::now();
            let mut sink = sink.lock().expect("poisoned");
            sink.extend(batch.drain().map(|added| now - added));
            Ok::<(), Infallible>(())
        })
        .expect("spawn batcher");

    // Absolute deadlines: the rate holds on average even when a sleep
    // overshoots.
    let start = Instant::now();
    for i in 0..items {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        batcher.add(Instant::now()).expect("batcher closed");
    }
    let elapsed = start.elapsed();
    let stats = batcher.stats();
    let report = batcher.close().expect("handler panicked");

    let mut lat = std::mem::take(&mut *latencies.lock().expect("poisoned"));
    assert_eq!(lat.len() as u64, items, "lost items");
    lat.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "snail-std latency: 1 producer, {items} items at {:.0} items/s (target {}/s) over {:.2} s, linger {:?}",
        items as f64 / elapsed.as_secs_f64(),
        opts.rate,
        elapsed.as_secs_f64(),
        opts.linger
    );
    println!(
        "batches: {} ({:.1} items each; {} sealed by linger, {} full)",
        report.batches,
        items as f64 / report.batches as f64,
        stats.lingered,
        stats.sealed_full
    );
    println!(
        "add -> handler latency: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us",
        us(percentile(&lat, 0.50)),
        us(percentile(&lat, 0.90)),
        us(percentile(&lat, 0.99)),
        us(percentile(&lat, 0.999)),
        us(lat[lat.len() - 1]),
    );
    ExitCode::SUCCESS
}
