#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Close and drop, handler errors, builder errors, auto traits.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snail_std::{Batcher, BuildError, Closed, TryAddError};

/// Runs `f` on its own thread and fails the test (instead of hanging) if it
/// does not finish in `limit`.
fn watchdog<F: FnOnce() + Send + 'static>(limit: Duration, f: F) {
    let (tx, rx) = mpsc::channel();
    let body = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => body.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(body.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("still running after {limit:?}: hung"),
    }
}

// ---- 13: auto traits -------------------------------------------------------

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Batcher<String>>();
    send_sync::<Batcher<u8>>();
    // Items need only be Send: the batcher never shares one between threads.
    send_sync::<Batcher<std::cell::Cell<u32>>>();
    send_sync::<Batcher<std::sync::mpsc::Sender<u8>>>();
    send_sync::<Closed<String>>();
    send_sync::<TryAddError<String>>();
    send_sync::<BuildError>();
    send_sync::<snail_std::HandlerPanicked>();
    send_sync::<snail_std::Report>();
};

#[test]
fn batcher_can_be_shared_in_an_arc() {
    let b = Arc::new(
        Batcher::<Box<u32>>::builder()
            .spawn(|_| Ok::<(), String>(()))
            .unwrap(),
    );
    let b2 = Arc::clone(&b);
    std::thread::spawn(move || b2.add(Box::new(1)).unwrap())
        .join()
        .unwrap();
    assert_eq!(b.close().unwrap().items, 1);
}

// ---- 4: drop without close, close twice, add after close ---------------------

fn collecting(linger: Duration) -> (Batcher<String>, Arc<Mutex<Vec<String>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = Arc::clone(&out);
    let b = Batcher::builder()
        .batch_size(64)
        .queue_size(64)
        .linger(linger)
        .spawn(move |batch| {
            o.lock().unwrap().extend(batch.drain());
            Ok::<(), String>(())
        })
        .unwrap();
    (b, out)
}

#[test]
fn drop_without_close_delivers_everything() {
    for linger in [Duration::MAX, Duration::from_millis(10), Duration::ZERO] {
        let (b, out) = collecting(linger);
        std::thread::scope(|s| {
            for t in 0..4 {
                let b = &b;
                s.spawn(move || {
                    for i in 0..1001 {
                        b.add(format!("{t}/{i}")).unwrap();
                    }
                });
            }
        });
        drop(b);
        let mut got = out.lock().unwrap().clone();
        assert_eq!(got.len(), 4004, "linger {linger:?}");
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 4004, "linger {linger:?}: duplicates");
    }
}

#[test]
fn drop_right_after_spawn_and_after_one_partial_item() {
    let (b, out) = collecting(Duration::MAX);
    drop(b);
    assert!(out.lock().unwrap().is_empty());
    let (b, out) = collecting(Duration::MAX);
    b.add("only".into()).unwrap();
    drop(b);
    assert_eq!(*out.lock().unwrap(), vec!["only".to_string()]);
}

#[test]
fn close_twice_returns_the_same_outcome() {
    let (b, out) = collecting(Duration::MAX);
    for i in 0..100 {
        b.add(i.to_string()).unwrap();
    }
    let first = b.close().unwrap();
    assert_eq!(first.items, 100);
    assert_eq!(first.batches, 2); // one full batch, one partial sealed by close
    assert!(b.is_closed());
    let second = b.close();
    assert_eq!(second, Ok(first));
    assert_eq!(out.lock().unwrap().len(), 100);
    assert_eq!(b.stats().delivered, first);
    drop(b); // a third close, through drop
}

/// A batcher whose handler, on its first batch, takes a handle to the
/// batcher, waits until the gate opens and passes the handle to
/// `on_first`, keeping whatever that returns; every batch's items go to the
/// returned receiver, which disconnects when the worker drops the handler.
/// Its worker is named [`SELF_AWARE`].
type SelfAware = (Arc<Batcher<u32>>, Gate, mpsc::Receiver<Vec<u32>>);

/// The name of [`self_aware`]'s worker.
const SELF_AWARE: &str = "snail-self-aware";

/// The handler's first call: `held` says it holds the batcher, `open` lets
/// it go on.
struct Gate {
    held: mpsc::Receiver<()>,
    open: mpsc::Sender<()>,
}

