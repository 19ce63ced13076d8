#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Linger: a partial batch reaches the handler about `linger` after its
//! first item, not before; `Duration::ZERO` delivers at once and
//! `Duration::MAX` waits for `flush` or close.
//!
//! Lower bounds are asserted strictly (the clock starts inside `add`, after
//! the test's own timestamp); upper bounds are generous for every round, for
//! a shared and noisy machine, and tight for the quickest of the rounds.

use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use snail_std::Batcher;

const LINGER: Duration = Duration::from_millis(20);
/// Lower-bound tolerance and upper-bound slack.
const EARLY: Duration = Duration::from_millis(15);
const SLACK: Duration = Duration::from_millis(500);
/// The quickest round's bound on delivery after the linger ran out.
const QUICK: Duration = Duration::from_millis(40);

/// A batcher whose handler sends (arrival time, items) for each batch.
fn batcher(linger: Duration) -> (Batcher<u32>, Receiver<(Instant, Vec<u32>)>) {
    let (tx, rx) = mpsc::channel();
    let b = Batcher::builder()
        .batch_size(100)
        .queue_size(100)
        .linger(linger)
        .spawn(move |batch| {
            let now = Instant::now();
            let _ = tx.send((now, batch.drain().collect()));
            Ok::<(), String>(())
        })
        .unwrap();
    (b, rx)
}

#[test]
fn lone_item_arrives_after_linger_not_before() {
    let (b, rx) = batcher(LINGER);
    let mut observed = Vec::new();
    for round in 0..5u32 {
        // Let the worker go idle first.
        std::thread::sleep(Duration::from_millis(30));
        let t0 = Instant::now();
        b.add(round).unwrap();
        let (at, items) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("lone item never delivered");
        let latency = at - t0;
        observed.push(latency);
        assert_eq!(items, vec![round]);
        assert!(
            latency >= EARLY,
            "round {round}: delivered after {latency:?}, before linger {LINGER:?}"
        );
        assert!(
            latency < LINGER + SLACK,
            "round {round}: delivered after {latency:?}"
        );
    }
    eprintln!("linger {LINGER:?}: lone-item latencies {observed:?}");
    let min = *observed.iter().min().unwrap();
    assert!(min < LINGER + QUICK, "the quickest round took {min:?}");
    let stats = b.stats();
    assert_eq!(stats.lingered, 5);
    assert_eq!(stats.sealed_partial, 5);
    assert_eq!(b.close().unwrap().items, 5);
}

#[test]
fn linger_counts_from_the_first_item() {
    let (b, rx) = batcher(LINGER);
    // If linger counted from the second item, every batch would arrive at
    // least LINGER after it; counted from the first, about LINGER - 10 ms.
    let mut since_second = Vec::new();
    let mut since_first = Vec::new();
    for round in 0..10u32 {
        std::thread::sleep(Duration::from_millis(30));
        let t0 = Instant::now();
        b.add(2 * round).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let t1 = Instant::now();
        let second = b.add(2 * round + 1);
        let (at, items) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("batch never delivered");
        second.unwrap();
        let latency = at - t0;
        assert!(
            latency >= EARLY,
            "round {round}: delivered {latency:?} after the first item"
        );
        assert!(
            latency < LINGER + SLACK,
            "round {round}: delivered {latency:?} after the first item"
        );
        if items.len() == 1 {
            // The sleep overshot the linger: the first item went alone.
            let (_, rest) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("second item never delivered");
            assert_eq!(rest, vec![2 * round + 1]);
            eprintln!("round {round}: sleep overshot ({:?}), skipped", t1 - t0);
            continue;
        }
        assert_eq!(items, vec![2 * round, 2 * round + 1]);
        since_first.push(latency);
        since_second.push(at - t1);
    }
    eprintln!(
        "linger {LINGER:?}, second item 10 ms later: since first {since_first:?}, since second {since_second:?}"
    );
    assert!(
        since_second.len() >= 3,
        "too few rounds with both items in one batch"
    );
    let min = *since_second.iter().min().unwrap();
    assert!(
        min < LINGER,
        "every batch arrived >= linger after its second item (min {min:?}): linger restarted"
    );
    b.close().unwrap();
}

