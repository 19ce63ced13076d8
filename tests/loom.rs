#![cfg(snail_loom)]
//! Loom models of the batching core.
//!
//! Run with
//! `RUSTFLAGS="--cfg snail_loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release -p snail --test loom`.
//!
//! Every model checks that each accepted item comes out exactly once, that
//! each producer's items come out in the order it added them, and (through
//! [`Drops`]) that every item ever created is dropped exactly once.
//!
//! Item slots are plain `core::cell::UnsafeCell`s even under loom (batches
//! deref to `&[T]`); under `--cfg snail_loom` the storage gives each slot a
//! loom "shadow" cell that every slot access touches, so loom checks the
//! slot accesses like its own cells. On top of that each [`Item`] carries a
//! loom cell written by the thread that made it and read by every thread
//! that later looks at or drops it, and [`Drops::touch`] gives loom a common
//! object to interleave item accesses on.
//!
//! Waiting: models never let two threads spin (yield in a loop) at the same
//! time, see [`Wake`].
//!
//! Models are kept small (2–3 threads, batches of 1–3, 1–3 buffers): the
//! whole file runs in seconds with `LOOM_MAX_PREEMPTIONS=2`.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use loom::cell::UnsafeCell;
use loom::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::Arc;
use loom::thread;

use snail::relax::{Loop, Relax};
use snail::{
    Batcher, Bias, BiasSlot, BiasedLock, Closed, Full, RawBatcher, RawLock, ShardedBatcher,
    SpinLock, Storage,
};

// ---------------------------------------------------------------------------
// Items and bookkeeping
// ---------------------------------------------------------------------------

/// Most producers and items per producer a model uses.
const MAX_P: usize = 4;
const MAX_SEQ: usize = 8;

/// Counts, per item, how often it was created (made or cloned) and dropped
/// (plain std atomics: bookkeeping, not part of what is checked), and makes
/// item accesses visible to loom's scheduler.
#[derive(Clone)]
struct Drops {
    counts: std::sync::Arc<[[AtomicU32; 2]; MAX_P * MAX_SEQ]>,
    /// Touched whenever an item is made, looked at or dropped, and by each
    /// producer thread when it finishes. The slots are plain cells that loom
    /// does not see, so without a common loom object loom would treat a
    /// consumer reading or dropping a slot and a producer writing it as
    /// independent and never interleave them. A Relaxed read-modify-write:
    /// it adds scheduling points, not synchronisation.
    touch: Arc<AtomicUsize>,
}

impl Drops {
    fn new() -> Self {
        Drops {
            counts: std::sync::Arc::new(core::array::from_fn(|_| {
                [AtomicU32::new(0), AtomicU32::new(0)]
            })),
            touch: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn touch(&self) {
        self.touch.fetch_add(1, Relaxed);
    }

    /// Item `seq` of producer `p`.
    fn item(&self, p: usize, seq: usize) -> Item {
        assert!(p < MAX_P && seq < MAX_SEQ);
        self.touch();
        self.counts[p * MAX_SEQ + seq][0].fetch_add(1, SeqCst);
        Item {
            p,
            seq,
            stamp: UnsafeCell::new(p * MAX_SEQ + seq),
            drops: self.clone(),
        }
    }

    /// Every item ever created was dropped exactly once, and `made[p]` items
    /// were made for producer `p` (each at least once).
    fn assert_all_dropped(&self, made: &[usize]) {
        for (i, [created, dropped]) in self.counts.iter().enumerate() {
            let (p, seq) = (i / MAX_SEQ, i % MAX_SEQ);
            let (c, d) = (created.load(SeqCst), dropped.load(SeqCst));
            assert_eq!(
                c, d,
                "item ({p}, {seq}): created {c} times, dropped {d} times"
            );
            let expected = p < made.len() && seq < made[p];
            assert_eq!(c > 0, expected, "item ({p}, {seq}) created: {c}");
        }
    }
}

/// An item: who made it, its place in that producer's sequence, and a loom
/// cell that carries the maker's causality to whoever reads it.
struct Item {
    p: usize,
    seq: usize,
    stamp: UnsafeCell<usize>,
    drops: Drops,
}

impl Item {
    /// `(producer, seq)`; reading the stamp makes loom check that the maker's
    /// writes happen-before this thread's read.
    fn id(&self) -> (usize, usize) {
        self.drops.touch();
        // SAFETY: the stamp is only written when the item is made.
        let stamp = self.stamp.with(|s| unsafe { *s });
        assert_eq!(stamp, self.p * MAX_SEQ + self.seq, "item corrupted");
        (self.p, self.seq)
    }
}

impl Clone for Item {
    fn clone(&self) -> Self {
        let (p, seq) = self.id();
        self.drops.item(p, seq)
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        let (p, seq) = self.id();
        let [created, dropped] = &self.drops.counts[p * MAX_SEQ + seq];
        let d = dropped.fetch_add(1, SeqCst) + 1;
        assert!(d <= created.load(SeqCst), "item ({p}, {seq}) dropped twice");
    }
}

/// Spawns a producer thread that touches `d` when it is done (see
/// [`Drops::touch`]).
fn spawn_producer<T: 'static>(
    d: Drops,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(move || {
        let out = f();
        d.touch();
        out
    })
}

/// Items in the order the consumer saw them.
type Log = Vec<(usize, usize)>;

/// Each producer `p`'s items in `log` are exactly `0..accepted[p]`, in order:
/// every accepted item once, nothing else, per-producer order kept.
fn check(log: &[(usize, usize)], accepted: &[usize]) {
    for (p, &n) in accepted.iter().enumerate() {
        let got: Vec<usize> = log
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|&(_, s)| s)
            .collect();
        let want: Vec<usize> = (0..n).collect();
        assert_eq!(got, want, "producer {p}: log {log:?}");
    }
    assert!(
        log.iter().all(|&(p, _)| p < accepted.len()),
        "stray item in {log:?}"
    );
}

