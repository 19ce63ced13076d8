#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Back-pressure: the in-flight bound under a slow handler, `try_add` and
//! `add_timeout` on a full batcher, and the CPU a blocked producer uses.

use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snail_std::{Batcher, TryAddError};

#[test]
fn in_flight_never_exceeds_capacity_under_a_slow_handler() {
    const PRODUCERS: usize = 4;
    const PER: i64 = 1000;
    // Items whose `add` returned Ok, counted after it returned (so never
    // ahead of the truth), and items handled, counted at the end of the
    // handler while the batch still holds its buffer (so never behind the
    // buffer's release). Reading `accepted` before `handled` makes
    // `accepted - handled` a lower bound of what the batcher holds.
    let accepted = Arc::new(AtomicI64::new(0));
    let handled = Arc::new(AtomicI64::new(0));
    let max_seen = Arc::new(AtomicI64::new(0));
    let sample = {
        let (a, h, m) = (
            Arc::clone(&accepted),
            Arc::clone(&handled),
            Arc::clone(&max_seen),
        );
        move || {
            let acc = a.load(SeqCst);
            let held = acc - h.load(SeqCst);
            m.fetch_max(held, SeqCst);
        }
    };
    let in_handler = sample.clone();
    let h = Arc::clone(&handled);
    let b = Batcher::<i64>::builder()
        .batch_size(8)
        .queue_size(24)
        .linger(Duration::from_millis(2))
        .spawn(move |batch| {
            in_handler();
            std::thread::sleep(Duration::from_millis(1));
            h.fetch_add(batch.len() as i64, SeqCst);
            Ok::<(), String>(())
        })
        .unwrap();
    let capacity = b.capacity() as i64;
    assert_eq!(b.buffers(), 3 + b.shards());
    assert_eq!(capacity, 8 * b.buffers() as i64);

    std::thread::scope(|s| {
        for _ in 0..PRODUCERS {
            let (b, accepted, sample) = (&b, &accepted, sample.clone());
            s.spawn(move || {
                for i in 0..PER {
                    b.add(i).unwrap();
                    accepted.fetch_add(1, SeqCst);
                    sample();
                }
            });
        }
    });
    let report = b.close().unwrap();
    assert_eq!(report.items, PRODUCERS as u64 * PER as u64);
    let max = max_seen.load(SeqCst);
    eprintln!("capacity {capacity}: max accepted-but-unhandled {max}");
    assert!(
        max <= capacity,
        "{max} items in flight, capacity {capacity}"
    );
    // The bound was actually reached for (the buffers filled up).
    assert!(
        max > capacity / 2,
        "the test never filled the buffers (max {max})"
    );
}

