#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Fault injection: handlers that fail or panic on random batches, and items
//! whose `Clone` panics inside `add_many`. Whatever happens, every item
//! offered is accounted for: handled, or dropped and counted, or handed back.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use snail_std::Batcher;

/// A tiny deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Counts live values; its clone panics when asked to.
struct Item {
    id: u64,
    live: Arc<AtomicUsize>,
    panic_on_clone: Arc<AtomicBool>,
}

impl Item {
    fn new(id: u64, live: &Arc<AtomicUsize>, panic_on_clone: &Arc<AtomicBool>) -> Self {
        live.fetch_add(1, SeqCst);
        Item {
            id,
            live: Arc::clone(live),
            panic_on_clone: Arc::clone(panic_on_clone),
        }
    }
}

impl Clone for Item {
    fn clone(&self) -> Self {
        if self.panic_on_clone.load(SeqCst) {
            panic!("clone of item {} refused", self.id);
        }
        Item::new(self.id, &self.live, &self.panic_on_clone)
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        self.live.fetch_sub(1, SeqCst);
    }
}

#[test]
fn handler_errors_on_random_batches_lose_nothing() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let errors_seen = Arc::new(AtomicU64::new(0));
    let (seen2, errors2) = (Arc::clone(&seen), Arc::clone(&errors_seen));
    let mut rng = Rng(0x5EED_1234);
    let b = Batcher::<u64>::builder()
        .batch_size(16)
        .queue_size(32)
        .on_error(move |_| {
            errors2.fetch_add(1, SeqCst);
        })
        .spawn(move |batch| {
            seen2.lock().unwrap().extend(batch.drain());
            if rng.next() % 3 == 0 {
                Err("injected failure")
            } else {
                Ok(())
            }
        })
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let b = &b;
            s.spawn(move || {
                for i in 0..20_000u64 {
                    b.add(t << 32 | i).unwrap();
                }
            });
        }
    });
    let report = b.close().unwrap();
    assert!(
        report.handler_errors > 0,
        "the injected failures must happen"
    );
    assert_eq!(report.handler_errors, errors_seen.load(SeqCst));
    assert_eq!(report.items, 80_000);
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut next = [0u64; 4];
    for &x in &seen {
        let (t, i) = ((x >> 32) as usize, x & 0xFFFF_FFFF);
        assert_eq!(i, next[t], "producer {t} out of order");
        next[t] += 1;
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 80_000);
}

#[test]
fn a_handler_panic_on_a_random_batch_accounts_for_every_item() {
    for seed in 1..=8u64 {
        let live = Arc::new(AtomicUsize::new(0));
        let never = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicU64::new(0));
        let handled2 = Arc::clone(&handled);
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let panic_at = 1 + rng.next() % 40;
        let mut batches = 0;
        let b = Batcher::<Item>::builder()
            .batch_size(8)
            .queue_size(8)
            .spawn(move |batch| {
                batches += 1;
                if batches == panic_at {
                    panic!("injected panic in batch {batches}");
                }
                handled2.fetch_add(batch.len() as u64, SeqCst);
                Ok::<(), String>(())
            })
            .unwrap();
        let refused = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let (b, live, never, refused) = (&b, &live, &never, &refused);
                s.spawn(move || {
                    for i in 0..500u64 {
                        if let Err(e) = b.add(Item::new(t << 32 | i, live, never)) {
                            drop(e.into_inner());
                            refused.fetch_add(1, SeqCst);
                        }
                    }
                });
            }
        });
        let err = b.close().unwrap_err();
        assert!(err.message.contains("injected panic"), "{}", err.message);
        let handled = handled.load(SeqCst);
        assert_eq!(
            err.report.items, handled,
            "the report counts what the handler saw"
        );
        assert_eq!(
            handled + err.batch_items + err.dropped_items + refused.load(SeqCst),
            1500,
            "seed {seed}: every item is handled, dropped and counted, or handed back"
        );
        drop(b);
        assert_eq!(
            live.load(SeqCst),
            0,
            "seed {seed}: every item dropped exactly once"
        );
    }
}

#[test]
fn a_panicking_clone_inside_add_many_keeps_the_batcher_consistent() {
    let live = Arc::new(AtomicUsize::new(0));
    let panic_on_clone = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    let b = Batcher::<Item>::builder()
        .batch_size(4)
        .queue_size(8)
        .spawn(move |batch| {
            seen2
                .lock()
                .unwrap()
                .extend(batch.drain().map(|item| item.id));
            Ok::<(), String>(())
        })
        .unwrap();
    let source: Vec<Item> = (0..10)
        .map(|i| Item::new(i, &live, &panic_on_clone))
        .collect();
    // Clone the first 6, then make the 7th clone panic inside add_many.
    let mut clones = 0;
    let flag = Arc::clone(&panic_on_clone);
    let result = catch_unwind(AssertUnwindSafe(|| {
        b.add_many(source.iter().map(|item| {
            clones += 1;
            if clones == 7 {
                flag.store(true, SeqCst);
            }
            item.clone()
        }))
    }));
    assert!(result.is_err(), "the clone's panic reaches the caller");
    panic_on_clone.store(false, SeqCst);
    // The shard lock was released: more adds work, from this thread too.
    b.add(Item::new(100, &live, &panic_on_clone)).unwrap();
    b.add_many(source[7..].iter().cloned()).unwrap();
    let report = b.close().unwrap();
    assert_eq!(report.items, 6 + 1 + 3);
    assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 4, 5, 100, 7, 8, 9]);
    drop(b);
    drop(source);
    assert_eq!(live.load(SeqCst), 0);
}