/// Takes one batch if there is one: moves its items out, in order, into
/// `log`. Returns the batch's length.
fn take_one<S, L, R>(b: &RawBatcher<Item, S, L, R>, log: &mut Log) -> Option<usize>
where
    S: Storage<Item, L>,
    L: RawLock,
    R: Relax,
{
    let mut batch = b.try_take()?;
    let n = batch.len();
    assert!(n > 0 && n <= b.batch_size());
    log.extend(batch.drain().map(|item| item.id()));
    assert!(batch.is_empty());
    Some(n)
}

/// Like [`take_one`], but reads the items in place and lets the guard drop
/// them.
fn take_one_in_place<S, L, R>(b: &RawBatcher<Item, S, L, R>, log: &mut Log) -> Option<usize>
where
    S: Storage<Item, L>,
    L: RawLock,
    R: Relax,
{
    let batch = b.try_take()?;
    log.extend(batch.iter().map(Item::id));
    Some(batch.len())
}

/// Wakes the consumer after a producer sealed a batch, as a real consumer
/// is woken: a flag (Release/Acquire, so the wake-up itself is a handoff)
/// and a loom `Notify` to block on.
///
/// Models never let two threads spin at once. A blocked loom thread is not
/// scheduled, but two spinning threads (say a consumer polling `try_take`
/// and a producer, both waiting for locks held by a preempted third thread)
/// can be alternated by loom forever, and the model gives up with "exceeded
/// maximum number of branches". Likewise a consumer polling `try_take` in an
/// unbounded loop can, in loom's eyes, starve a producer that waits for the
/// queue lock. So consumers block here until a batch was sealed, or poll a
/// bounded number of times.
#[derive(Clone)]
struct Wake(Arc<(AtomicBool, loom::sync::Notify)>);

impl Wake {
    fn new() -> Self {
        Wake(Arc::new((
            AtomicBool::new(false),
            loom::sync::Notify::new(),
        )))
    }

    fn wake(&self) {
        self.0 .0.store(true, Release);
        self.0 .1.notify();
    }

    /// Blocks until `wake` was called (`Notify` may wake spuriously).
    fn wait(&self) {
        while !self.0 .0.load(Acquire) {
            self.0 .1.wait();
        }
    }
}

/// Waits on `wake`, then takes a batch (as [`take_one`]), which must be
/// there; returns its length.
fn take_when_woken<S, L, R>(b: &RawBatcher<Item, S, L, R>, wake: &Wake, log: &mut Log) -> usize
where
    S: Storage<Item, L>,
    L: RawLock,
    R: Relax,
{
    wake.wait();
    assert!(b.has_sealed());
    take_one(b, log).expect("woken for a sealed batch, but none to take")
}

/// After every thread joined: seals what is left, takes everything, and
/// checks that the batcher is empty and its counters add up. Returns the
/// number of batches taken.
fn drain_rest<S, L, R>(b: &RawBatcher<Item, S, L, R>, log: &mut Log) -> usize
where
    S: Storage<Item, L>,
    L: RawLock,
    R: Relax,
{
    b.flush();
    let mut batches = 0;
    while take_one(b, log).is_some() {
        batches += 1;
    }
    assert_eq!(b.len(), 0);
    assert!(b.is_empty());
    assert!(!b.has_sealed());
    assert!(!b.flush(), "nothing left to seal");
    let s = b.stats();
    assert_eq!(s.sealed(), s.taken, "{s:?}");
    batches
}

/// `loom::model`, reporting the wall time and number of executions explored.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    model_preempting(name, 0, f);
}

/// [`model`] with a preemption bound of at least `at_least` (the bound from
/// `LOOM_MAX_PREEMPTIONS` when higher; none when that is unset), for races
/// that need more thread switches than CI's default of 2.
fn model_preempting(name: &str, at_least: usize, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let start = std::time::Instant::now();
    let mut builder = loom::model::Builder::new();
    if let Some(bound) = builder.preemption_bound {
        builder.preemption_bound = Some(bound.max(at_least));
    }
    builder.check(move || {
        counter.fetch_add(1, SeqCst);
        f()
    });
    let runs = runs.load(SeqCst);
    eprintln!(
        "loom model {name}: {runs} executions in {:.2?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Handoff
// ---------------------------------------------------------------------------

/// A producer fills and seals a batch and wakes the consumer when `try_add`
/// reports `sealed`; the consumer gets exactly that batch.
#[test]
fn full_batch_handoff() {
    model("full_batch_handoff", || {
        let drops = Drops::new();
        let sealed = Wake::new();
        let b = Arc::new(Batcher::<Item, 2, 1>::new());
        let producer = {
            let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..2 {
                    let done = b.producer(0).try_add(d.item(0, s)).unwrap();
                    assert_eq!((done.items, done.opened, done.sealed), (1, s == 0, s == 1));
                    if done.sealed {
                        sealed.wake();
                    }
                }
            })
        };
        let mut log = Log::new();
        assert_eq!(take_when_woken(&b, &sealed, &mut log), 2);
        producer.join().unwrap();
        assert_eq!(log, [(0, 0), (0, 1)]);
        assert_eq!(drain_rest(&b, &mut log), 0);
        let s = b.stats();
        assert_eq!((s.added, s.sealed_full, s.taken, s.refused), (2, 1, 1, 0));
        drop(b);
        drops.assert_all_dropped(&[2]);
    });
}

