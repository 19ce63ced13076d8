#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Many producers with a random mix of `add`, `add_many`, `try_add` and
//! `flush`: every item is delivered exactly once and each producer's items
//! arrive in the order it added them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snail_std::{Batcher, Builder, TryAddError};

/// A tiny seeded xorshift64 generator.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn item(producer: usize, seq: u32) -> u64 {
    ((producer as u64) << 32) | u64::from(seq)
}

/// What the handler saw: per producer, the next expected sequence number;
/// plus the first few violations.
struct Seen {
    next: Vec<u32>,
    items: u64,
    errors: Vec<String>,
}

fn run(label: &str, builder: Builder<u64>, producers: usize, per: u32, seed: u64) {
    let seen = Arc::new(Mutex::new(Seen {
        next: vec![0; producers],
        items: 0,
        errors: Vec::new(),
    }));
    let handler_seen = Arc::clone(&seen);
    let batcher = builder
        .spawn(move |batch| {
            let mut s = handler_seen.lock().unwrap();
            for it in batch.drain() {
                let p = (it >> 32) as usize;
                let seq = it as u32;
                s.items += 1;
                if p >= s.next.len() {
                    if s.errors.len() < 10 {
                        s.errors.push(format!("unknown producer {p}"));
                    }
                    continue;
                }
                if seq != s.next[p] && s.errors.len() < 10 {
                    let want = s.next[p];
                    s.errors
                        .push(format!("producer {p}: got {seq}, expected {want}"));
                }
                s.next[p] = seq.wrapping_add(1);
            }
            Ok::<(), String>(())
        })
        .unwrap();

    let start = Instant::now();
    std::thread::scope(|s| {
        for p in 0..producers {
            let batcher = &batcher;
            s.spawn(move || {
                let mut rng = XorShift::new(seed ^ (p as u64 + 1));
                let mut i = 0u32;
                while i < per {
                    let r = rng.below(1000);
                    if r < 550 {
                        batcher.add(item(p, i)).unwrap();
                        i += 1;
                    } else if r < 650 {
                        match batcher.try_add(item(p, i)) {
                            Ok(()) => {}
                            Err(TryAddError::Full(back)) => batcher.add(back).unwrap(),
                            Err(TryAddError::Closed(_)) => panic!("closed while open"),
                        }
                        i += 1;
                    } else if r < 990 {
                        let n = (1 + rng.below(300) as u32).min(per - i);
                        batcher.add_many((i..i + n).map(|k| item(p, k))).unwrap();
                        i += n;
                    } else {
                        batcher.flush();
                    }
                }
            });
        }
    });
    let report = batcher.close().unwrap();
    let elapsed = start.elapsed();

    let total = producers as u64 * u64::from(per);
    let s = seen.lock().unwrap();
    assert!(
        s.errors.is_empty(),
        "{label}: order/uniqueness violations: {:?}",
        s.errors
    );
    for (p, &n) in s.next.iter().enumerate() {
        assert_eq!(n, per, "{label}: producer {p} delivered up to {n} of {per}");
    }
    assert_eq!(s.items, total, "{label}: items seen by the handler");
    assert_eq!(report.items, total, "{label}: report.items");
    assert_eq!(report.handler_errors, 0);
    let stats = batcher.stats();
    assert_eq!(stats.added, total);
    assert_eq!(stats.held, 0);
    eprintln!(
        "{label}: {producers} x {per} items in {elapsed:?}, {} batches (avg {:.1} items)",
        report.batches,
        total as f64 / report.batches as f64
    );
}

#[test]
fn eight_producers_random_mix_exactly_once_in_order() {
    run(
        "8x250k batch 64 buffers 4 shards(3)",
        Batcher::builder()
            .batch_size(64)
            .queue_size(192)
            .linger(Duration::from_millis(1))
            .shards(3),
        8,
        250_000,
        0x5eed_0001,
    );
}

#[test]
fn eight_producers_random_mix_tiny_buffers() {
    // Heavy back-pressure: two buffers of 7, one shard; partial batches
    // linger for nothing.
    run(
        "8x20k batch 7 buffers 2 shards(1)",
        Batcher::builder()
            .batch_size(7)
            .queue_size(7)
            .linger(Duration::ZERO)
            .shards(1),
        8,
        20_000,
        0x5eed_0002,
    );
}

#[test]
fn eight_producers_random_mix_default_config() {
    run(
        "8x50k default builder",
        Batcher::builder(),
        8,
        50_000,
        0x5eed_0003,
    );
}
