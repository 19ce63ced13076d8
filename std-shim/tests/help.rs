#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! `help_when_blocked`: producers blocked for a buffer run the handler
//! themselves (`Help::Always`; by default only while at least as many
//! producers are blocked as there are CPUs; never with `Help::Never`). Batches must still
//! reach the handler one at a time and in order, nothing may be lost, `close`
//! must wait for a batch a producer is handling, and errors and panics on a
//! producer thread must be reported as on the worker.
//!
//! Whether a producer gets to help depends on the scheduler, so each test
//! repeats its round until helping happened (or gives up after `ROUNDS`
//! and fails): a round in which only the worker ran the handler checks the
//! same guarantees, just not the helping path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snail_std::{Batcher, Builder, Closed, Help};

const PRODUCERS: u64 = 4;
const PER: u64 = 5_000;
const ROUNDS: usize = 50;

/// One buffer of 4 items per shard and no queue room: nearly every batch
/// blocks a producer.
fn builder() -> Builder<u64> {
    Batcher::<u64>::builder()
        .batch_size(4)
        .queue_size(0)
        .shards(1)
        .linger(Duration::from_millis(1))
        .help_when_blocked(Help::Always)
}

fn on_worker() -> bool {
    std::thread::current().name() == Some("snail-worker")
}

/// Producer `p`'s `seq`th item.
fn item(p: u64, seq: u64) -> u64 {
    p << 32 | seq
}

/// Runs `PRODUCERS` threads adding `PER` items each until the batcher
/// refuses one; returns how many were accepted.
fn feed(b: &Batcher<u64>) -> u64 {
    feed_from(b, PRODUCERS)
}

/// [`feed`] with `producers` threads.
fn feed_from(b: &Batcher<u64>, producers: u64) -> u64 {
    let accepted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for p in 0..producers {
            let accepted = &accepted;
            s.spawn(move || {
                for seq in 0..PER {
                    match b.add(item(p, seq)) {
                        Ok(()) => accepted.fetch_add(1, SeqCst),
                        Err(Closed(_)) => return,
                    };
                }
            });
        }
    });
    accepted.load(SeqCst)
}

#[test]
fn helping_producers_keep_order_and_lose_nothing() {
    let mut helped = 0;
    for _ in 0..ROUNDS {
        let next: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
        let in_handler = Arc::new(AtomicBool::new(false));
        let by_producers = Arc::new(AtomicU64::new(0));
        let b = {
            let (next, in_handler, by_producers) = (
                Arc::clone(&next),
                Arc::clone(&in_handler),
                Arc::clone(&by_producers),
            );
            builder()
                .spawn(move |batch| {
                    assert!(
                        !in_handler.swap(true, SeqCst),
                        "two threads ran the handler at once"
                    );
                    if !on_worker() {
                        by_producers.fetch_add(1, SeqCst);
                    }
                    let mut next = next.lock().unwrap();
                    for &it in batch.iter() {
                        let expected = next.entry(it >> 32).or_insert(0);
                        assert_eq!(it & 0xffff_ffff, *expected, "producer {}", it >> 32);
                        *expected += 1;
                    }
                    in_handler.store(false, SeqCst);
                    Ok::<(), String>(())
                })
                .unwrap()
        };
        assert_eq!(feed(&b), PRODUCERS * PER);
        let report = b.close().expect("no handler panicked");
        assert_eq!(report.items, PRODUCERS * PER);
        // `close` returned after every batch was handled, also those that
        // producers were handling.
        let next = next.lock().unwrap();
        for p in 0..PRODUCERS {
            assert_eq!(next.get(&p), Some(&PER), "producer {p}");
        }
        helped += by_producers.load(SeqCst);
        if helped > 0 {
            break;
        }
    }
    assert!(helped > 0, "no producer ran the handler in {ROUNDS} rounds");
}