/// Two producers each add one item to the same (only) buffer; exactly one
/// opens it and the other seals it, and the consumer gets one full batch
/// holding both.
#[test]
fn two_producers_fill_one_batch() {
    model("two_producers_fill_one_batch", || {
        let drops = Drops::new();
        let sealed = Wake::new();
        let b = Arc::new(Batcher::<Item, 2, 1>::new());
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
                spawn_producer(d.clone(), move || {
                    let done = b.producer(0).try_add(d.item(p, 0)).unwrap();
                    assert_ne!(done.opened, done.sealed);
                    if done.sealed {
                        sealed.wake();
                    }
                })
            })
            .collect();
        let mut log = Log::new();
        assert_eq!(take_when_woken(&b, &sealed, &mut log), 2);
        for h in producers {
            h.join().unwrap();
        }
        check(&log, &[1, 1]);
        assert_eq!(drain_rest(&b, &mut log), 0);
        let s = b.stats();
        assert_eq!((s.added, s.sealed_full, s.sealed_flush), (2, 1, 0));
        drop(b);
        drops.assert_all_dropped(&[1, 1]);
    });
}

/// The consumer tries to take once while the producer seals its first batch
/// and starts a second: it gets nothing, or exactly the first batch.
#[test]
fn take_while_producer_seals() {
    model("take_while_producer_seals", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 2>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..3 {
                    b.add(d.item(0, s)).unwrap();
                }
            })
        };
        let mut log = Log::new();
        if let Some(n) = take_one_in_place(&b, &mut log) {
            assert_eq!(n, 2);
            assert_eq!(log, [(0, 0), (0, 1)]);
        }
        producer.join().unwrap();
        drain_rest(&b, &mut log);
        check(&log, &[3]);
        let s = b.stats();
        assert_eq!((s.added, s.sealed_full, s.sealed_flush), (3, 1, 1));
        drop(b);
        drops.assert_all_dropped(&[3]);
    });
}

// ---------------------------------------------------------------------------
// Flush and tick
// ---------------------------------------------------------------------------

/// `flush` races a producer adding two items: it seals nothing, the first
/// item alone, or both; nothing is lost or reordered.
#[test]
fn flush_races_add() {
    model("flush_races_add", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 3, 2>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..2 {
                    b.add(d.item(0, s)).unwrap();
                }
            })
        };
        let flushed = b.flush();
        producer.join().unwrap();
        let mut log = Log::new();
        let batches = drain_rest(&b, &mut log);
        check(&log, &[2]);
        let s = b.stats();
        assert_eq!(s.sealed_full, 0);
        assert_eq!(s.sealed_flush, batches);
        assert!(batches == 1 || (batches == 2 && flushed));
        drop(b);
        drops.assert_all_dropped(&[2]);
    });
}

/// Two ticks race a producer adding two items. The first tick never seals
/// (nothing was seen at a previous tick); the second seals at most one batch.
/// Afterwards two more ticks seal whatever is left.
#[test]
fn tick_races_add() {
    model("tick_races_add", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 3, 2>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..2 {
                    b.add(d.item(0, s)).unwrap();
                }
            })
        };
        assert!(!b.tick(), "a first tick only marks the partial batch");
        let second = b.tick();
        producer.join().unwrap();
        assert_eq!(b.stats().sealed_tick, second as usize);
        let mut log = Log::new();
        while take_one(&b, &mut log).is_some() {}
        // What is left is partial. The racing second tick may have marked it
        // without sealing; then the next tick seals it, else the one after.
        let left = !b.is_empty();
        let (t3, t4) = (b.tick(), b.tick());
        assert_eq!(t3 || t4, left);
        assert!(!(t3 && t4));
        while take_one(&b, &mut log).is_some() {}
        check(&log, &[2]);
        assert!(b.is_empty());
        let s = b.stats();
        assert_eq!((s.sealed_full, s.sealed_flush), (0, 0));
        assert_eq!(s.sealed_tick, s.taken);
        drop(b);
        drops.assert_all_dropped(&[2]);
    });
}

// ---------------------------------------------------------------------------
// Waiting for a buffer
// ---------------------------------------------------------------------------

/// One buffer of two: the producer's third `add` finds every buffer in use
/// and waits until the consumer takes the sealed batch and drops the guard.
/// The blocking `add` must complete (loom reports a model that cannot make
/// progress).
#[test]
fn add_waits_for_recycle() {
    model("add_waits_for_recycle", || {
        let drops = Drops::new();
        let sealed = Wake::new();
        let b = Arc::new(Batcher::<Item, 2, 1>::new());
        let producer = {
            let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..3 {
                    if b.producer(0).add(d.item(0, s)).unwrap().sealed {
                        sealed.wake();
                    }
                }
            })
        };
        let mut log = Log::new();
        assert_eq!(take_when_woken(&b, &sealed, &mut log), 2);
        producer.join().unwrap();
        assert_eq!(log, [(0, 0), (0, 1)]);
        drain_rest(&b, &mut log);
        check(&log, &[3]);
        let s = b.stats();
        assert_eq!(
            (s.added, s.sealed_full, s.sealed_flush, s.refused),
            (3, 1, 1, 0)
        );
        drop(b);
        drops.assert_all_dropped(&[3]);
    });
}

