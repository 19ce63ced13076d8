#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! A handler panic while producers are blocked on a full batcher: every
//! blocked producer gets `Closed` with its item back promptly, later adds
//! are refused, `close` reports the panic, and every offered item is
//! accounted for:
//! delivered + in the panicking batch + dropped + refused == offered.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snail_std::{Batcher, Closed, HandlerPanicked, TryAddError};

const PRODUCERS: usize = 8;
const PER: u64 = 2_000;
const PANIC_ON: u64 = 5;

struct Outcome {
    accepted: u64,
    refused: u64,
    first_refusal: Option<Instant>,
    accepted_after_refusal: u64,
}

#[test]
fn handler_panic_releases_blocked_producers_and_loses_nothing_silently() {
    let in_add = Arc::new(AtomicUsize::new(0));
    let batches = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let panicked_at = Arc::new(Mutex::new(None::<Instant>));
    let all_blocked = Arc::new(AtomicUsize::new(0));
    let panicking_len = Arc::new(AtomicU64::new(0));

    let b = {
        let (in_add, batches, seen, panicked_at, all_blocked, panicking_len) = (
            Arc::clone(&in_add),
            Arc::clone(&batches),
            Arc::clone(&seen),
            Arc::clone(&panicked_at),
            Arc::clone(&all_blocked),
            Arc::clone(&panicking_len),
        );
        Arc::new(
            Batcher::<u64>::builder()
                .batch_size(2)
                .queue_size(2)
                .shards(1)
                .linger(Duration::from_millis(1))
                .spawn(move |batch| {
                    let n = batches.fetch_add(1, SeqCst) + 1;
                    seen.fetch_add(batch.len() as u64, SeqCst);
                    if n == PANIC_ON {
                        // This batch holds one buffer (full, or partial when
                        // the linger ran out between two slow adds) and the
                        // other fills: wait until every producer is stuck in
                        // `add`.
                        panicking_len.store(batch.len() as u64, SeqCst);
                        let deadline = Instant::now() + Duration::from_secs(20);
                        while in_add.load(SeqCst) < PRODUCERS && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        all_blocked.store(in_add.load(SeqCst), SeqCst);
                        std::thread::sleep(Duration::from_millis(50)); // let them fall asleep
                        *panicked_at.lock().unwrap() = Some(Instant::now());
                        panic!("boom on batch {n}");
                    }
                    Ok::<(), String>(())
                })
                .unwrap(),
        )
    };
    assert_eq!(b.buffers(), 2);

    let (done_tx, done_rx) = mpsc::channel();
    for p in 0..PRODUCERS {
        let (b, in_add, done_tx) = (Arc::clone(&b), Arc::clone(&in_add), done_tx.clone());
        std::thread::spawn(move || {
            let mut o = Outcome {
                accepted: 0,
                refused: 0,
                first_refusal: None,
                accepted_after_refusal: 0,
            };
            for i in 0..PER {
                let item = ((p as u64) << 32) | i;
                in_add.fetch_add(1, SeqCst);
                let r = b.add(item);
                in_add.fetch_sub(1, SeqCst);
                match r {
                    Ok(()) if o.first_refusal.is_some() => o.accepted_after_refusal += 1,
                    Ok(()) => o.accepted += 1,
                    Err(Closed(back)) => {
                        assert_eq!(back, item, "a different item came back");
                        o.refused += 1;
                        o.first_refusal.get_or_insert_with(Instant::now);
                    }
                }
            }
            done_tx.send(o).unwrap();
        });
    }
    drop(done_tx);

    // Watchdog: a producer that never returns fails the test instead of
    // hanging it.
    let mut outcomes = Vec::new();
    for _ in 0..PRODUCERS {
        outcomes.push(
            done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a producer hung"),
        );
    }
    let panicked_at = panicked_at
        .lock()
        .unwrap()
        .expect("the handler never panicked");
    assert_eq!(
        all_blocked.load(SeqCst),
        PRODUCERS,
        "not every producer was blocked at the panic"
    );

    let mut max_release = Duration::ZERO;
    for (p, o) in outcomes.iter().enumerate() {
        let first = o
            .first_refusal
            .unwrap_or_else(|| panic!("producer {p} was never refused"));
        let release = first.saturating_duration_since(panicked_at);
        max_release = max_release.max(release);
        assert!(
            release < Duration::from_secs(10),
            "producer {p} released {release:?} after the panic"
        );
        assert_eq!(
            o.accepted_after_refusal, 0,
            "producer {p}: an add succeeded after Closed"
        );
        assert_eq!(o.accepted + o.refused, PER);
    }
    eprintln!("{PRODUCERS} blocked producers released at most {max_release:?} after the panic");

    assert!(b.is_closed());
    assert!(matches!(b.add(7), Err(Closed(7))));
    assert!(matches!(b.try_add(8), Err(TryAddError::Closed(8))));
    assert!(matches!(
        b.add_timeout(9, Duration::from_secs(1)),
        Err(TryAddError::Closed(9))
    ));

    let err: HandlerPanicked = b.close().unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.message, format!("boom on batch {PANIC_ON}"));
    assert!(err.to_string().contains("boom on batch"));
    assert_eq!(err.report.batches, PANIC_ON - 1);
    // Under emulation the 1 ms linger can seal the batch after one item.
    let in_panicking_batch = panicking_len.load(SeqCst);
    assert!((1..=2).contains(&in_panicking_batch));
    assert_eq!(err.batch_items, in_panicking_batch);
    assert_eq!(err.report.handler_errors, 0);
    // close again: the same outcome.
    assert_eq!(b.close(), Err(err.clone()));

    let accepted: u64 = outcomes.iter().map(|o| o.accepted).sum();
    let refused: u64 = outcomes.iter().map(|o| o.refused).sum();
    let offered = PRODUCERS as u64 * PER;
    assert_eq!(accepted + refused, offered);
    assert_eq!(
        err.report.items + err.batch_items + err.dropped_items,
        accepted,
        "accepted items neither delivered nor reported dropped: {err:?}"
    );
    assert_eq!(err.report.items + err.batch_items, seen.load(SeqCst));
    assert_eq!(
        batches.load(SeqCst),
        PANIC_ON,
        "the handler ran after it panicked"
    );
    assert_eq!(b.stats().added, accepted);
    assert_eq!(b.stats().held, 0);
    eprintln!(
        "offered {offered}: delivered {} + panicking batch {} + dropped {} + refused {refused}",
        err.report.items, err.batch_items, err.dropped_items
    );
}

