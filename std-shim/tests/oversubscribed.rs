#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Far more producers than cores: 64 threads on a small machine finish
//! within a minute, each producer's items in order, and lose nothing. (That
//! blocked producers sleep instead of burning the cores the worker needs is
//! checked by `backpressure::blocked_producer_sleeps`; a minute is too
//! coarse a bound to catch spinning.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snail_std::Batcher;

const PRODUCERS: usize = 64;
const PER: u32 = 20_000;

#[test]
fn sixty_four_producers_finish_promptly() {
    let next = Arc::new(Mutex::new(vec![0u32; PRODUCERS]));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let (n, o) = (Arc::clone(&next), Arc::clone(&out_of_order));
    let batcher = Batcher::<u64>::builder()
        .spawn(move |batch| {
            let mut next = n.lock().unwrap();
            for &it in batch.iter() {
                let (p, seq) = ((it >> 32) as usize, it as u32);
                if next[p] != seq {
                    o.fetch_add(1, Relaxed);
                }
                next[p] = seq + 1;
            }
            Ok::<(), String>(())
        })
        .unwrap();

    let start = Instant::now();
    std::thread::scope(|s| {
        for p in 0..PRODUCERS {
            let batcher = &batcher;
            s.spawn(move || {
                for i in 0..PER {
                    batcher.add(((p as u64) << 32) | u64::from(i)).unwrap();
                }
            });
        }
    });
    let produced = start.elapsed();
    let report = batcher.close().unwrap();
    let elapsed = start.elapsed();
    eprintln!(
        "{PRODUCERS} producers x {PER} items on {} CPUs: producers done in {produced:?}, \
         closed in {elapsed:?} ({} batches)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        report.batches
    );
    assert_eq!(report.items, PRODUCERS as u64 * u64::from(PER));
    assert_eq!(out_of_order.load(Relaxed), 0);
    assert!(next.lock().unwrap().iter().all(|&n| n == PER));
    assert!(
        elapsed < Duration::from_secs(60),
        "64 producers took {elapsed:?}"
    );
}