/// `Producer::add_with` on a full batcher gives up after two waits unless
/// the consumer recycles the buffer in time: the item is then either handed
/// back in `Full` or delivered, never lost.
#[test]
fn add_with_gives_up_or_delivers() {
    model("add_with_gives_up_or_delivers", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 1, 1>::new());
        b.try_add(drops.item(0, 0)).unwrap();
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                let mut waits = 0;
                let wait = || {
                    waits += 1;
                    thread::yield_now();
                    waits < 2
                };
                match b.producer(0).add_with(d.item(0, 1), wait) {
                    Ok(done) => {
                        assert_eq!((done.items, done.opened, done.sealed), (1, true, true));
                        2
                    }
                    Err(Full(item)) => {
                        assert_eq!(item.id(), (0, 1));
                        1
                    }
                }
            })
        };
        let mut log = Log::new();
        take_one(&b, &mut log);
        let accepted = producer.join().unwrap();
        drain_rest(&b, &mut log);
        check(&log, &[accepted]);
        let s = b.stats();
        assert_eq!(
            (s.added, s.refused),
            (accepted, 0),
            "add_with refusals are not counted"
        );
        drop(b);
        drops.assert_all_dropped(&[2]);
    });
}

/// `try_add` on a full batcher races the consumer's recycle: `Ok`, or `Full`
/// with the item back and one refusal counted.
#[test]
fn try_add_races_recycle() {
    model("try_add_races_recycle", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 1, 1>::new());
        b.try_add(drops.item(0, 0)).unwrap();
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || match b.try_add(d.item(0, 1)) {
                Ok(()) => 2,
                Err(Full(item)) => {
                    assert_eq!(item.id(), (0, 1));
                    1
                }
            })
        };
        let mut log = Log::new();
        assert_eq!(take_one_in_place(&b, &mut log), Some(1));
        let accepted = producer.join().unwrap();
        drain_rest(&b, &mut log);
        check(&log, &[accepted]);
        let s = b.stats();
        assert_eq!((s.added, s.refused), (accepted, 2 - accepted));
        drop(b);
        drops.assert_all_dropped(&[2]);
    });
}

// ---------------------------------------------------------------------------
// Close
// ---------------------------------------------------------------------------

/// Runs `add` through `shard` for items `seqs` of producer `p` until one is
/// refused; checks the refused item comes back and returns the first seq
/// not accepted (`seqs.end` if all were).
fn add_until_closed<S, L, R>(
    b: &RawBatcher<Item, S, L, R>,
    shard: usize,
    d: &Drops,
    p: usize,
    seqs: std::ops::Range<usize>,
) -> usize
where
    S: Storage<Item, L>,
    L: RawLock,
    R: Relax,
{
    for s in seqs.clone() {
        match b.producer(shard).add(d.item(p, s)) {
            Ok(_) => {}
            Err(Closed(item)) => {
                assert_eq!(item.id(), (p, s));
                assert!(b.is_closed());
                return s;
            }
        }
    }
    seqs.end
}

/// After `close` returned and every producer joined, no partial batch is
/// left (close sealed it, and nothing can open a buffer afterwards), and
/// the batcher refuses new items.
fn assert_closed_state<S, L, R>(b: &RawBatcher<Item, S, L, R>, d: &Drops)
where
    S: Storage<Item, L>,
    L: RawLock,
    R: Relax,
{
    assert!(b.is_closed());
    assert!(
        !b.flush(),
        "an item was added to a partial batch after close"
    );
    let refused = b.stats().refused;
    match b.try_add(d.item(MAX_P - 1, 0)) {
        Err(Full(item)) => assert_eq!(item.id(), (MAX_P - 1, 0)),
        Ok(()) => panic!("a closed batcher accepted an item"),
    }
    assert_eq!(b.stats().refused, refused + 1);
}

/// A producer waits in `add` on a full batcher (one buffer, sealed) while
/// another thread closes it: `close` must release it with `Err(Closed)`
/// and its item.
#[test]
fn close_releases_waiting_add() {
    model("close_releases_waiting_add", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 1, 1>::new());
        b.try_add(drops.item(0, 0)).unwrap();
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || add_until_closed(&b, 0, &d, 0, 1..2))
        };
        b.close();
        assert_eq!(producer.join().unwrap(), 1);
        assert_closed_state(&b, &drops);
        let mut log = Log::new();
        drain_rest(&b, &mut log);
        check(&log, &[1]);
        drop(b);
        drops.assert_all_dropped(&[2, 0, 0, 1]);
    });
}

/// A producer waits in `add` on a full batcher while the consumer takes the
/// sealed batch (freeing the buffer) and a third thread closes: the item is
/// either delivered or handed back in `Closed`, never lost.
#[test]
fn close_races_waiting_add_and_consumer() {
    model("close_races_waiting_add_and_consumer", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 1, 1>::new());
        b.try_add(drops.item(0, 0)).unwrap();
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || add_until_closed(&b, 0, &d, 0, 1..2))
        };
        let closer = {
            let b = b.clone();
            thread::spawn(move || b.close())
        };
        let mut log = Log::new();
        assert_eq!(take_one(&b, &mut log), Some(1));
        let accepted = producer.join().unwrap();
        closer.join().unwrap();
        assert_closed_state(&b, &drops);
        drain_rest(&b, &mut log);
        check(&log, &[accepted]);
        drop(b);
        drops.assert_all_dropped(&[2, 0, 0, 1]);
    });
}