fn self_aware(
    on_first: impl FnOnce(Arc<Batcher<u32>>) -> Option<Arc<Batcher<u32>>> + Send + 'static,
) -> SelfAware {
    let me = Arc::new(std::sync::OnceLock::<std::sync::Weak<Batcher<u32>>>::new());
    let (held_tx, held_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel();
    let (items_tx, items_rx) = mpsc::channel();
    let mut on_first = Some(on_first);
    // What `on_first` returned: held until the worker drops the handler.
    let mut kept = Vec::new();
    let handler_me = Arc::clone(&me);
    let b = Arc::new(
        Batcher::<u32>::builder()
            .batch_size(1)
            .queue_size(10)
            .shards(1)
            .linger(Duration::MAX)
            .name(SELF_AWARE)
            .help_when_blocked(snail_std::Help::Never)
            .spawn(move |batch| {
                if let Some(f) = on_first.take() {
                    let me = handler_me.get().unwrap().upgrade().unwrap();
                    held_tx.send(()).unwrap();
                    gate_rx.recv().unwrap();
                    kept.extend(f(me));
                }
                items_tx.send(batch.drain().collect()).unwrap();
                Ok::<(), String>(())
            })
            .unwrap(),
    );
    me.set(Arc::downgrade(&b)).unwrap();
    let gate = Gate {
        held: held_rx,
        open: gate_tx,
    };
    (b, gate, items_rx)
}

/// The handler closes its own batcher: the call returns at once (it cannot
/// wait for the handler), later adds are refused, and the batches queued
/// before are still delivered. (Fixed bug: it joined its own thread, which
/// panicked, and the queued items were dropped as after a handler panic.)
#[test]
fn close_from_inside_the_handler_returns_at_once_and_loses_nothing() {
    watchdog(Duration::from_secs(60), || {
        let (closed_tx, closed_rx) = mpsc::channel();
        let (b, gate, items) = self_aware(move |me| {
            closed_tx.send(me.close()).unwrap();
            None
        });
        for i in 0..5 {
            b.add(i).unwrap(); // the first is held by the handler, 4 queue
        }
        gate.held.recv().unwrap();
        gate.open.send(()).unwrap();
        let inside = closed_rx.recv().unwrap().expect("no panic");
        assert_eq!(inside.items, 0, "nothing was delivered before");
        assert!(matches!(b.add(9), Err(Closed(9))));
        let report = b.close().expect("no panic");
        assert_eq!((report.items, report.batches), (5, 5));
        let got: Vec<u32> = items.iter().flatten().collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    });
}

/// The handler holds the last handle and drops it: the batcher closes
/// without waiting, and the worker delivers everything queued, then ends.
/// (Fixed bug: the drop joined the worker from the worker; every queued
/// item was lost without a word.)
#[test]
fn dropping_the_last_handle_inside_the_handler_delivers_everything() {
    watchdog(Duration::from_secs(60), || {
        let (b, gate, items) = self_aware(|_| None);
        for i in 0..5 {
            b.add(i).unwrap();
        }
        gate.held.recv().unwrap();
        drop(b); // not the last handle: the handler holds one
        gate.open.send(()).unwrap();
        // Disconnects once the worker has ended and dropped the handler.
        let got: Vec<u32> = items.iter().flatten().collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    });
}

/// Panics seen on threads named `name`, from the moment this is called (a
/// process-wide hook that passes every panic on to the previous one).
fn panics_on(name: &'static str) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(name) {
            record.lock().unwrap().push(info.to_string());
        }
        previous(info);
    }));
    seen
}

/// The handler closes its batcher from inside and keeps a handle to it,
/// which is the last when the worker drops the handler after the last
/// batch: the batcher's drop runs on the worker and must not join it.
/// (Fixed bug: it joined its own thread, which panicked.)
#[test]
fn a_handler_holding_the_last_handle_is_dropped_without_a_self_join() {
    let panics = panics_on(SELF_AWARE);
    watchdog(Duration::from_secs(60), move || {
        let (b, gate, items) = self_aware(|me| {
            me.close().expect("no panic");
            Some(me)
        });
        for i in 0..5 {
            b.add(i).unwrap();
        }
        gate.held.recv().unwrap();
        drop(b); // the handler's handle is now the last
        gate.open.send(()).unwrap();
        // Disconnects once the worker has dropped the handler.
        let got: Vec<u32> = items.iter().flatten().collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    });
    std::thread::sleep(Duration::from_millis(50));
    let seen = panics.lock().unwrap();
    assert!(seen.is_empty(), "panics on the worker: {seen:?}");
}