#[test]
fn zero_linger_delivers_promptly() {
    let (b, rx) = batcher(Duration::ZERO);
    let mut observed = Vec::new();
    for round in 0..5u32 {
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        b.add(round).unwrap();
        let (at, items) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("never delivered");
        assert_eq!(items, vec![round]);
        let latency = at - t0;
        observed.push(latency);
        assert!(latency < SLACK, "linger ZERO: delivered after {latency:?}");
    }
    eprintln!("linger ZERO: latencies {observed:?}");
    let min = *observed.iter().min().unwrap();
    assert!(min < QUICK, "the quickest round took {min:?}");
    b.close().unwrap();
}

#[test]
fn max_linger_waits_for_flush_or_close() {
    let (b, rx) = batcher(Duration::MAX);
    b.add(1).unwrap();
    b.add(2).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(1200)).is_err(),
        "delivered without flush"
    );
    assert_eq!(b.stats().held, 2);
    assert!(b.flush());
    let (_, items) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("flush did not deliver");
    assert_eq!(items, vec![1, 2]);
    assert!(!b.flush(), "nothing left to flush");

    b.add(3).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "delivered without flush"
    );
    let report = b.close().unwrap();
    let (_, items) = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("close did not deliver");
    assert_eq!(items, vec![3]);
    assert_eq!(report.items, 3);
    assert_eq!(report.batches, 2);
    assert_eq!(b.stats().lingered, 0);
}

/// A batch sealed because it was full must not pass its linger clock on
/// to the next partial batch: with linger 200 ms, a lone item added 150 ms
/// after a full batch still waits the whole 200 ms. (Fixed bug: with one
/// clock per batcher it was flushed about 50 ms after it was added.)
#[test]
fn lone_item_after_a_full_batch_still_lingers() {
    let linger = Duration::from_millis(200);
    let (tx, rx) = mpsc::channel();
    let b = Batcher::<u32>::builder()
        .batch_size(4)
        .queue_size(4)
        .linger(linger)
        .spawn(move |batch| {
            let _ = tx.send((Instant::now(), batch.len()));
            Ok::<(), String>(())
        })
        .unwrap();
    for i in 0..4 {
        b.add(i).unwrap(); // sealed full at once
    }
    let (_, n) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(n, 4);
    std::thread::sleep(Duration::from_millis(150));
    let t1 = Instant::now();
    b.add(4).unwrap();
    let (at, n) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(n, 1);
    let latency = at - t1;
    eprintln!("lone item after a full batch: delivered after {latency:?} (linger {linger:?})");
    assert!(
        latency >= linger - Duration::from_millis(5),
        "delivered after {latency:?}, before linger {linger:?}"
    );
    b.close().unwrap();
}

/// An `add_many` whose iterator panics has accepted the items before the
/// panic: the batch it sealed reaches the worker at once and the partial
/// one within linger, as after an add that returns. (Fixed bug: the panic
/// skipped waking the worker and starting the linger clock, so the partial
/// batch waited for the next add, a flush or close.)
#[test]
fn items_before_a_panicking_iterator_in_add_many_still_linger() {
    let (b, rx) = batcher(LINGER);
    std::thread::sleep(Duration::from_millis(30)); // the worker parks
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut n = 0;
        b.add_many(std::iter::from_fn(|| {
            n += 1;
            if n > 150 {
                panic!("the iterator fails");
            }
            Some(n)
        }))
    }));
    assert!(unwound.is_err());
    // From the end of the unwind: the panic hook before it may take long
    // (a backtrace under ThreadSanitizer takes seconds).
    let t0 = Instant::now();
    let (_, full) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let (at, partial) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let latency = at - t0;
    assert_eq!(full, (1..=100).collect::<Vec<_>>());
    assert_eq!(partial, (101..=150).collect::<Vec<_>>());
    assert!(latency < LINGER + SLACK, "delivered after {latency:?}");
    assert_eq!(b.stats().lingered, 1);
    assert_eq!(b.close().unwrap().items, 150);
}