/// The consumer holds a batch guard while the batcher is closed and a
/// producer adds: the guard's items are untouched, the producer's item is
/// delivered or handed back, and sealed batches stay takeable after close.
#[test]
fn close_while_consumer_holds_guard() {
    model("close_while_consumer_holds_guard", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 2>::new());
        for s in 0..2 {
            b.try_add(drops.item(0, s)).unwrap();
        }
        let consumer = {
            let b = b.clone();
            thread::spawn(move || {
                let mut log = Log::new();
                let batch = b.try_take().expect("a sealed batch");
                thread::yield_now();
                log.extend(batch.iter().map(Item::id));
                drop(batch);
                log
            })
        };
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || add_until_closed(&b, 0, &d, 1, 0..1))
        };
        b.close();
        let mut log = consumer.join().unwrap();
        assert_eq!(log, [(0, 0), (0, 1)]);
        let accepted = producer.join().unwrap();
        assert_closed_state(&b, &drops);
        drain_rest(&b, &mut log);
        check(&log, &[2, accepted]);
        drop(b);
        drops.assert_all_dropped(&[2, 1, 0, 1]);
    });
}

/// Two producers on different shards, both waiting for buffers (no
/// consumer), and a close: each gets its `Closed` back, and every item it
/// had accepted is delivered.
#[test]
fn close_sharded_waiting_producers() {
    model("close_sharded_waiting_producers", || {
        let drops = Drops::new();
        let b = Arc::new(ShardedBatcher::<Item, 1, 2, 2>::new());
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let (b, d) = (b.clone(), drops.clone());
                spawn_producer(d.clone(), move || add_until_closed(&b, p, &d, p, 0..2))
            })
            .collect();
        b.close();
        let accepted: Vec<usize> = producers.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            accepted.iter().sum::<usize>() <= 2,
            "only two buffers of one"
        );
        assert_closed_state(&b, &drops);
        let mut log = Log::new();
        drain_rest(&b, &mut log);
        check(&log, &accepted);
        drop(b);
        let made: Vec<usize> = accepted.iter().map(|&a| (a + 1).min(2)).collect();
        drops.assert_all_dropped(&[made[0], made[1], 0, 1]);
    });
}

// ---------------------------------------------------------------------------
// Drop
// ---------------------------------------------------------------------------

/// Items in every state when the batcher drops: a consumer took a batch,
/// moved one item out of a `Drain` and dropped the drain with the other
/// still in it, then the guard (that buffer is recycled and maybe refilled),
/// while the producer left a sealed and a partial batch. Every item is
/// dropped exactly once.
#[test]
fn drop_with_items_in_every_state() {
    model("drop_with_items_in_every_state", || {
        let drops = Drops::new();
        let sealed = Wake::new();
        let b = Arc::new(Batcher::<Item, 2, 3>::new());
        let producer = {
            let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..5 {
                    if b.producer(0).try_add(d.item(0, s)).unwrap().sealed {
                        sealed.wake();
                    }
                }
            })
        };
        let consumer = {
            let (b, sealed) = (b.clone(), sealed.clone());
            thread::spawn(move || {
                sealed.wait();
                let mut batch = b.try_take().expect("a sealed batch");
                assert_eq!(batch.len(), 2);
                let first = batch.drain().next().map(|item| item.id());
                assert_eq!(first, Some((0, 0)));
            })
        };
        producer.join().unwrap();
        consumer.join().unwrap();
        // Items 2..4: one sealed batch and one partial one.
        assert_eq!(b.len(), 3);
        let s = b.stats();
        assert_eq!((s.added, s.sealed_full, s.taken), (5, 2, 1));
        drop(b);
        drops.assert_all_dropped(&[5]);
    });
}

/// A guard is dropped without draining (its destructor drops the items)
/// while a producer waits for that very buffer; then the batcher is dropped
/// holding the producer's partial batch.
#[test]
fn guard_drop_frees_buffer_for_waiting_add() {
    model("guard_drop_frees_buffer_for_waiting_add", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 1>::new());
        for s in 0..2 {
            b.try_add(drops.item(0, s)).unwrap();
        }
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || b.add(d.item(1, 0)).unwrap())
        };
        let batch = b.try_take().expect("a sealed batch");
        assert_eq!(
            batch.iter().map(Item::id).collect::<Vec<_>>(),
            [(0, 0), (0, 1)]
        );
        drop(batch);
        producer.join().unwrap();
        assert_eq!(b.len(), 1);
        drop(b);
        drops.assert_all_dropped(&[2, 1]);
    });
}

/// A consumer that goes from batch to batch with `take_next` (hand the
/// buffer back and take the next batch under one hold of the queue lock)
/// while the producer fills both buffers and waits for one: the waiting
/// add completes, and every item comes out once, in order. The consumer
/// drains each batch first, or only reads it and leaves its items for
/// `take_next` to drop.
#[test]
fn take_next_frees_buffer_for_waiting_add() {
    for drain in [true, false] {
        model("take_next_frees_buffer_for_waiting_add", move || {
            take_next_with_a_waiting_add(drain)
        });
    }
}