/// A's handler adds to B and, blocked, runs B's handler (helping), which
/// closes A: that is still inside A's handler, so it must not wait.
/// (Fixed bug: only the innermost handler was known, and A's close joined
/// A's worker from itself; a later close returned an empty report at once.)
#[test]
fn closing_a_batcher_from_a_nested_handler_returns_at_once() {
    watchdog(Duration::from_secs(60), || {
        let a_cell = Arc::new(std::sync::OnceLock::<Arc<Batcher<u32>>>::new());
        let (closed_tx, closed_rx) = mpsc::channel();
        let cell = Arc::clone(&a_cell);
        let b = Arc::new(
            Batcher::<u32>::builder()
                .batch_size(1)
                .queue_size(0)
                .shards(1)
                .linger(Duration::MAX)
                .help_when_blocked(snail_std::Help::Always)
                .spawn(move |_| {
                    if std::thread::current().name() == Some("snail-outer") {
                        let _ = closed_tx.send(cell.get().unwrap().close());
                    }
                    Ok::<(), String>(())
                })
                .unwrap(),
        );
        let inner = Arc::clone(&b);
        let outer = Arc::clone(&a_cell);
        let a = Arc::new(
            Batcher::<u32>::builder()
                .batch_size(1)
                .shards(1)
                .name("snail-outer")
                .help_when_blocked(snail_std::Help::Never)
                .spawn(move |_| {
                    // Until one of these adds blocks and helps B, whose
                    // handler then closes A.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !outer.get().unwrap().is_closed() && Instant::now() < deadline {
                        inner.add(0).unwrap();
                    }
                    Ok::<(), String>(())
                })
                .unwrap(),
        );
        a_cell.set(Arc::clone(&a)).ok().unwrap();
        a.add(1).unwrap();
        a.flush();
        let inside = closed_rx
            .recv_timeout(Duration::from_secs(40))
            .expect("A's worker never ran B's handler");
        assert_eq!(inside.expect("no panic").items, 0);
        let report = a.close().expect("no panic");
        assert_eq!((report.items, report.batches), (1, 1));
        b.close().expect("no panic");
    });
}

/// A producer blocked in `add` runs the handler (helping), which closes the
/// batcher: the close returns at once, the producer's item comes back as
/// `Closed`, and the owner's close still reports every accepted item.
/// (Before, the helper joined the worker, which waited for the handler
/// lock the helper held: a deadlock.)
#[test]
fn close_from_a_handler_running_on_a_helping_producer_returns_at_once() {
    watchdog(Duration::from_secs(60), || {
        let me = Arc::new(std::sync::OnceLock::<std::sync::Weak<Batcher<u64>>>::new());
        let handler_me = Arc::clone(&me);
        let (closed_tx, closed_rx) = mpsc::channel();
        let b = Arc::new(
            Batcher::<u64>::builder()
                .batch_size(1)
                .queue_size(0)
                .shards(1)
                .help_when_blocked(snail_std::Help::Always)
                .spawn(move |_| {
                    let on_worker = std::thread::current().name() == Some("snail-worker");
                    if !on_worker {
                        if let Some(b) = handler_me.get().and_then(|w| w.upgrade()) {
                            let _ = closed_tx.send(b.close());
                        }
                    }
                    Ok::<(), String>(())
                })
                .unwrap(),
        );
        me.set(Arc::downgrade(&b)).unwrap();
        let accepted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for i in 0..1_000_000 {
                        match b.add(i) {
                            Ok(()) => accepted.fetch_add(1, SeqCst),
                            Err(Closed(back)) => {
                                assert_eq!(back, i);
                                return;
                            }
                        };
                    }
                });
            }
        });
        let inside = closed_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no producer ever helped");
        inside.expect("no panic");
        let report = b.close().expect("no panic");
        assert_eq!(report.items, accepted.load(SeqCst) as u64);
    });
}