#[test]
fn handler_panic_with_queued_batches_counts_them_dropped() {
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let b = Batcher::<u32>::builder()
        .batch_size(4)
        .queue_size(12)
        .linger(Duration::MAX)
        .shards(1)
        .spawn(move |_batch| -> Result<(), String> {
            let _ = gate_rx.recv();
            panic!("{}", String::from("owned message"));
        })
        .unwrap();
    for i in 0..4 {
        b.add(i).unwrap(); // sealed: the worker takes it and waits
    }
    // Wait until the worker holds that batch.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.stats().held != 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 4..14 {
        b.add(i).unwrap(); // two sealed batches and a partial one of 2
    }
    assert_eq!(b.stats().held, 10);
    gate_tx.send(()).unwrap();
    let err = b.close().unwrap_err();
    assert_eq!(err.message, "owned message");
    assert_eq!(
        (err.batch_items, err.dropped_items, err.report.items),
        (4, 10, 0)
    );
}

#[test]
fn drop_after_handler_panic_does_not_panic() {
    let b = Batcher::<u32>::builder()
        .batch_size(1)
        .spawn(|_batch| -> Result<(), String> { std::panic::panic_any(42u32) })
        .unwrap();
    b.add(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.is_closed() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = b.add(2);
    assert!(matches!(r, Err(Closed(2))));
    drop(b); // reports on stderr, must not panic
}

/// Panics on drop when armed with a flag (and not already unwinding),
/// after raising the flag.
struct Bomb(Option<&'static AtomicBool>);

impl Drop for Bomb {
    fn drop(&mut self) {
        if let Some(went_off) = self.0 {
            if !std::thread::panicking() {
                went_off.store(true, SeqCst);
                panic!("a bomb went off");
            }
        }
    }
}

/// The worker drops the handler after the last batch: a panic there is the
/// handler's, reported with everything that was delivered. (Fixed bug: the
/// report said nothing was delivered.)
#[test]
fn a_panicking_handler_destructor_is_reported_with_what_was_delivered() {
    static HANDLER_BOMB: AtomicBool = AtomicBool::new(false);
    let state = Bomb(Some(&HANDLER_BOMB));
    let b = Batcher::<u32>::builder()
        .batch_size(2)
        .spawn(move |_batch| {
            let _ = &state;
            Ok::<(), String>(())
        })
        .unwrap();
    for i in 0..10 {
        b.add(i).unwrap();
    }
    let err = b.close().unwrap_err();
    assert_eq!(err.message, "a bomb went off");
    assert!(HANDLER_BOMB.load(SeqCst));
    assert_eq!((err.batch_items, err.dropped_items), (0, 0));
    assert_eq!((err.report.items, err.report.batches), (10, 5));
    assert_eq!(b.close().unwrap_err(), err, "the same outcome again");
}

/// An item that panics as it is dropped after a handler panic neither
/// kills the worker nor hides the handler's panic: `close` reports that
/// panic, the batch it hit, the items dropped after it and what was
/// delivered before. (Until 2026-11-27 the destructor's panic killed the
/// worker and was reported instead.)
#[test]
fn an_item_panicking_as_it_is_dropped_after_a_handler_panic_is_counted() {
    static ITEM_BOMB: AtomicBool = AtomicBool::new(false);
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let b = Batcher::<Bomb>::builder()
        .batch_size(2)
        .queue_size(4)
        .linger(Duration::MAX)
        .shards(1)
        .spawn(move |batch| {
            let _ = gate_rx.recv();
            if batch.len() == 1 {
                panic!("the handler fails");
            }
            Ok::<(), String>(())
        })
        .unwrap();
    b.add_many([Bomb(None), Bomb(None)]).unwrap(); // delivered
    b.add(Bomb(None)).unwrap();
    b.flush(); // [false]: the handler panics on it
    b.add_many([Bomb(Some(&ITEM_BOMB)), Bomb(None)]).unwrap(); // dropped after the panic
    for _ in 0..2 {
        gate_tx.send(()).unwrap();
    }
    let err = b.close().unwrap_err();
    assert_eq!(err.message, "the handler fails");
    assert_eq!((err.batch_items, err.dropped_items), (1, 2));
    assert_eq!((err.report.items, err.report.batches), (2, 1));
    assert!(
        ITEM_BOMB.load(SeqCst),
        "the item's destructor did not panic"
    );
}

/// Panics whenever it is dropped with `true`, even while a panic unwinds
/// (where `Bomb` holds back: a second panic in an unwind aborts).
struct Mine(bool);

impl Drop for Mine {
    fn drop(&mut self) {
        if self.0 {
            panic!("a mine went off");
        }
    }
}

/// The handler panics, leaving an item in its batch that panics as it is
/// dropped. The batch is dropped after the handler's panic was caught, not
/// while it unwinds, so the process does not abort: `close` reports the
/// handler's panic. (Before 2026-11-28 the batch was dropped during the
/// unwind, and such an item aborted the process.)
#[test]
fn an_item_of_the_panicking_batch_that_panics_as_it_is_dropped() {
    let b = Batcher::<Mine>::builder()
        .batch_size(2)
        .linger(Duration::MAX)
        .shards(1)
        .spawn(|batch| {
            if batch.iter().any(|m| m.0) {
                panic!("the handler fails");
            }
            Ok::<(), String>(())
        })
        .unwrap();
    b.add_many([Mine(false), Mine(false)]).unwrap(); // delivered
    b.add_many([Mine(true), Mine(false)]).unwrap(); // the handler panics
    let err = b.close().unwrap_err();
    assert_eq!(err.message, "the handler fails");
    assert_eq!((err.batch_items, err.dropped_items), (2, 0));
    assert_eq!((err.report.items, err.report.batches), (2, 1));
}

/// An item that closes its batcher as it is dropped: it reaches the
/// batcher through `me` and sends what `close` returned.
struct Closer {
    me: Arc<std::sync::OnceLock<std::sync::Weak<Batcher<Closer>>>>,
    closed: Option<mpsc::Sender<Result<snail_std::Report, HandlerPanicked>>>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        if let Some(tx) = self.closed.take() {
            if let Some(b) = self.me.get().and_then(|w| w.upgrade()) {
                let _ = tx.send(b.close());
            }
        }
    }
}

/// The handler panics and leaves an item whose destructor calls `close`.
/// That item is dropped as the handler's (on the worker thread), so its
/// `close` returns at once instead of joining the worker from the worker,
/// and the owner's `close` still reports the handler's panic. (Before
/// 2026-11-28 the item was dropped outside the handler's mark: its `close`
/// took the worker's handle and failed to join it, and the owner's `close`
/// then found no worker and reported success.)
#[test]
fn an_item_of_the_panicking_batch_that_closes_the_batcher_as_it_is_dropped() {
    let me = Arc::new(std::sync::OnceLock::new());
    let b = Arc::new(
        Batcher::<Closer>::builder()
            .batch_size(2)
            .linger(Duration::MAX)
            .shards(1)
            .spawn(|batch| {
                if batch.iter().any(|c| c.closed.is_some()) {
                    panic!("the handler fails");
                }
                Ok::<(), String>(())
            })
            .unwrap(),
    );
    me.set(Arc::downgrade(&b)).unwrap();
    let (tx, rx) = mpsc::channel();
    let item = |closed| Closer {
        me: Arc::clone(&me),
        closed,
    };
    b.add_many([item(None), item(None)]).unwrap(); // delivered
    b.add_many([item(Some(tx)), item(None)]).unwrap(); // the handler panics
    let inside = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the item's close returned");
    assert_eq!(inside.expect("not the outcome yet").items, 2);
    let err = b.close().unwrap_err();
    assert_eq!(err.message, "the handler fails");
    assert_eq!((err.batch_items, err.dropped_items), (2, 0));
    assert_eq!((err.report.items, err.report.batches), (2, 1));
}