fn take_next_with_a_waiting_add(drain: bool) {
    let drops = Drops::new();
    let sealed = Wake::new();
    let b = Arc::new(Batcher::<Item, 1, 2>::new());
    let producer = {
        let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
        spawn_producer(d.clone(), move || {
            for s in 0..3 {
                b.producer(0).add(d.item(0, s)).unwrap();
                sealed.wake();
            }
        })
    };
    sealed.wait();
    let mut log = Log::new();
    {
        let mut next = b.try_take();
        assert!(next.is_some(), "woken for a sealed batch");
        // At most the three batches: the loop is bounded.
        while let Some(mut batch) = next {
            if drain {
                log.extend(batch.drain().map(|item| item.id()));
            } else {
                log.extend(batch.iter().map(Item::id));
            }
            next = batch.take_next();
        }
    }
    producer.join().unwrap();
    drain_rest(&b, &mut log);
    check(&log, &[3]);
    assert_eq!(b.stats().taken, 3);
    // Both buffers came back: two more batches fit.
    for s in 0..2 {
        assert!(b.try_add(drops.item(1, s)).is_ok(), "a buffer was lost");
    }
    drop(b);
    drops.assert_all_dropped(&[3, 2]);
}

// ---------------------------------------------------------------------------
// Shards, bulk adds, counters
// ---------------------------------------------------------------------------

/// Two producers on different shards each fill one batch while the consumer
/// takes one: every batch holds one producer's items only, in order.
#[test]
fn sharded_producers() {
    model("sharded_producers", || {
        let drops = Drops::new();
        let sealed = Wake::new();
        let b = Arc::new(ShardedBatcher::<Item, 2, 3, 2>::new());
        assert_eq!(b.shards(), 2);
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
                spawn_producer(d.clone(), move || {
                    let producer = b.producer(p);
                    for s in 0..2 {
                        if producer.try_add(d.item(p, s)).unwrap().sealed {
                            sealed.wake();
                        }
                    }
                })
            })
            .collect();
        let mut log = Log::new();
        assert_eq!(take_when_woken(&b, &sealed, &mut log), 2);
        assert_eq!(log[0].0, log[1].0, "a batch mixes shards: {log:?}");
        for h in producers {
            h.join().unwrap();
        }
        let mut rest = Log::new();
        assert_eq!(drain_rest(&b, &mut rest), 1);
        assert_eq!(rest[0].0, rest[1].0, "a batch mixes shards: {rest:?}");
        log.extend(rest);
        check(&log, &[2, 2]);
        let s = b.stats();
        assert_eq!((s.added, s.sealed_full, s.taken), (4, 2, 2));
        drop(b);
        drops.assert_all_dropped(&[2, 2]);
    });
}

/// `try_add_many` of five items into two buffers of two, under one shard
/// lock, while the consumer tries to take a batch: the first four always fit, the
/// fifth only if the consumer recycled in time. Exactly the accepted prefix
/// comes out.
#[test]
fn try_add_many_races_consumer() {
    model("try_add_many_races_consumer", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 2>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                let items: Vec<Item> = (0..5).map(|s| d.item(0, s)).collect();
                b.try_add_many(&items)
            })
        };
        let mut log = Log::new();
        // Two polls, not a loop (see `Wake`).
        for _ in 0..2 {
            if take_one(&b, &mut log).is_some() {
                break;
            }
            thread::yield_now();
        }
        let n = producer.join().unwrap();
        assert!(n == 4 || n == 5, "accepted {n}");
        drain_rest(&b, &mut log);
        check(&log, &[n]);
        let s = b.stats();
        assert_eq!((s.added, s.refused), (n, (n < 5) as usize));
        drop(b);
        drops.assert_all_dropped(&[5]);
    });
}

/// `Producer::try_extend` races `flush`: the items it moved in come out in
/// order, exactly once, however the flush cut them.
#[test]
fn try_extend_races_flush() {
    model("try_extend_races_flush", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 2>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                let mut items = (0..3).map(|s| d.item(0, s));
                let (done, refused) = b.producer(0).try_extend(&mut items);
                assert!(refused.is_none());
                assert_eq!(done.items, 3);
                assert!(done.opened && done.sealed);
            })
        };
        b.flush();
        producer.join().unwrap();
        let mut log = Log::new();
        drain_rest(&b, &mut log);
        check(&log, &[3]);
        drop(b);
        drops.assert_all_dropped(&[3]);
    });
}

/// Two producers and a consumer; after the joins `len()` and `stats()` agree
/// with what was added and taken.
#[test]
fn len_and_stats_after_joins() {
    model("len_and_stats_after_joins", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 2>::new());
        let p0 = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..2 {
                    b.try_add(d.item(0, s)).unwrap();
                }
            })
        };
        let p1 = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || b.add(d.item(1, 0)).unwrap())
        };
        let mut log = Log::new();
        let taken = take_one_in_place(&b, &mut log).unwrap_or(0);
        p0.join().unwrap();
        p1.join().unwrap();
        let s = b.stats();
        assert_eq!(s.added, 3);
        assert_eq!(s.refused, 0);
        assert_eq!(s.taken, (taken > 0) as usize);
        assert_eq!(b.len(), 3 - taken);
        assert_eq!((s.sealed_flush, s.sealed_tick), (0, 0));
        assert_eq!(
            s.sealed_full, 1,
            "three items in batches of two: one full batch"
        );
        let _ = format!("{b:?}");
        drain_rest(&b, &mut log);
        check(&log, &[2, 1]);
        let s = b.stats();
        assert_eq!((s.sealed_full, s.sealed_flush, s.taken), (1, 1, 2));
        drop(b);
        drops.assert_all_dropped(&[2, 1]);
    });
}

