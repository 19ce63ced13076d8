#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Exact destructor counts: every item is dropped exactly once, by whoever
//! owns it last (the handler, the batch guard, a drain, close, the panic
//! clean-up, or the caller that got it back), never twice and never by
//! anyone else.

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snail_std::{Batcher, Closed};

/// Per-item drop counters.
struct Log(Vec<AtomicU32>);

impl Log {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self((0..n).map(|_| AtomicU32::new(0)).collect()))
    }
    fn count(&self, id: usize) -> u32 {
        self.0[id].load(SeqCst)
    }
    fn counts(&self) -> Vec<u32> {
        self.0.iter().map(|c| c.load(SeqCst)).collect()
    }
    fn assert_all(&self, want: u32, what: &str) {
        let counts = self.counts();
        let bad: Vec<_> = counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != want)
            .collect();
        assert!(bad.is_empty(), "{what}: (id, drops) not {want}: {bad:?}");
    }
}

struct Tracked {
    id: usize,
    log: Arc<Log>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.log.0[self.id].fetch_add(1, SeqCst);
    }
}

fn items(log: &Arc<Log>, ids: std::ops::Range<usize>) -> impl Iterator<Item = Tracked> + '_ {
    ids.map(move |id| Tracked {
        id,
        log: Arc::clone(log),
    })
}

const N: usize = 1000;

fn builder() -> snail_std::Builder<Tracked> {
    Batcher::builder()
        .batch_size(16)
        .queue_size(48)
        .linger(Duration::from_millis(1))
}

#[test]
fn drained_items_are_dropped_by_their_new_owner_only() {
    let log = Log::new(N);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let k = Arc::clone(&kept);
    let b = builder()
        .spawn(move |batch| {
            k.lock().unwrap().extend(batch.drain());
            Ok::<(), String>(())
        })
        .unwrap();
    b.add_many(items(&log, 0..N / 2)).unwrap();
    for it in items(&log, N / 2..N) {
        b.add(it).unwrap();
    }
    assert_eq!(b.close().unwrap().items, N as u64);
    log.assert_all(0, "drained, still held by the test");
    assert_eq!(kept.lock().unwrap().len(), N);
    kept.lock().unwrap().clear();
    log.assert_all(1, "drained, then dropped by the test");
}

#[test]
fn partially_drained_batches_drop_the_rest_once() {
    let log = Log::new(N);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let leaked = Arc::new(Mutex::new(Vec::new()));
    let (k, l) = (Arc::clone(&kept), Arc::clone(&leaked));
    let b = builder()
        .spawn(move |batch| {
            let mut kept = k.lock().unwrap();
            match batch.len() % 3 {
                // Keep two, drop the rest with the Drain.
                0 => kept.extend(batch.drain().take(2)),
                // Touch the items in place, keep none.
                1 => {
                    batch.reverse();
                    let _ = batch.drain().next();
                }
                // Swap the ends in place, keep the first, leak the
                // second, keep the third, and leave the rest to the Drain.
                _ => {
                    let last = batch.len() - 1;
                    batch.swap(0, last);
                    let mut d = batch.drain();
                    kept.push(d.next().unwrap());
                    let leak = d.next().unwrap(); // batches of 2, 5, 8, ...
                    l.lock().unwrap().push(leak.id);
                    std::mem::forget(leak);
                    kept.extend(d.next());
                }
            }
            Ok::<(), String>(())
        })
        .unwrap();
    // Vary the batch lengths with flushes.
    let mut id = 0;
    for chunk in [16usize, 5, 7, 1, 16, 3, 2, 9].iter().cycle() {
        let end = (id + chunk).min(N);
        b.add_many(items(&log, id..end)).unwrap();
        b.flush();
        id = end;
        if id == N {
            break;
        }
    }
    assert_eq!(b.close().unwrap().items, N as u64);
    let kept_ids: Vec<usize> = kept.lock().unwrap().iter().map(|t| t.id).collect();
    let leaked = leaked.lock().unwrap().clone();
    assert!(!leaked.is_empty(), "no batch took the leaking branch");
    // Kept and leaked ones: not dropped; all others: exactly once.
    for (id, &count) in log.counts().iter().enumerate() {
        let held = kept_ids.contains(&id) || leaked.contains(&id);
        assert_eq!(
            count,
            u32::from(!held),
            "item {id} (kept or leaked: {held})"
        );
    }
    kept.lock().unwrap().clear();
    for (id, &count) in log.counts().iter().enumerate() {
        assert_eq!(count, u32::from(!leaked.contains(&id)), "item {id}");
    }
}