/// A batcher of one buffer of one item whose handler reports each batch and
/// then waits for the gate (or for the gate's sender to go away).
fn gated() -> (Batcher<String>, Receiver<String>, Sender<()>) {
    let (started_tx, started_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let b = Batcher::<String>::builder()
        .batch_size(1)
        .queue_size(0)
        .shards(1)
        .linger(Duration::ZERO)
        .spawn(move |batch| {
            let _ = started_tx.send(batch[0].clone());
            let _ = gate_rx.recv();
            Ok::<(), String>(())
        })
        .unwrap();
    assert_eq!(b.buffers(), 1);
    (b, started_rx, gate_tx)
}

#[test]
fn try_add_and_add_timeout_report_full() {
    let (b, started, gate) = gated();
    b.add("first".into()).unwrap();
    // The worker holds the only buffer until the gate opens.
    assert_eq!(
        started.recv_timeout(Duration::from_secs(10)).unwrap(),
        "first"
    );

    match b.try_add("try".into()) {
        Err(TryAddError::Full(s)) => assert_eq!(s, "try"),
        other => panic!("try_add on a full batcher: {other:?}"),
    }
    assert_eq!(b.stats().refused, 1);

    let timeout = Duration::from_millis(200);
    let t0 = Instant::now();
    let r = b.add_timeout("timed".into(), timeout);
    let waited = t0.elapsed();
    eprintln!("add_timeout({timeout:?}) on a full batcher returned after {waited:?}");
    match r {
        Err(e @ TryAddError::Full(_)) => {
            assert!(e.is_full());
            assert_eq!(e.into_inner(), "timed");
        }
        other => panic!("add_timeout on a full batcher: {other:?}"),
    }
    assert!(
        waited >= timeout,
        "gave up after {waited:?}, before {timeout:?}"
    );
    assert!(
        waited < timeout + Duration::from_secs(3),
        "gave up only after {waited:?}"
    );

    let t0 = Instant::now();
    match b.add_timeout("zero".into(), Duration::ZERO) {
        Err(TryAddError::Full(s)) => assert_eq!(s, "zero"),
        other => panic!("add_timeout(ZERO) on a full batcher: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));

    // A buffer freed during the wait lets add_timeout succeed early.
    let opener = std::thread::spawn({
        let gate = gate.clone();
        move || {
            std::thread::sleep(Duration::from_millis(100));
            gate.send(()).unwrap();
        }
    });
    let t0 = Instant::now();
    b.add_timeout("late".into(), Duration::from_secs(60))
        .unwrap();
    let waited = t0.elapsed();
    opener.join().unwrap();
    assert!(
        waited < Duration::from_secs(30),
        "add_timeout waited {waited:?}"
    );
    assert_eq!(
        started.recv_timeout(Duration::from_secs(10)).unwrap(),
        "late"
    );

    drop(gate); // the handler no longer waits
    let report = b.close().unwrap();
    assert_eq!(report.items, 2);
    match b.add_timeout("closed".into(), Duration::from_secs(1)) {
        Err(TryAddError::Closed(s)) => assert_eq!(s, "closed"),
        other => panic!("add_timeout after close: {other:?}"),
    }
    match b.try_add("closed".into()) {
        Err(TryAddError::Closed(s)) => assert_eq!(s, "closed"),
        other => panic!("try_add after close: {other:?}"),
    }
}

/// This thread's time on a CPU so far, in nanoseconds, from the first field
/// of `/proc/thread-self/schedstat`.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

#[test]
fn blocked_producer_sleeps() {
    if thread_cpu_ns().is_none() {
        eprintln!("/proc/thread-self/schedstat unavailable: CPU check skipped");
        return;
    }
    let (b, started, gate) = gated();
    b.add("hold".into()).unwrap();
    assert_eq!(
        started.recv_timeout(Duration::from_secs(10)).unwrap(),
        "hold"
    );

    let (cpu, blocked) = std::thread::scope(|s| {
        let (adding_tx, adding_rx) = mpsc::channel();
        let b = &b;
        let producer = s.spawn(move || {
            let before = thread_cpu_ns().unwrap();
            let t0 = Instant::now();
            adding_tx.send(()).unwrap();
            b.add("blocked".into()).unwrap();
            let blocked = t0.elapsed();
            let after = thread_cpu_ns().unwrap();
            (Duration::from_nanos(after - before), blocked)
        });
        // The gate opens a second after the producer's clock started.
        adding_rx.recv().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        gate.send(()).unwrap();
        producer.join().unwrap()
    });
    let per_second = cpu.as_secs_f64() / blocked.as_secs_f64();
    eprintln!(
        "producer blocked in add for {blocked:?} used {cpu:?} of CPU ({:.3} ms per second blocked, {:.3}% of a core)",
        per_second * 1e3,
        per_second * 100.0
    );
    assert!(
        blocked >= Duration::from_millis(900),
        "add returned after {blocked:?}: not blocked"
    );
    assert!(
        per_second < 0.05,
        "blocked producer used {cpu:?} in {blocked:?}"
    );

    drop(gate);
    assert_eq!(b.close().unwrap().items, 2);
}