/// The same handoff on `HeapStorage` (feature `alloc`, which the
/// `snail-std` dev-dependency turns on for every test build): the
/// producer's third item waits for the only buffer.
#[cfg(feature = "alloc")]
#[test]
fn heap_storage_add_waits_for_recycle() {
    model("heap_storage_add_waits_for_recycle", || {
        type Heap = snail::HeapStorage<Item, SpinLock>;
        let drops = Drops::new();
        let sealed = Wake::new();
        let b = Arc::new(RawBatcher::<Item, Heap>::with_storage(
            Heap::new(2, 1, 1).unwrap(),
        ));
        let producer = {
            let (b, d, sealed) = (b.clone(), drops.clone(), sealed.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..3 {
                    if b.producer(0).add(d.item(0, s)).unwrap().sealed {
                        sealed.wake();
                    }
                }
            })
        };
        let mut log = Log::new();
        assert_eq!(take_when_woken(&b, &sealed, &mut log), 2);
        producer.join().unwrap();
        drain_rest(&b, &mut log);
        check(&log, &[3]);
        drop(b);
        drops.assert_all_dropped(&[3]);
    });
}

// ---------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------

/// `SpinLock<Loop>` (the lock of `CsBatcher`'s relax hook, with the spin
/// lock): two threads increment a loom-tracked counter under it; loom checks
/// mutual exclusion and that each closure's writes happen-before the next.
#[test]
fn spin_lock_loop_mutual_exclusion() {
    model("spin_lock_loop_mutual_exclusion", || {
        let lock = Arc::new(<SpinLock<Loop> as RawLock>::new());
        let count = Arc::new(UnsafeCell::new(0usize));
        let other = {
            let (lock, count) = (lock.clone(), count.clone());
            thread::spawn(move || count_under(&*lock, &count))
        };
        count_under(&*lock, &count);
        other.join().unwrap();
        // SAFETY: as in `count_under`.
        assert_eq!(lock.lock(|| count.with(|c| unsafe { *c })), 2);
    });
}

/// A batcher on `SpinLock<Loop>` with the `Loop` relax hook: a waiting `add`
/// completes once the consumer recycles, and closing releases a second one.
#[test]
fn spin_lock_loop_batcher() {
    model("spin_lock_loop_batcher", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 1, 1, SpinLock<Loop>, Loop>::new());
        b.try_add(drops.item(0, 0)).unwrap();
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || add_until_closed(&b, 0, &d, 0, 1..3))
        };
        let mut log = Log::new();
        // Frees the buffer: item 1 gets in and seals it; item 2 waits until
        // the close below.
        assert_eq!(take_one(&b, &mut log), Some(1));
        b.close();
        let accepted = producer.join().unwrap();
        assert!(accepted >= 1);
        assert_closed_state(&b, &drops);
        drain_rest(&b, &mut log);
        check(&log, &[accepted]);
        drop(b);
        drops.assert_all_dropped(&[3.min(accepted + 1), 0, 0, 1]);
    });
}

loom::lazy_static! {
    /// The one global critical section of [`GlobalCs`].
    static ref CS_HELD: AtomicBool = AtomicBool::new(false);
}

loom::thread_local! {
    /// How deeply the current loom thread is nested in [`GlobalCs`].
    static CS_DEPTH: Cell<usize> = Cell::new(0);
}

/// What `CsLock` is under the critical-section contract, in loom terms: one
/// global, reentrant lock shared by every `CsLock` (so a batcher's shard and
/// queue locks are the same lock, nested). `CsLock` itself cannot run under
/// loom with critical-section's `std` implementation: that one keeps its
/// "already inside" flag in a `std::thread_local!` and excludes with a
/// `std::sync::Mutex`, neither of which loom sees; loom runs every model
/// thread on one OS thread, so the flag is shared and a preempted critical
/// section lets the next thread in as if nested.
struct GlobalCs;

// SAFETY: the outermost `lock` on a loom thread takes the global flag with an
// Acquire compare-exchange and releases it with a Release store after the
// closure (also when it unwinds); nested calls run inside that.
unsafe impl RawLock for GlobalCs {
    fn new() -> Self {
        GlobalCs
    }

    fn lock<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Leave(bool);
        impl Drop for Leave {
            fn drop(&mut self) {
                CS_DEPTH.with(|d| d.set(d.get() - 1));
                if self.0 {
                    CS_HELD.store(false, loom::sync::atomic::Ordering::Release);
                }
            }
        }
        let outermost = CS_DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get() == 1
        });
        if outermost {
            use loom::sync::atomic::Ordering::{Acquire, Relaxed};
            while CS_HELD
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_err()
            {
                thread::yield_now();
            }
        }
        let _leave = Leave(outermost);
        f()
    }
}

