#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Many producers with a random mix of `add`, `add_many`, `try_add` and
//! `flush`: every item is delivered exactly once and each producer's items
//! arrive in the order it added them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snail_std::{Batcher, Builder, Report, TryAddError};

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

impl Seen {
    fn shared(producers: usize) -> Arc<Mutex<Seen>> {
        Arc::new(Mutex::new(Seen {
            next: vec![0; producers],
            items: 0,
            errors: Vec::new(),
        }))
    }
}

/// Asserts that the handler saw each of `per` items of every producer once,
/// in order, and that the report counts them all.
fn check_delivered(label: &str, seen: &Mutex<Seen>, per: u32, report: &Report) {
    let s = seen.lock().unwrap();
    let total = s.next.len() as u64 * u64::from(per);
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
}

/// Moves the calling thread to CPU `cpu % CPUs` (Linux; elsewhere nothing),
/// so that shard routing, which follows the CPU, moves it between shards.
fn hop(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside
        // it; sched_setaffinity reads it. A failure (a CPU outside our
        // cgroup's set) only leaves the thread where it is.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu % cpus, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// What the handler checks: each producer's items in order, each once.
fn checking_handler(
    seen: &Arc<Mutex<Seen>>,
) -> impl FnMut(&mut snail_std::Batch<'_, u64>) -> Result<(), String> + Send + 'static {
    let seen = Arc::clone(seen);
    move |batch| {
        let mut s = seen.lock().unwrap();
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
        Ok(())
    }
}

fn run(label: &str, builder: Builder<u64>, producers: usize, per: u32, seed: u64) {
    run_hopping(label, builder, producers, per, seed, None);
}

/// `run`, with each producer moving to another CPU every `hop_every` items
/// when that is `Some`.
fn run_hopping(
    label: &str,
    builder: Builder<u64>,
    producers: usize,
    per: u32,
    seed: u64,
    hop_every: Option<u32>,
) {
    let seen = Seen::shared(producers);
    let batcher = builder.spawn(checking_handler(&seen)).unwrap();

    let start = Instant::now();
    std::thread::scope(|s| {
        for p in 0..producers {
            let batcher = &batcher;
            s.spawn(move || {
                let mut rng = XorShift::new(seed ^ (p as u64 + 1));
                let mut i = 0u32;
                let mut hops = 0;
                while i < per {
                    if let Some(every) = hop_every {
                        if i / every > hops {
                            hops = i / every;
                            hop(p + hops as usize);
                        }
                    }
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
    check_delivered(label, &seen, per, &report);
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

/// Producers that keep moving between CPUs, so that the shim's routing
/// (which follows the CPU) keeps moving them between shards: still every
/// item once, each producer's in order.
#[test]
fn producers_hopping_between_cpus_keep_their_order() {
    run_hopping(
        "8x100k batch 64 shards(2) hopping every 300",
        Batcher::builder()
            .batch_size(64)
            .queue_size(256)
            .linger(Duration::from_millis(1))
            .shards(2),
        8,
        100_000,
        0x5eed_0004,
        Some(300),
    );
}

/// Each producer adds to two batchers in turn (a thread's shard route serves
/// one batcher at a time and passes between them): both see every item of
/// every producer once, in order.
#[test]
fn producers_alternating_between_two_batchers_keep_their_order() {
    const PRODUCERS: usize = 6;
    const PER: u32 = 60_000;
    let seen: Vec<_> = (0..2).map(|_| Seen::shared(PRODUCERS)).collect();
    let batchers: Vec<_> = seen
        .iter()
        .map(|seen| {
            Batcher::builder()
                .batch_size(50)
                .queue_size(150)
                .shards(2)
                .spawn(checking_handler(seen))
                .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for p in 0..PRODUCERS {
            let batchers = &batchers;
            s.spawn(move || {
                let mut rng = XorShift::new(0x5eed_0005 ^ p as u64);
                let mut next = [0u32; 2];
                while next.iter().any(|&n| n < PER) {
                    let b = rng.below(2) as usize;
                    // Runs of a few adds to one batcher, then the other.
                    for _ in 0..rng.below(200) {
                        if next[b] == PER {
                            break;
                        }
                        batchers[b].add(item(p, next[b])).unwrap();
                        next[b] += 1;
                    }
                    if rng.below(50) == 0 {
                        hop(p + next[0] as usize);
                    }
                }
            });
        }
    });
    for (b, batcher) in batchers.iter().enumerate() {
        let report = batcher.close().unwrap();
        check_delivered(&format!("batcher {b}"), &seen[b], PER, &report);
    }
}