#[test]
fn items_left_in_the_batch_are_dropped_by_the_guard() {
    let log = Log::new(N);
    let (tx, rx) = mpsc::channel();
    let l = Arc::clone(&log);
    let b = builder()
        .spawn(move |batch| {
            // Nothing in this batch has been dropped while the handler runs.
            let undropped = batch.iter().all(|t| l.count(t.id) == 0);
            tx.send(undropped).unwrap();
            Ok::<(), String>(())
        })
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (b, log) = (&b, &log);
            s.spawn(move || {
                for it in items(log, t * N / 4..(t + 1) * N / 4) {
                    b.add(it).unwrap();
                }
            });
        }
    });
    let report = b.close().unwrap();
    assert!(
        rx.iter().all(|ok| ok),
        "an item was dropped before its handler ran"
    );
    assert_eq!(report.items, N as u64);
    log.assert_all(1, "not drained by the handler");
}

#[test]
fn items_pending_at_close_or_drop_and_refused_items() {
    for by_drop in [false, true] {
        let log = Log::new(40);
        let b = builder()
            .linger(Duration::MAX)
            .spawn(|_| Ok::<(), String>(()))
            .unwrap();
        b.add_many(items(&log, 0..10)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        log.assert_all(0, "pending, not yet closed");
        if by_drop {
            drop(b);
            assert_eq!(&log.counts()[..10], &[1; 10], "pending at drop");
            assert_eq!(&log.counts()[10..], &[0; 30]);
            continue;
        }
        assert_eq!(b.close().unwrap().items, 10);
        let counts = log.counts();
        assert_eq!(&counts[..10], &[1; 10], "pending at close");
        // Refused after close: handed back, not dropped by the batcher.
        let back = match b.add(Tracked {
            id: 10,
            log: Arc::clone(&log),
        }) {
            Err(Closed(back)) => back,
            Ok(()) => panic!("accepted after close"),
        };
        assert_eq!(log.count(10), 0);
        drop(back);
        assert_eq!(log.count(10), 1);
        let back = b
            .try_add(Tracked {
                id: 11,
                log: Arc::clone(&log),
            })
            .unwrap_err()
            .into_inner();
        assert_eq!(log.count(11), 0);
        drop(back);
        // add_many: the first item comes back, the iterator's rest is dropped.
        let back = match b.add_many(items(&log, 12..20).collect::<Vec<_>>()) {
            Err(Closed(back)) => back,
            Ok(()) => panic!("accepted after close"),
        };
        assert_eq!(back.id, 12);
        assert_eq!(log.count(12), 0);
        assert_eq!(&log.counts()[13..20], &[1; 7]);
        drop(back);
        drop(b);
        assert_eq!(&log.counts()[..20], &[1; 20]);
    }
}

#[test]
fn items_dropped_after_a_handler_panic() {
    let log = Log::new(20);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let k = Arc::clone(&kept);
    let b = Batcher::builder()
        .batch_size(4)
        .queue_size(12)
        .linger(Duration::MAX)
        .shards(1)
        .spawn(move |batch| -> Result<(), String> {
            let _ = gate_rx.recv();
            let mut d = batch.drain();
            k.lock().unwrap().push(d.next().unwrap());
            panic!("mid-drain");
        })
        .unwrap();
    b.add_many(items(&log, 0..4)).unwrap(); // taken by the worker
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.stats().held != 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    b.add_many(items(&log, 4..14)).unwrap(); // two sealed, one partial of 2
    log.assert_all(0, "nothing dropped yet");
    gate_tx.send(()).unwrap();
    let err = b.close().unwrap_err();
    assert_eq!((err.batch_items, err.dropped_items), (4, 10));
    let counts = log.counts();
    assert_eq!(counts[0], 0, "the item the handler took was dropped");
    assert_eq!(&counts[1..14], &[1; 13], "panicking batch and queued items");
    // Refused after the panic: handed back.
    let back = b
        .add(Tracked {
            id: 14,
            log: Arc::clone(&log),
        })
        .unwrap_err()
        .0;
    assert_eq!(log.count(14), 0);
    drop(back);
    drop(b);
    kept.lock().unwrap().clear();
    assert_eq!(&log.counts()[..15], &[1; 15]);
}