/// One round of `producers` threads with `help`; returns how many batches
/// the handler ran on a producer thread.
fn batches_handled_by_producers(help: Help, producers: u64) -> u64 {
    let by_producers = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&by_producers);
    let b = builder()
        .help_when_blocked(help)
        .spawn(move |_| {
            if !on_worker() {
                counted.fetch_add(1, SeqCst);
            }
            Ok::<(), String>(())
        })
        .unwrap();
    assert_eq!(feed_from(&b, producers), producers * PER);
    assert_eq!(b.close().unwrap().items, producers * PER);
    by_producers.load(SeqCst)
}

fn cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

#[test]
fn never_keeps_the_handler_on_the_worker() {
    for _ in 0..5 {
        assert_eq!(batches_handled_by_producers(Help::Never, 2 * cpus() + 2), 0);
    }
}

#[test]
fn by_default_producers_help_only_when_as_many_are_blocked_as_cpus() {
    // Fewer producers than CPUs: never as many blocked as CPUs.
    if cpus() > 1 {
        for _ in 0..5 {
            assert_eq!(batches_handled_by_producers(Help::default(), cpus() - 1), 0);
        }
    }
    // As many producers as CPUs: they help once all of them are blocked.
    let producers = cpus();
    assert!(
        (0..ROUNDS).any(|_| batches_handled_by_producers(Help::default(), producers) > 0),
        "{producers} producers on {} CPUs never helped in {ROUNDS} rounds",
        cpus()
    );
}

#[test]
fn add_timeout_never_runs_the_handler() {
    // `Duration::MAX` is past what `Instant` holds: no deadline, still no help.
    for timeout in [Duration::from_secs(60), Duration::MAX] {
        let by_producers = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&by_producers);
        let b = builder()
            .spawn(move |_| {
                if !on_worker() {
                    counted.fetch_add(1, SeqCst);
                }
                Ok::<(), String>(())
            })
            .unwrap();
        std::thread::scope(|s| {
            for p in 0..PRODUCERS {
                let b = &b;
                s.spawn(move || {
                    for seq in 0..PER {
                        b.add_timeout(item(p, seq), timeout).expect("added in time");
                    }
                });
            }
        });
        assert_eq!(b.close().unwrap().items, PRODUCERS * PER);
        assert_eq!(by_producers.load(SeqCst), 0, "timeout {timeout:?}");
    }
}

#[test]
fn handler_errors_on_a_producer_go_to_the_report_and_the_hook() {
    for _ in 0..ROUNDS {
        let hooked = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hooked);
        let b = builder()
            .on_error(move |e| {
                assert_eq!(e.to_string(), "failed on a producer");
                h.fetch_add(1, SeqCst);
            })
            .spawn(|_| {
                if on_worker() {
                    Ok(())
                } else {
                    Err("failed on a producer")
                }
            })
            .unwrap();
        feed(&b);
        let report = b.close().expect("no handler panicked");
        assert_eq!(report.items, PRODUCERS * PER);
        assert_eq!(report.handler_errors, hooked.load(SeqCst));
        if report.handler_errors > 0 {
            return;
        }
    }
    panic!("no producer ran the handler in {ROUNDS} rounds");
}

#[test]
fn a_handler_panic_on_a_producer_closes_and_is_reported() {
    for _ in 0..ROUNDS {
        let b = builder()
            .spawn(|_| {
                if on_worker() {
                    Ok::<(), String>(())
                } else {
                    panic!("panicked on a producer")
                }
            })
            .unwrap();
        let accepted = feed(&b);
        match b.close() {
            // Only the worker ran the handler this round.
            Ok(report) => assert_eq!(report.items, PRODUCERS * PER),
            Err(e) => {
                assert_eq!(e.message, "panicked on a producer");
                assert!(b.is_closed());
                assert_eq!(
                    e.report.items + e.batch_items + e.dropped_items,
                    accepted,
                    "every accepted item is delivered, in the panicking batch or dropped"
                );
                assert!(
                    accepted < PRODUCERS * PER,
                    "adds after the panic are refused"
                );
                // `close` returns the same outcome again.
                assert_eq!(b.close().unwrap_err(), e);
                return;
            }
        }
    }
    panic!("no producer ran the handler in {ROUNDS} rounds");
}