/// A `CsBatcher`-shaped batcher (global reentrant lock, `Loop` relax): a
/// producer ("interrupt handler") adds with `try_add` while the main loop
/// ticks and takes; shard and queue lock are the same lock, nested.
#[test]
fn critical_section_style_batcher() {
    model("critical_section_style_batcher", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 2, GlobalCs, Loop>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                let mut accepted = 0;
                for s in 0..3 {
                    match b.try_add(d.item(0, s)) {
                        Ok(()) => accepted += 1,
                        Err(Full(_)) => panic!("two buffers of two hold three items"),
                    }
                }
                accepted
            })
        };
        let mut log = Log::new();
        b.tick();
        take_one(&b, &mut log);
        b.tick();
        assert_eq!(producer.join().unwrap(), 3);
        drain_rest(&b, &mut log);
        check(&log, &[3]);
        drop(b);
        drops.assert_all_dropped(&[3]);
    });
}

// ---------------------------------------------------------------------------
// The biased lock
// ---------------------------------------------------------------------------

loom::thread_local! {
    /// This loom thread's [`LoomBias`] slot, leaked.
    static SLOT: &'static BiasSlot = Box::leak(Box::new(BiasSlot::new()));
}

/// Slots for [`BiasedLock`] under loom. Its fences are not called: under
/// `--cfg snail_loom` the lock replaces them with read-modify-writes of one
/// word, which loom orders exactly (see `BiasedLock`).
struct LoomBias;

// SAFETY: a new slot per loom thread, never reused.
unsafe impl Bias for LoomBias {
    fn slot() -> &'static BiasSlot {
        SLOT.with(|s| *s)
    }

    fn light() {
        unreachable!("replaced under loom")
    }

    fn heavy() {
        unreachable!("replaced under loom")
    }
}

type Biased = BiasedLock<LoomBias, Loop>;

/// Adds one to a loom-tracked counter under `lock`: loom reports two
/// closures that overlap or are not ordered by happens-before.
fn count_under<L: RawLock>(lock: &L, count: &UnsafeCell<usize>) {
    lock.lock(|| {
        count.with_mut(|c| {
            // SAFETY: the counter is only touched under the lock, which is
            // what loom checks here.
            unsafe { *c += 1 }
        })
    })
}

/// One thread takes the lock three times: the first entry (alone, under
/// loom's threshold of 1) makes it the owner, the next two use the owner's
/// path. Another thread takes it once, racing: it either gets it before the
/// bias or revokes it. Loom checks exclusion and ordering of all four.
#[test]
fn biased_lock_owner_and_revoker() {
    model("biased_lock_owner_and_revoker", || {
        let lock = Arc::new(Biased::new());
        let count = Arc::new(UnsafeCell::new(0usize));
        let other = {
            let (lock, count) = (lock.clone(), count.clone());
            thread::spawn(move || count_under(&*lock, &count))
        };
        for _ in 0..3 {
            count_under(&*lock, &count);
        }
        other.join().unwrap();
        // SAFETY: as in `count_under`.
        assert_eq!(lock.lock(|| count.with(|c| unsafe { *c })), 4);
    });
}

/// Two threads take the lock twice each, so the bias can pass from one to
/// the other and back.
#[test]
fn biased_lock_two_owners() {
    model("biased_lock_two_owners", || {
        let lock = Arc::new(Biased::new());
        let count = Arc::new(UnsafeCell::new(0usize));
        let other = {
            let (lock, count) = (lock.clone(), count.clone());
            thread::spawn(move || {
                count_under(&*lock, &count);
                count_under(&*lock, &count);
            })
        };
        count_under(&*lock, &count);
        count_under(&*lock, &count);
        other.join().unwrap();
        // SAFETY: as in `count_under`.
        assert_eq!(lock.lock(|| count.with(|c| unsafe { *c })), 4);
    });
}

/// The bias passes from one thread to the other while the first is between
/// reading that it owns the lock and marking itself inside: its late marks
/// must not disturb the new owner. (With one "inside" flag per lock, which
/// both threads wrote, this model found the late mark making the new owner
/// wait for itself forever; it needs 4 preemptions to get there.)
#[test]
fn biased_lock_stale_owner() {
    model_preempting("biased_lock_stale_owner", 4, || {
        let lock = Arc::new(Biased::new());
        let count = Arc::new(UnsafeCell::new(0usize));
        let other = {
            let (lock, count) = (lock.clone(), count.clone());
            thread::spawn(move || {
                for _ in 0..3 {
                    count_under(&*lock, &count);
                }
            })
        };
        for _ in 0..3 {
            count_under(&*lock, &count);
        }
        other.join().unwrap();
        // SAFETY: as in `count_under`.
        assert_eq!(lock.lock(|| count.with(|c| unsafe { *c })), 6);
    });
}

/// A batcher on biased locks, as the std shim builds it: a producer thread
/// becomes the owner of its shard and adds three items (a full batch of two
/// and one more) while the consumer flushes, which revokes the bias, and
/// takes. Every item comes out once, in order.
#[test]
fn biased_batcher_flush_races_owner() {
    model("biased_batcher_flush_races_owner", || {
        let drops = Drops::new();
        let b = Arc::new(Batcher::<Item, 2, 3, Biased, Loop>::new());
        let producer = {
            let (b, d) = (b.clone(), drops.clone());
            spawn_producer(d.clone(), move || {
                for s in 0..3 {
                    b.try_add(d.item(0, s)).unwrap();
                }
            })
        };
        b.flush();
        let mut log = Log::new();
        take_one_in_place(&b, &mut log);
        producer.join().unwrap();
        drain_rest(&b, &mut log);
        check(&log, &[3]);
        drop(b);
        drops.assert_all_dropped(&[3]);
    });
}