#[test]
fn add_after_close_hands_back_the_same_item() {
    let (b, out) = collecting(Duration::MAX);
    b.add("before".into()).unwrap();
    b.close().unwrap();

    let item = String::from("after add");
    let ptr = item.as_ptr();
    match b.add(item) {
        Err(Closed(back)) => {
            assert_eq!(back, "after add");
            assert_eq!(back.as_ptr(), ptr, "a different String came back");
        }
        Ok(()) => panic!("add after close accepted"),
    }
    let item = String::from("after try_add");
    let ptr = item.as_ptr();
    match b.try_add(item) {
        Err(TryAddError::Closed(back)) => assert_eq!(back.as_ptr(), ptr),
        other => panic!("try_add after close: {other:?}"),
    }
    match b.add_timeout("after add_timeout".into(), Duration::from_secs(5)) {
        Err(TryAddError::Closed(back)) => assert_eq!(back, "after add_timeout"),
        other => panic!("add_timeout after close: {other:?}"),
    }
    let many = vec!["m1".to_string(), "m2".into(), "m3".into()];
    let ptr = many[0].as_ptr();
    match b.add_many(many) {
        Err(Closed(back)) => assert_eq!(back.as_ptr(), ptr, "add_many must return its first item"),
        Ok(()) => panic!("add_many after close accepted"),
    }
    assert!(!b.flush());
    assert_eq!(*out.lock().unwrap(), vec!["before".to_string()]);
    assert_eq!(b.stats().added, 1);
}

#[test]
fn close_releases_blocked_producers_while_the_handler_runs() {
    watchdog(Duration::from_secs(60), || {
        let (started_tx, started_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let b = Arc::new(
            Batcher::<u64>::builder()
                .batch_size(1)
                .queue_size(0)
                .shards(1)
                .spawn(move |_batch| {
                    let _ = started_tx.send(());
                    let _ = gate_rx.recv();
                    Ok::<(), String>(())
                })
                .unwrap(),
        );
        b.add(0).unwrap();
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        for p in 1..=4u64 {
            let (b, done_tx) = (Arc::clone(&b), done_tx.clone());
            std::thread::spawn(move || {
                let r = b.add(p);
                done_tx.send((p, r, Instant::now())).unwrap();
            });
        }
        std::thread::sleep(Duration::from_millis(200)); // let them block
        assert!(
            done_rx.try_recv().is_err(),
            "a producer returned from add before the close, with the only buffer held"
        );
        let closing = Instant::now();
        let closer = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || b.close())
        };
        // The handler is still stuck, yet every blocked producer is released.
        for _ in 0..4 {
            let (p, r, at) = done_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("blocked producer hung");
            match r {
                Err(Closed(back)) => assert_eq!(back, p),
                Ok(()) => panic!("producer {p} was accepted while the only buffer was held"),
            }
            assert!(at >= closing, "producer {p} returned before the close");
        }
        assert!(
            !closer.is_finished(),
            "close returned while the handler was still running"
        );
        gate_tx.send(()).unwrap();
        let report = closer.join().unwrap().unwrap();
        assert_eq!(report.items, 1);
    });
}

// ---- 5: handler errors ---------------------------------------------------------

struct Bad(u32);

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad item {}", self.0)
    }
}

#[test]
fn handler_errors_are_counted_reported_and_survived() {
    let messages = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (m, h) = (Arc::clone(&messages), Arc::clone(&handled));
    let b = Batcher::<u32>::builder()
        .batch_size(1)
        .queue_size(4)
        .on_error(move |e| m.lock().unwrap().push(e.to_string()))
        .spawn(move |batch| {
            let item = batch[0];
            h.lock().unwrap().push(item);
            if item % 3 == 0 {
                Err(Bad(item))
            } else {
                Ok(())
            }
        })
        .unwrap();
    for i in 0..30 {
        b.add(i).unwrap();
    }
    // Counted while running, too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.stats().delivered.batches < 30 {
        assert!(Instant::now() < deadline, "worker stalled: {:?}", b.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(b.stats().delivered.handler_errors, 10);
    let report = b.close().unwrap();
    assert_eq!(report.items, 30);
    assert_eq!(report.batches, 30);
    assert_eq!(report.handler_errors, 10);
    assert_eq!(*handled.lock().unwrap(), (0..30).collect::<Vec<_>>());
    let want: Vec<String> = (0..30)
        .step_by(3)
        .map(|i| format!("bad item {i}"))
        .collect();
    assert_eq!(*messages.lock().unwrap(), want);
}

#[test]
fn handler_errors_without_a_hook_are_counted() {
    let b = Batcher::<u32>::builder()
        .batch_size(2)
        .spawn(|_| Err::<(), _>("always"))
        .unwrap();
    for i in 0..10 {
        b.add(i).unwrap();
    }
    let report = b.close().unwrap();
    assert_eq!(
        (report.items, report.batches, report.handler_errors),
        (10, 5, 5)
    );
}

// ---- 11: builder errors ----------------------------------------------------------

fn spawn_err<T: Send + 'static>(builder: snail_std::Builder<T>) -> BuildError {
    match builder.spawn(|_| Ok::<(), String>(())) {
        Ok(b) => panic!("spawned {b:?}"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

#[test]
fn builder_rejects_zero_sizes() {
    assert!(matches!(
        spawn_err(Batcher::<u64>::builder().batch_size(0)),
        BuildError::ZeroBatchSize
    ));
    assert!(matches!(
        spawn_err(Batcher::<u64>::builder().batch_size(0).queue_size(0)),
        BuildError::ZeroBatchSize
    ));
    assert!(matches!(
        spawn_err(Batcher::<u64>::builder().shards(0)),
        BuildError::ZeroShards
    ));
}

#[test]
fn builder_rejects_a_worker_name_with_a_nul_byte() {
    assert!(matches!(
        spawn_err(Batcher::<u64>::builder().name("log\0writer")),
        BuildError::NameWithNul
    ));
}

#[test]
fn builder_rejects_absurd_sizes() {
    let too_large = |e: BuildError| assert!(matches!(e, BuildError::TooLarge), "{e:?}");
    too_large(spawn_err(
        Batcher::<u64>::builder()
            .batch_size(1)
            .queue_size(usize::MAX),
    ));
    too_large(spawn_err(
        Batcher::<u64>::builder()
            .batch_size(2)
            .queue_size(usize::MAX),
    ));
    too_large(spawn_err(Batcher::<u64>::builder().queue_size(usize::MAX)));
    too_large(spawn_err(
        Batcher::<u64>::builder()
            .batch_size(usize::MAX)
            .queue_size(0),
    ));
    too_large(spawn_err(Batcher::<u64>::builder().batch_size(usize::MAX)));
    too_large(spawn_err(
        Batcher::<u8>::builder()
            .batch_size(usize::MAX / 2)
            .queue_size(0),
    ));
    too_large(spawn_err(
        Batcher::<[u8; 64]>::builder()
            .batch_size(usize::MAX / 64)
            .queue_size(0),
    ));
    // Fits in isize, but no allocator can provide 2^62 bytes.
    too_large(spawn_err(
        Batcher::<u64>::builder().batch_size(1 << 59).queue_size(0),
    ));
    too_large(spawn_err(
        Batcher::<u8>::builder()
            .batch_size(1 << 61)
            .queue_size(1 << 61),
    ));
    // Both factors fit, the product does not.
    too_large(spawn_err(
        Batcher::<u8>::builder()
            .batch_size(1 << 40)
            .queue_size(1 << 60)
            .shards(usize::MAX),
    ));
}

#[test]
fn builder_rejects_absurd_sizes_of_zero_sized_items() {
    // No bytes for the items, but a buffer table of usize::MAX entries.
    let e = spawn_err(
        Batcher::<()>::builder()
            .batch_size(1)
            .queue_size(usize::MAX - 1),
    );
    assert!(matches!(e, BuildError::TooLarge), "{e:?}");
    let e = spawn_err(
        Batcher::<()>::builder()
            .batch_size(1)
            .queue_size(usize::MAX - 1)
            .shards(usize::MAX),
    );
    assert!(matches!(e, BuildError::TooLarge), "{e:?}");
    let e = spawn_err(
        Batcher::<()>::builder()
            .batch_size(usize::MAX / 2 + 1)
            .queue_size(usize::MAX / 2),
    );
    assert!(matches!(e, BuildError::TooLarge), "{e:?}");
}

#[test]
fn huge_batches_of_zero_sized_items_spawn_at_once() {
    // usize::MAX items of () need no memory: spawning must not visit each.
    watchdog(Duration::from_secs(20), || {
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        let b = Batcher::<()>::builder()
            .batch_size(usize::MAX)
            .queue_size(0)
            .shards(1)
            .spawn(move |batch| {
                c.fetch_add(batch.drain().count(), SeqCst);
                Ok::<(), String>(())
            })
            .unwrap();
        assert_eq!(b.capacity(), usize::MAX);
        for _ in 0..1000 {
            b.add(()).unwrap();
        }
        assert_eq!(b.close().unwrap().items, 1000);
        assert_eq!(count.load(SeqCst), 1000);
    });
}

#[test]
fn builder_accepts_edge_sizes() {
    // queue_size 0, one shard: one buffer; producers wait while the worker
    // holds it.
    let (tx, rx) = mpsc::channel();
    let b = Batcher::<u32>::builder()
        .batch_size(3)
        .queue_size(0)
        .shards(1)
        .spawn(move |batch| {
            tx.send(batch.drain().collect::<Vec<_>>()).unwrap();
            Ok::<(), String>(())
        })
        .unwrap();
    assert_eq!((b.buffers(), b.capacity(), b.batch_size()), (1, 3, 3));
    std::thread::scope(|s| {
        for t in 0..3 {
            let b = &b;
            s.spawn(move || {
                for i in 0..100 {
                    b.add(t * 1000 + i).unwrap();
                }
            });
        }
    });
    assert_eq!(b.close().unwrap().items, 300);
    let mut all: Vec<u32> = rx.iter().flatten().collect();
    all.sort_unstable();
    let mut want: Vec<u32> = (0..3)
        .flat_map(|t| (0..100).map(move |i| t * 1000 + i))
        .collect();
    want.sort_unstable();
    assert_eq!(all, want);

    // Defaults: 1000 per batch, a shard per CPU (a power of two, at most
    // 64), one buffer per shard plus 2000/1000.
    let b = Batcher::<u8>::builder()
        .spawn(|_| Ok::<(), String>(()))
        .unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = 1 << cpus.min(64).ilog2();
    assert_eq!(b.shards(), shards);
    assert_eq!(
        (b.batch_size(), b.buffers(), b.capacity()),
        (1000, shards + 2, 1000 * (shards + 2))
    );
    // queue_size rounds up to whole buffers.
    let b = Batcher::<u8>::builder()
        .batch_size(10)
        .queue_size(11)
        .shards(3)
        .spawn(|_| Ok::<(), String>(()))
        .unwrap();
    assert_eq!(
        (b.shards(), b.buffers()),
        (2, 4),
        "3 shards round down to 2"
    );
    // More than 1024 shards are lowered, not refused.
    let b = Batcher::<u8>::builder()
        .batch_size(1)
        .queue_size(1)
        .shards(usize::MAX)
        .name("edge-test")
        .spawn(|_| Ok::<(), String>(()))
        .unwrap();
    assert_eq!((b.shards(), b.buffers()), (1024, 1025));
    for i in 0..10 {
        b.add(i).unwrap();
    }
    assert_eq!(b.close().unwrap().items, 10);
    // Buffers of usize::MAX items: far more than memory can hold.
    assert!(matches!(
        Batcher::<u8>::builder()
            .batch_size(usize::MAX)
            .queue_size(usize::MAX)
            .spawn(|_| Ok::<(), String>(())),
        Err(snail_std::BuildError::TooLarge)
    ));
}

// ---- adds from thread-local destructors ------------------------------------

/// Adds from a thread-local's destructor, before and after the batcher's
/// own thread-locals of that thread (its lock slot and route) are gone,
/// while other threads start and take pooled slots: every item arrives
/// once, each thread's in order.
#[test]
fn adds_from_thread_local_destructors_arrive() {
    struct AddOnDrop(Option<(Arc<Batcher<String>>, usize)>);
    impl Drop for AddOnDrop {
        fn drop(&mut self) {
            if let Some((b, t)) = self.0.take() {
                for i in 0..100 {
                    b.add(format!("{t}:{}", i + 1)).unwrap();
                }
            }
        }
    }
    thread_local!(static LAST: std::cell::RefCell<AddOnDrop> = const { std::cell::RefCell::new(AddOnDrop(None)) });

    watchdog(Duration::from_secs(60), || {
        let (b, out) = collecting(Duration::from_millis(1));
        let b = Arc::new(b);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    // Even threads set theirs up before their first add
                    // (so it is destroyed after the batcher's, with glibc's
                    // reverse order), odd ones after.
                    if t % 2 == 1 {
                        b.add(format!("{t}:0")).unwrap();
                    }
                    LAST.with(|l| l.borrow_mut().0 = Some((Arc::clone(&b), t)));
                    if t % 2 == 0 {
                        b.add(format!("{t}:0")).unwrap();
                    }
                })
            })
            .collect();
        for h in threads {
            h.join().unwrap();
        }
        let b = Arc::try_unwrap(b).expect("threads gave their batcher back");
        assert_eq!(b.close().unwrap().items, 8 * 101);
        let mut next = [0usize; 8];
        for item in out.lock().unwrap().iter() {
            let (t, i) = item.split_once(':').unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [101; 8]);
    });
}
