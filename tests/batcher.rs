//! Integration tests of the batching core through its public API: order,
//! back-pressure, sealing (full, flush, tick, close), the consumer's guard and
//! drain, exact destructor counts, counters, heap storage, shards, threads
//! and panics.
//!
//! Sizes shrink under Miri (`cfg!(miri)`), so the whole file also runs there.
#![cfg(not(snail_loom))]

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use snail::relax::Relax;
use snail::{Batcher, Closed, Full, RawBatcher, RawLock, ShardedBatcher, SpinLock, Storage};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

thread_local! {
    static CREATED: Cell<usize> = const { Cell::new(0) };
    static DROPPED: Cell<usize> = const { Cell::new(0) };
    /// Values whose `Clone` panics.
    static POISON_CLONE: Cell<Option<u32>> = const { Cell::new(None) };
    /// Values whose `Drop` panics (after being counted).
    static POISON_DROP: Cell<Option<u32>> = const { Cell::new(None) };
}

/// A non-`Copy` item that counts, per thread, how many were created (also by
/// `clone`) and dropped. Holds no heap memory, so leaking one (as some tests
/// do on purpose) leaks nothing Miri would report.
#[derive(Debug, PartialEq, Eq)]
struct Tracked(u32);

impl Tracked {
    fn new(v: u32) -> Self {
        CREATED.with(|c| c.set(c.get() + 1));
        Tracked(v)
    }
}

impl Clone for Tracked {
    fn clone(&self) -> Self {
        if POISON_CLONE.with(Cell::get) == Some(self.0) {
            panic!("clone of {} refused", self.0);
        }
        Tracked::new(self.0)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        DROPPED.with(|c| c.set(c.get() + 1));
        if POISON_DROP.with(Cell::get) == Some(self.0) && !std::thread::panicking() {
            panic!("drop of {} panics", self.0);
        }
    }
}

/// Resets this thread's counters and poison values; call first in a test.
fn reset() {
    CREATED.with(|c| c.set(0));
    DROPPED.with(|c| c.set(0));
    POISON_CLONE.with(|c| c.set(None));
    POISON_DROP.with(|c| c.set(None));
}

/// Runs `f` with the clone of item `id` panicking; `true` if `f` panicked.
fn panics_cloning(id: u32, f: impl FnOnce()) -> bool {
    POISON_CLONE.with(|p| p.set(Some(id)));
    let panicked = catch_unwind(AssertUnwindSafe(f)).is_err();
    POISON_CLONE.with(|p| p.set(None));
    panicked
}

fn created() -> usize {
    CREATED.with(Cell::get)
}

fn dropped() -> usize {
    DROPPED.with(Cell::get)
}

/// Tracked items alive on this thread.
fn live() -> usize {
    created() - dropped()
}

fn tracked(range: std::ops::Range<u32>) -> Vec<Tracked> {
    range.map(Tracked::new).collect()
}

fn values(items: &[Tracked]) -> Vec<u32> {
    items.iter().map(|t| t.0).collect()
}

/// Takes every sealed batch and moves its items out.
fn take_all<T, S: Storage<T, L>, L: RawLock, R: Relax>(b: &RawBatcher<T, S, L, R>) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    while let Some(mut batch) = b.try_take() {
        out.push(batch.drain().collect());
    }
    out
}

fn take_values<S: Storage<Tracked, L>, L: RawLock, R: Relax>(
    b: &RawBatcher<Tracked, S, L, R>,
) -> Vec<Vec<u32>> {
    take_all(b).iter().map(|v| values(v)).collect()
}

/// Waits by yielding the thread: with more threads than the 2 cores CI has,
/// spinning would mostly burn the time slice of whoever holds the lock.
struct YieldNow;

impl Relax for YieldNow {
    fn relax() {
        std::thread::yield_now();
    }
}

type YieldLock = SpinLock<YieldNow>;

// ---------------------------------------------------------------------------
// Order and batch sizes
// ---------------------------------------------------------------------------

#[test]
fn batches_and_items_come_out_in_fifo_order() {
    let b: Batcher<u32, 4, 16> = Batcher::new();
    for i in 0..30 {
        b.try_add(i).unwrap();
    }
    assert!(b.flush());
    let batches = take_all(&b);
    let expected: Vec<Vec<u32>> = (0..30u32)
        .collect::<Vec<_>>()
        .chunks(4)
        .map(<[u32]>::to_vec)
        .collect();
    assert_eq!(batches, expected);
    assert!(b.try_take().is_none());
    assert!(b.is_empty());
}

#[test]
fn fifo_holds_across_recycled_buffers() {
    // Few buffers: they are reused many times, in a different order than
    // first used (the free list is LIFO), while the output stays FIFO.
    let b: Batcher<u32, 3, 2> = Batcher::new();
    let mut next = 0;
    let mut out = Vec::new();
    for round in 0..20 {
        while b.try_add(next).is_ok() {
            next += 1;
        }
        // Take one or two batches, so the recycled order varies.
        for _ in 0..=(round % 2) {
            if let Some(mut batch) = b.try_take() {
                out.extend(batch.drain());
            }
        }
    }
    b.flush();
    for batch in take_all(&b) {
        out.extend(batch);
    }
    assert_eq!(out, (0..next).collect::<Vec<_>>());
}

#[test]
fn full_batches_hold_exactly_batch_items() {
    let b: Batcher<u32, 5, 4> = Batcher::new();
    for i in 0..20 {
        b.try_add(i).unwrap();
    }
    let stats = b.stats();
    assert_eq!(stats.sealed_full, 4);
    assert_eq!(stats.sealed_flush + stats.sealed_tick, 0);
    assert!(!b.flush(), "no partial batch left after 4 full ones");
    for k in 0..4 {
        let batch = b.try_take().unwrap();
        assert_eq!(batch.len(), 5);
        assert!(!batch.is_empty());
        assert_eq!(
            &batch[..],
            &[5 * k, 5 * k + 1, 5 * k + 2, 5 * k + 3, 5 * k + 4]
        );
    }
}

// ---------------------------------------------------------------------------
// Back-pressure
// ---------------------------------------------------------------------------

#[test]
fn try_add_when_full_hands_back_the_very_same_item() {
    let b: Batcher<Box<u64>, 2, 2> = Batcher::new();
    for i in 0..4 {
        b.try_add(Box::new(i)).unwrap();
    }
    assert_eq!(b.len(), b.capacity());
    let item = Box::new(99);
    let addr: *const u64 = &*item;
    let back = match b.try_add(item) {
        Err(Full(back)) => back,
        Ok(()) => panic!("accepted with every buffer sealed"),
    };
    assert_eq!(
        &*back as *const u64, addr,
        "the refused box is the one passed in"
    );
    assert_eq!(*back, 99);

    // Through a producer and `into_inner`, same identity.
    let err = b.producer(0).try_add(back).unwrap_err();
    let back = err.into_inner();
    assert_eq!(&*back as *const u64, addr);

    // A taken batch still holds its buffer while the guard lives.
    let guard = b.try_take().unwrap();
    let back = b.try_add(back).unwrap_err().0;
    assert_eq!(&*back as *const u64, addr);
    drop(guard);

    // Dropping the guard made room again.
    b.try_add(back).unwrap();
    assert_eq!(b.stats().refused, 3);
    assert_eq!(b.stats().added, 5);
}

#[test]
fn a_partial_batch_takes_items_while_every_other_buffer_is_in_use() {
    let b: Batcher<u32, 2, 2> = Batcher::new();
    b.try_add(0).unwrap();
    b.try_add(1).unwrap(); // sealed full
    b.try_add(2).unwrap(); // opens the last buffer
    b.try_add(3).unwrap(); // fits in it; sealed full
    assert_eq!(b.try_add(4), Err(Full(4)));
    let first = b.try_take().unwrap();
    assert_eq!(&first[..], &[0, 1]);
    b.try_add(4).unwrap_err(); // the guard still holds the buffer
    drop(first);
    b.try_add(4).unwrap();
    b.try_add(5).unwrap();
    assert_eq!(take_all(&b), vec![vec![2, 3], vec![4, 5]]);
}

#[test]
fn refused_items_are_not_dropped_by_the_batcher() {
    reset();
    let b: Batcher<Tracked, 1, 1> = Batcher::new();
    b.try_add(Tracked::new(1)).unwrap();
    let Full(back) = b.try_add(Tracked::new(2)).unwrap_err();
    assert_eq!(back.0, 2);
    assert_eq!(dropped(), 0, "the refused item is alive in our hands");
    drop(back);
    assert_eq!(dropped(), 1);
    drop(b);
    assert_eq!(dropped(), 2);
    assert_eq!(live(), 0);
}

#[test]
fn add_waits_for_a_free_buffer() {
    let b: Batcher<u32, 1, 1, YieldLock, YieldNow> = Batcher::new();
    b.add(1).unwrap();
    let started = AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            started.store(true, Ordering::Release);
            b.add(2)
        });
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        // The only buffer is sealed: the waiter cannot have added yet.
        let mut first = b.try_take().unwrap();
        assert_eq!(first.drain().collect::<Vec<_>>(), vec![1]);
        drop(first);
        assert!(waiter.join().unwrap().is_ok());
    });
    assert_eq!(take_all(&b), vec![vec![2]]);
    assert_eq!(b.stats().refused, 0, "waiting in add is not a refusal");
}

/// Yields, counting its calls: `add` calls it only while it waits for a
/// buffer (the lock is `YieldLock`, whose waits are not counted).
struct CountedWait;

static WAITS: AtomicUsize = AtomicUsize::new(0);

impl Relax for CountedWait {
    fn relax() {
        WAITS.fetch_add(1, Ordering::SeqCst);
        std::thread::yield_now();
    }
}

/// The waiter is waiting in `add` (it has relaxed at least once) when the
/// batcher closes: it gets its item back.
#[test]
fn add_returns_closed_when_closed_while_waiting() {
    let b: Batcher<Box<u32>, 1, 1, YieldLock, CountedWait> = Batcher::new();
    b.add(Box::new(1)).unwrap();
    assert_eq!(WAITS.load(Ordering::SeqCst), 0, "a free buffer: no wait");
    std::thread::scope(|s| {
        let waiter = s.spawn(|| b.add(Box::new(2)));
        while WAITS.load(Ordering::SeqCst) == 0 {
            assert!(!waiter.is_finished(), "add returned without waiting");
            std::thread::yield_now();
        }
        b.close();
        let Closed(back) = waiter.join().unwrap().unwrap_err();
        assert_eq!(*back, 2);
    });
    assert_eq!(take_all(&b), vec![vec![Box::new(1)]]);
}

// ---------------------------------------------------------------------------
// try_add_many and try_extend
// ---------------------------------------------------------------------------

#[test]
fn try_add_many_accepts_a_prefix_and_returns_its_length() {
    let b: Batcher<u32, 3, 2> = Batcher::new();
    assert_eq!(b.try_add_many(&[]), 0);
    assert_eq!(b.stats().refused, 0, "an empty slice is not a refusal");
    assert_eq!(b.try_add_many(&[0, 1, 2, 3]), 4);
    assert_eq!(b.try_add_many(&[4, 5, 6, 7, 8]), 2, "capacity is 6");
    assert_eq!(b.try_add_many(&[9]), 0);
    let stats = b.stats();
    assert_eq!((stats.added, stats.refused, stats.sealed_full), (6, 2, 2));
    assert_eq!(take_all(&b), vec![vec![0, 1, 2], vec![3, 4, 5]]);
}

#[test]
fn try_add_many_clones_and_leaves_the_originals() {
    reset();
    let b: Batcher<Tracked, 3, 2> = Batcher::new();
    let items = tracked(0..8);
    assert_eq!(b.try_add_many(&items), 6);
    // The originals are untouched and ours; the batcher holds 6 clones.
    assert_eq!(values(&items), (0..8).collect::<Vec<_>>());
    assert_eq!(live(), 8 + 6);
    drop(items);
    assert_eq!(live(), 6);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn producer_try_extend_moves_items_and_hands_back_the_one_without_room() {
    reset();
    let b: Batcher<Tracked, 2, 2> = Batcher::new();
    let p = b.producer(0);
    let mut iter = tracked(0..7).into_iter();
    let (done, back) = p.try_extend(&mut iter);
    assert_eq!(done.items, 4);
    assert!(done.opened && done.sealed);
    assert_eq!(
        back.as_ref().map(|t| t.0),
        Some(4),
        "the item taken from the iterator comes back"
    );
    assert_eq!(
        values(iter.as_slice()),
        vec![5, 6],
        "the rest stays in the iterator"
    );
    assert_eq!(b.stats().refused, 1);
    assert_eq!(live(), 7, "nothing was cloned or dropped");
    drop(back);

    // An iterator that ends first: no refusal, nothing handed back.
    drop(b.try_take());
    let mut short = tracked(10..11).into_iter();
    let (done, back) = p.try_extend(&mut short);
    assert_eq!((done.items, done.opened, done.sealed), (1, true, false));
    assert!(back.is_none());
    assert_eq!(b.stats().refused, 1);
    drop((back, iter));
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn producer_try_add_reports_what_it_did() {
    let b: Batcher<u32, 2, 2> = Batcher::new();
    let p = b.producer(0);
    assert!(std::ptr::eq(p.batcher(), &b));
    let a = p.try_add(0).unwrap();
    assert_eq!((a.items, a.opened, a.sealed), (1, true, false));
    let a = p.try_add(1).unwrap();
    assert_eq!((a.items, a.opened, a.sealed), (1, false, true));
    let a = p.try_add(2).unwrap();
    assert_eq!((a.items, a.opened, a.sealed), (1, true, false));
    let a = p.add(3).unwrap();
    assert_eq!((a.items, a.opened, a.sealed), (1, false, true));
    assert_eq!(p.try_add_many(&[4]), 0);
}

// ---------------------------------------------------------------------------
// flush and tick
// ---------------------------------------------------------------------------

#[test]
fn flush_returns_whether_it_sealed_a_batch() {
    let b: Batcher<u32, 3, 4> = Batcher::new();
    assert!(!b.flush(), "nothing to seal");
    b.try_add(1).unwrap();
    assert!(b.flush());
    assert!(!b.flush(), "already sealed");
    b.try_add_many(&[2, 3, 4]);
    assert!(!b.flush(), "a full batch is sealed on its own");
    b.try_add(5).unwrap();
    assert!(b.flush());
    let stats = b.stats();
    assert_eq!(
        (stats.sealed_full, stats.sealed_flush, stats.sealed_tick),
        (1, 2, 0)
    );
    assert_eq!(take_all(&b), vec![vec![1], vec![2, 3, 4], vec![5]]);
}

#[test]
fn tick_seals_a_partial_batch_at_the_second_tick() {
    let b: Batcher<u32, 4, 4> = Batcher::new();
    assert!(!b.tick(), "empty");
    assert!(!b.tick(), "still empty");
    b.try_add(1).unwrap();
    // Ticks on an empty batcher left no mark: this is the first tick that
    // sees the partial batch.
    assert!(!b.tick());
    assert!(b.try_take().is_none());
    assert!(b.tick(), "second tick that sees it seals it");
    assert_eq!(take_all(&b), vec![vec![1]]);
    assert!(!b.tick());
    assert_eq!(b.stats().sealed_tick, 1);
}

#[test]
fn tick_seals_items_added_after_the_marking_tick_too() {
    // The mark belongs to the partial batch, not to items: a batch marked at
    // one tick is sealed at the next with everything added meanwhile.
    let b: Batcher<u32, 4, 4> = Batcher::new();
    b.try_add(1).unwrap();
    assert!(!b.tick());
    b.try_add(2).unwrap();
    b.try_add(3).unwrap();
    assert!(b.tick());
    assert_eq!(take_all(&b), vec![vec![1, 2, 3]]);
}

#[test]
fn a_batch_opened_after_a_tick_is_not_marked_by_it() {
    let b: Batcher<u32, 2, 4> = Batcher::new();
    b.try_add(1).unwrap();
    assert!(!b.tick()); // marks [1]
    b.try_add(2).unwrap(); // [1, 2] sealed full: the mark goes with it
    b.try_add(3).unwrap(); // a new batch, unmarked
    assert!(!b.tick(), "the new batch is only marked");
    assert!(b.tick());
    let stats = b.stats();
    assert_eq!((stats.sealed_full, stats.sealed_tick), (1, 1));
    assert_eq!(take_all(&b), vec![vec![1, 2], vec![3]]);
}

#[test]
fn flush_clears_the_tick_mark() {
    let b: Batcher<u32, 4, 4> = Batcher::new();
    b.try_add(1).unwrap();
    assert!(!b.tick()); // marks [1]
    assert!(b.flush()); // seals [1]
    b.try_add(2).unwrap();
    assert!(!b.tick(), "the new partial batch is not marked yet");
    assert!(b.tick());
    let stats = b.stats();
    assert_eq!((stats.sealed_flush, stats.sealed_tick), (1, 1));
    assert_eq!(take_all(&b), vec![vec![1], vec![2]]);
}

#[test]
fn tick_marks_and_seals_each_shard_on_its_own() {
    let b: ShardedBatcher<u32, 4, 4, 2> = ShardedBatcher::new();
    b.producer(0).try_add(10).unwrap();
    assert!(!b.tick()); // marks shard 0
    b.producer(1).try_add(20).unwrap();
    assert!(b.tick()); // seals shard 0, marks shard 1
    assert_eq!(take_all(&b), vec![vec![10]]);
    assert!(b.tick()); // seals shard 1
    assert_eq!(take_all(&b), vec![vec![20]]);
    assert_eq!(b.stats().sealed_tick, 2);
}

// ---------------------------------------------------------------------------
// close
// ---------------------------------------------------------------------------

#[test]
fn close_seals_the_partial_batch_and_refuses_from_then_on() {
    reset();
    let b: Batcher<Tracked, 4, 4> = Batcher::new();
    b.try_add(Tracked::new(1)).unwrap();
    b.try_add(Tracked::new(2)).unwrap();
    assert!(!b.is_closed());
    b.close();
    assert!(b.is_closed());
    assert_eq!(b.stats().sealed_flush, 1, "close sealed the partial batch");
    assert_eq!(b.len(), 2);

    assert_eq!(b.try_add(Tracked::new(3)).unwrap_err().0 .0, 3);
    assert_eq!(b.add(Tracked::new(4)).unwrap_err().0 .0, 4);
    assert_eq!(
        b.producer(0)
            .add(Tracked::new(5))
            .unwrap_err()
            .into_inner()
            .0,
        5
    );
    assert_eq!(b.try_add_many(&tracked(6..8)), 0);
    let mut iter = tracked(8..9).into_iter();
    let (done, back) = b.producer(0).try_extend(&mut iter);
    assert_eq!(done.items, 0);
    assert_eq!(back.as_ref().map(|t| t.0), Some(8));
    drop(back);

    // try_add, try_add_many and try_extend count refusals; add does not.
    let stats = b.stats();
    assert_eq!((stats.added, stats.refused), (2, 3));
    assert!(!b.flush());
    assert!(!b.tick());
    b.close(); // idempotent
    assert_eq!(b.stats().sealed_flush, 1);

    // Sealed batches can still be taken after close.
    assert_eq!(take_values(&b), vec![vec![1, 2]]);
    assert_eq!(b.try_add(Tracked::new(9)).unwrap_err().0 .0, 9);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn close_seals_only_the_shards_with_a_partial_batch() {
    let b: ShardedBatcher<u32, 2, 3, 3> = ShardedBatcher::new();
    b.producer(1).try_add(1).unwrap();
    b.close();
    assert_eq!(
        b.stats().sealed_flush,
        1,
        "only shard 1 had a partial batch"
    );
    assert_eq!(take_all(&b), vec![vec![1]]);
    for shard in 0..3 {
        assert_eq!(b.producer(shard).try_add(2), Err(Full(2)));
    }
}

// ---------------------------------------------------------------------------
// The guard: Deref, DerefMut, drain
// ---------------------------------------------------------------------------

#[test]
fn batch_derefs_to_a_slice_and_a_mutable_slice() {
    let b: Batcher<u32, 4, 2> = Batcher::new();
    b.try_add_many(&[1, 2, 3, 4]);
    let mut batch = b.try_take().unwrap();
    assert_eq!(&*batch, &[1, 2, 3, 4]);
    assert_eq!(batch.iter().sum::<u32>(), 10);
    batch[0] = 10;
    batch.reverse();
    for x in batch.iter_mut() {
        *x *= 2;
    }
    assert_eq!(format!("{batch:?}"), "[8, 6, 4, 20]");
    assert_eq!(batch.drain().collect::<Vec<_>>(), vec![8, 6, 4, 20]);
    assert!(batch.is_empty());
    assert_eq!(&*batch, &[] as &[u32]);
}

#[test]
fn drain_moves_items_out_in_order_and_empties_the_batch() {
    reset();
    let b: Batcher<Tracked, 5, 2> = Batcher::new();
    b.try_add_many(&tracked(0..5));
    assert_eq!(live(), 5);
    let mut batch = b.try_take().unwrap();
    let mut drain = batch.drain();
    assert_eq!(drain.len(), 5);
    assert_eq!(drain.size_hint(), (5, Some(5)));
    let all: Vec<Tracked> = drain.by_ref().collect();
    assert!(drain.next().is_none(), "fused");
    drop(drain);
    assert_eq!(values(&all), vec![0, 1, 2, 3, 4]);
    assert_eq!(dropped(), 5, "only the originals so far");
    assert!(batch.is_empty());
    drop(batch);
    assert_eq!(dropped(), 5, "the drained guard drops nothing");
    drop(all);
    assert_eq!(dropped(), 10);
}

#[test]
fn a_partly_consumed_drain_drops_the_rest() {
    reset();
    let b: Batcher<Tracked, 5, 2> = Batcher::new();
    let items = tracked(0..5);
    b.try_add_many(&items);
    drop(items);
    let mut batch = b.try_take().unwrap();
    let mut drain = batch.drain();
    let first = drain.next().unwrap();
    let second = drain.next().unwrap();
    assert_eq!((first.0, second.0), (0, 1));
    assert_eq!(format!("{drain:?}"), "Drain { remaining: 3 }");
    let before = dropped();
    drop(drain);
    assert_eq!(dropped() - before, 3, "the 3 items not yielded are dropped");
    assert!(batch.is_empty());
    drop(batch);
    assert_eq!(dropped() - before, 3);
    drop((first, second));
    assert_eq!(live(), 0);
    // The buffer was recycled: capacity is back.
    assert_eq!(b.try_add_many(&tracked(0..10)), 10);
}

#[test]
fn a_leaked_drain_never_drops_twice() {
    reset();
    let b: Batcher<Tracked, 4, 2> = Batcher::new();
    b.try_add_many(&tracked(0..8));
    let base = dropped(); // the 8 originals
    let mut batch = b.try_take().unwrap();
    let mut drain = batch.drain();
    let first = drain.next().unwrap();
    std::mem::forget(drain); // leaks items 1, 2, 3
    assert!(batch.is_empty());
    drop(batch);
    assert_eq!(dropped(), base, "leaked items are not dropped by the guard");
    drop(first);
    drop(b); // drops the other sealed batch, 4..8
    assert_eq!(dropped(), base + 1 + 4);
    assert_eq!(live(), 3, "exactly the 3 leaked items were never dropped");
}

#[test]
fn a_guard_dropped_without_draining_drops_its_items() {
    reset();
    let b: Batcher<Tracked, 3, 2> = Batcher::new();
    for i in 0..3 {
        b.try_add(Tracked::new(i)).unwrap();
    }
    let batch = b.try_take().unwrap();
    assert_eq!(values(&batch), vec![0, 1, 2]);
    assert_eq!(dropped(), 0);
    drop(batch);
    assert_eq!(dropped(), 3);
    assert_eq!(b.stats().taken, 1);
    assert!(b.is_empty());
}

#[test]
fn guards_can_be_held_together_and_dropped_in_any_order() {
    reset();
    let b: Batcher<Tracked, 2, 3> = Batcher::new();
    b.try_add_many(&tracked(0..6));
    let base = dropped();
    let first = b.try_take().unwrap();
    let second = b.try_take().unwrap();
    let third = b.try_take().unwrap();
    assert!(b.try_take().is_none());
    assert_eq!(b.try_add(Tracked::new(6)).unwrap_err().0 .0, 6);
    drop(second);
    assert_eq!(dropped(), base + 2 + 1);
    b.try_add(Tracked::new(7)).unwrap(); // second's buffer is free again
    assert_eq!(values(&first), vec![0, 1]);
    assert_eq!(values(&third), vec![4, 5]);
    drop(first);
    drop(third);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn take_next_hands_the_buffer_back_and_takes_the_next_batch_in_order() {
    reset();
    let b: Batcher<Tracked, 2, 3> = Batcher::new();
    b.try_add_many(&tracked(0..6));
    let base = dropped();
    let mut first = b.try_take().unwrap();
    assert_eq!(values(&first.drain().collect::<Vec<_>>()), vec![0, 1]);
    let second = first.take_next().unwrap();
    // The first buffer is free again: the next item opens it.
    b.try_add(Tracked::new(6)).unwrap();
    assert_eq!(values(&second), vec![2, 3]);
    // Items left in the batch are dropped by `take_next`, once.
    let third = second.take_next().unwrap();
    assert_eq!(dropped(), base + 2 + 2);
    assert_eq!(values(&third), vec![4, 5]);
    b.flush();
    let fourth = third.take_next().unwrap();
    assert_eq!(values(&fourth), vec![6]);
    assert!(fourth.take_next().is_none());
    // Every buffer came back, also the last one, with no batch after it.
    assert_eq!(b.try_add_many(&tracked(10..16)), 6);
    let stats = b.stats();
    assert_eq!(
        (stats.taken, stats.sealed_full, stats.sealed_flush),
        (4, 6, 1)
    );
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn take_next_hands_the_buffer_back_when_an_item_destructor_panics() {
    reset();
    let b: Batcher<Tracked, 3, 2> = Batcher::new();
    b.try_add_many(&tracked(0..6));
    let base = dropped();
    POISON_DROP.with(|p| p.set(Some(1)));
    let guard = b.try_take().unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| guard.take_next())).is_err());
    POISON_DROP.with(|p| p.set(None));
    assert_eq!(dropped(), base + 3, "the items after the panicking one too");
    // The buffer came back; the next batch was not taken.
    assert_eq!(b.try_add_many(&tracked(6..9)), 3);
    assert_eq!(values(&b.try_take().unwrap()), vec![3, 4, 5]);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn a_leaked_guard_leaks_its_buffer_but_nothing_is_dropped_twice() {
    reset();
    let b: Batcher<Tracked, 2, 2> = Batcher::new();
    b.try_add_many(&tracked(0..4));
    let base = dropped();
    std::mem::forget(b.try_take().unwrap()); // items 0, 1 and their buffer
                                             // One buffer is gone for good: one sealed batch is left, no room.
    assert_eq!(b.try_add(Tracked::new(9)).unwrap_err().0 .0, 9);
    drop(b.try_take());
    assert_eq!(b.try_add_many(&tracked(4..6)), 2);
    assert!(b.try_add(Tracked::new(6)).is_err(), "only one buffer left");
    drop(b);
    assert_eq!(
        live(),
        2,
        "only the leaked guard's two items were never dropped"
    );
    // 9; [2, 3]; the originals 4, 5; 6; the clones 4, 5.
    assert_eq!(dropped(), base + 1 + 2 + 2 + 1 + 2);
}

// ---------------------------------------------------------------------------
// Exact destructor counts when the batcher is dropped
// ---------------------------------------------------------------------------

#[test]
fn dropping_the_batcher_drops_partial_and_sealed_items_once() {
    reset();
    {
        let b: Batcher<Tracked, 3, 4> = Batcher::new();
        for i in 0..7 {
            b.try_add(Tracked::new(i)).unwrap(); // 2 sealed full + 1 partial
        }
        assert_eq!(b.len(), 7);
        assert_eq!(dropped(), 0);
    }
    assert_eq!(dropped(), 7);
    assert_eq!(live(), 0);
}

#[test]
fn dropping_a_batcher_with_flushed_ticked_and_sharded_batches() {
    reset();
    {
        let b: ShardedBatcher<Tracked, 3, 6, 3> = ShardedBatcher::new();
        b.producer(0).try_add(Tracked::new(0)).unwrap();
        assert!(b.flush()); // sealed by flush
        b.producer(1).try_add(Tracked::new(1)).unwrap();
        assert!(!b.tick()); // marks it
        assert!(b.tick()); // sealed by tick
        b.producer(2).try_add_many(&tracked(2..6)); // 1 full + partial [5]
        b.producer(0).try_add(Tracked::new(6)).unwrap(); // partial on shard 0
        let taken = b.try_take().unwrap(); // [0]: taken, dropped below
        assert_eq!(values(&taken), vec![0]);
        drop(taken);
        assert_eq!(b.len(), 6);
        assert_eq!(live(), 6);
    }
    assert_eq!(live(), 0);
}

#[test]
fn dropping_the_batcher_after_everything_was_taken_drops_nothing() {
    reset();
    let b: Batcher<Tracked, 2, 2> = Batcher::new();
    b.try_add(Tracked::new(0)).unwrap();
    b.flush();
    let items: Vec<Tracked> = b.try_take().unwrap().drain().collect();
    let before = dropped();
    drop(b);
    assert_eq!(dropped(), before);
    drop(items);
    assert_eq!(live(), 0);
}

// ---------------------------------------------------------------------------
// Counters and sizes
// ---------------------------------------------------------------------------

#[test]
fn stats_count_every_event() {
    let b: Batcher<u32, 2, 3> = Batcher::new();
    assert_eq!(b.stats(), snail::Stats::default());
    b.try_add_many(&[0, 1, 2]); // full + partial
    b.flush(); // flush
    b.try_add(3).unwrap();
    b.tick();
    b.tick(); // tick
    assert_eq!(b.try_add(4), Err(Full(4))); // refused
    assert_eq!(b.try_add_many(&[4, 5]), 0); // refused
    drop(b.try_take());
    drop(b.try_take());
    let s = b.stats();
    assert_eq!(s.added, 4);
    assert_eq!(s.refused, 2);
    assert_eq!(s.sealed_full, 1);
    assert_eq!(s.sealed_flush, 1);
    assert_eq!(s.sealed_tick, 1);
    assert_eq!(s.sealed(), 3);
    assert_eq!(s.taken, 2);
    assert_eq!(b.len(), 1);
}

#[test]
fn len_is_empty_capacity_and_sizes() {
    let b: ShardedBatcher<u32, 4, 6, 2> = ShardedBatcher::new();
    assert_eq!((b.batch_size(), b.buffers(), b.shards()), (4, 6, 2));
    assert_eq!(b.capacity(), 24);
    assert!(b.is_empty());
    assert_eq!(b.len(), 0);
    b.producer(0).try_add(1).unwrap();
    b.producer(1).try_add_many(&[2, 3, 4, 5, 6]);
    assert_eq!(b.len(), 6, "partial batches count");
    assert!(!b.is_empty());
    let batch = b.try_take().unwrap();
    assert_eq!(batch.len(), 4);
    assert_eq!(b.len(), 2, "taken batches do not count");
    drop(batch);
    assert!(b.flush());
    assert_eq!(b.len(), 2, "sealed batches count");
    drop(take_all(&b));
    assert!(b.is_empty());
    let full: Batcher<u8, 3, 5> = Batcher::default();
    assert_eq!(full.capacity(), 15);
    for i in 0..15 {
        full.try_add(i).unwrap();
    }
    assert_eq!(full.len(), full.capacity());
    let debug = format!("{full:?}");
    assert!(
        debug.contains("batch_size: 3") && debug.contains("closed: false"),
        "{debug}"
    );
}

#[test]
fn errors_print_without_needing_debug_items() {
    struct Opaque;
    let full = Full(Opaque);
    let closed = Closed(Opaque);
    assert_eq!(format!("{full:?}"), "Full(..)");
    assert_eq!(format!("{closed:?}"), "Closed(..)");
    assert_eq!(full.to_string(), "every batch buffer is in use");
    assert_eq!(closed.to_string(), "the batcher is closed");
    let _: &dyn std::error::Error = &full;
    let Opaque = closed.into_inner();
}

// ---------------------------------------------------------------------------
// Heap storage
// ---------------------------------------------------------------------------

#[cfg(feature = "alloc")]
mod heap {
    use super::*;
    use snail::{HeapStorage, SizeError};

    type Heap<T> = RawBatcher<T, HeapStorage<T, SpinLock>>;

    #[test]
    fn heap_storage_batcher_works_like_the_inline_one() {
        reset();
        let b: Heap<Tracked> = RawBatcher::with_storage(HeapStorage::new(3, 4, 2).unwrap());
        assert_eq!(
            (b.batch_size(), b.buffers(), b.shards(), b.capacity()),
            (3, 4, 2, 12)
        );
        b.producer(0).try_add_many(&tracked(0..4));
        b.producer(1).try_add_many(&tracked(10..12));
        b.producer(3).try_add(Tracked::new(12)).unwrap(); // shard 3 % 2 == 1
        assert_eq!(b.len(), 7);
        assert_eq!(take_values(&b), vec![vec![0, 1, 2], vec![10, 11, 12]]);
        b.producer(0).try_add_many(&tracked(4..12));
        assert_eq!(b.len(), 9, "[3] and 8 more: three full batches");
        b.close();
        assert_eq!(
            take_values(&b),
            vec![vec![3, 4, 5], vec![6, 7, 8], vec![9, 10, 11]]
        );
        drop(b);
        assert_eq!(live(), 0);
    }

    #[test]
    fn heap_storage_drops_what_is_left() {
        reset();
        {
            let b: Heap<Tracked> = RawBatcher::with_storage(HeapStorage::new(2, 3, 1).unwrap());
            b.try_add_many(&tracked(0..5));
        }
        assert_eq!(live(), 0);
    }

    #[test]
    fn heap_storage_size_errors() {
        type H = HeapStorage<u16, SpinLock>;
        assert_eq!(H::new(0, 0, 0).err(), Some(SizeError::ZeroBatch));
        assert_eq!(H::new(1, 0, 0).err(), Some(SizeError::ZeroBuffers));
        assert_eq!(H::new(1, 1, 0).err(), Some(SizeError::Shards));
        assert_eq!(H::new(1, 2, 3).err(), Some(SizeError::Shards));
        assert_eq!(H::new(usize::MAX, 2, 3).err(), Some(SizeError::Shards));
        // batch * buffers overflows.
        assert_eq!(H::new(usize::MAX, 2, 1).err(), Some(SizeError::TooLarge));
        // The slot count fits, its bytes overflow.
        assert_eq!(
            H::new(usize::MAX / 2 + 1, 1, 1).err(),
            Some(SizeError::TooLarge)
        );
        // The bytes fit in usize but exceed isize::MAX.
        assert_eq!(
            H::new(isize::MAX as usize / 2 + 1, 1, 1).err(),
            Some(SizeError::TooLarge)
        );
        // Zero-sized items: the slots take no memory, the buffer table does.
        type Z = HeapStorage<(), SpinLock>;
        assert_eq!(
            Z::new(1, usize::MAX / 2, 1).err(),
            Some(SizeError::TooLarge)
        );
        let z: RawBatcher<(), Z> = RawBatcher::with_storage(Z::new(usize::MAX, 1, 1).unwrap());
        assert_eq!(z.capacity(), usize::MAX);
        z.try_add(()).unwrap();
        assert!(z.flush());
        assert_eq!(z.try_take().unwrap().len(), 1);
        assert!(H::new(1, 1, 1).is_ok());
        assert!(H::new(5, 3, 3).is_ok());
        assert_eq!(
            SizeError::ZeroBatch.to_string(),
            "batch size must be at least 1"
        );
        assert_eq!(
            SizeError::Shards.to_string(),
            "shards must be between 1 and the number of buffers"
        );
        let _: &dyn std::error::Error = &SizeError::TooLarge;
    }

    /// Natively, an allocation of `isize::MAX` bytes is refused by the
    /// allocator; Miri would stop on it instead of returning null.
    #[cfg(not(miri))]
    #[test]
    fn heap_storage_reports_a_refused_allocation() {
        type H = HeapStorage<u8, SpinLock>;
        assert_eq!(
            H::new(isize::MAX as usize, 1, 1).err(),
            Some(SizeError::TooLarge)
        );
    }
}

// ---------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------

#[test]
fn shards_fill_their_own_buffers() {
    let b: ShardedBatcher<u32, 3, 6, 3> = ShardedBatcher::new();
    let (p0, p1, p2) = (b.producer(0), b.producer(1), b.producer(2));
    p0.try_add(0).unwrap();
    p1.try_add(100).unwrap();
    p0.try_add(1).unwrap();
    p2.try_add(200).unwrap();
    p1.try_add(101).unwrap();
    p0.try_add(2).unwrap(); // shard 0 full: sealed first
    b.producer(4).try_add(102).unwrap(); // 4 % 3 == 1: shard 1 full
    assert_eq!(take_all(&b), vec![vec![0, 1, 2], vec![100, 101, 102]]);
    assert!(b.flush());
    assert_eq!(take_all(&b), vec![vec![200]]);
}

#[test]
fn sharded_producers_on_threads_keep_their_order() {
    const SHARDS: usize = 3;
    let per_shard: u32 = if cfg!(miri) { 40 } else { 20_000 };
    let b: ShardedBatcher<u32, 8, 8, SHARDS, YieldLock, YieldNow> = ShardedBatcher::new();
    let finished = AtomicUsize::new(0);
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); SHARDS];
    std::thread::scope(|s| {
        for shard in 0..SHARDS {
            let (b, finished) = (&b, &finished);
            s.spawn(move || {
                let p = b.producer(shard);
                for i in 0..per_shard {
                    p.add(shard as u32 * 1_000_000 + i).unwrap();
                }
                finished.fetch_add(1, Ordering::Release);
            });
        }
        loop {
            if let Some(mut batch) = b.try_take() {
                let items: Vec<u32> = batch.drain().collect();
                let shard = (items[0] / 1_000_000) as usize;
                assert!(
                    items.iter().all(|&v| (v / 1_000_000) as usize == shard),
                    "a batch holds one shard's items"
                );
                got[shard].extend(items);
            } else if finished.load(Ordering::Acquire) == SHARDS {
                if !b.flush() && b.is_empty() {
                    break;
                }
            } else {
                std::thread::yield_now();
            }
        }
    });
    for (shard, items) in got.iter().enumerate() {
        let base = shard as u32 * 1_000_000;
        assert_eq!(
            *items,
            (base..base + per_shard).collect::<Vec<_>>(),
            "shard {shard}"
        );
    }
}

// ---------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------

/// `has_free` follows the free buffers: opening one takes it, taking a
/// sealed batch (and dropping it) gives one back.
#[test]
fn has_free_follows_the_free_buffers() {
    let b: Batcher<u32, 2, 2> = Batcher::new();
    assert!(b.has_free());
    b.try_add(0).unwrap();
    assert!(b.has_free(), "one buffer open, one free");
    b.try_add(1).unwrap(); // full: sealed
    b.try_add(2).unwrap();
    assert!(!b.has_free(), "one sealed, one open");
    b.try_add(3).unwrap(); // full: sealed
    assert!(b.try_add(4).is_err(), "no room, as has_free said");
    drop(b.try_take());
    assert!(b.has_free(), "the taken buffer came back");
    b.try_add(4).unwrap();
    assert!(!b.has_free());
}

static SHARED: Batcher<u64, 8, 4, YieldLock, YieldNow> = Batcher::new();

#[test]
fn a_static_batcher_is_shared_by_threads() {
    const THREADS: u64 = 4;
    let per_thread: u64 = if cfg!(miri) { 20 } else { 2_000 };
    let mut seen = vec![false; (THREADS * per_thread) as usize];
    let finished = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let finished = &finished;
            s.spawn(move || {
                for i in 0..per_thread {
                    SHARED.add(t * per_thread + i).unwrap();
                }
                finished.fetch_add(1, Ordering::Release);
            });
        }
        loop {
            if let Some(mut batch) = SHARED.try_take() {
                for v in batch.drain() {
                    assert!(!std::mem::replace(&mut seen[v as usize], true), "{v} twice");
                }
            } else if finished.load(Ordering::Acquire) == THREADS as usize {
                if !SHARED.flush() && SHARED.is_empty() {
                    break;
                }
            } else {
                std::thread::yield_now();
            }
        }
    });
    assert!(seen.iter().all(|&s| s), "every item arrived");
    assert_eq!(SHARED.stats().added, seen.len());
}

/// `producers` threads add `per_producer` items each through `shard_of(p)`
/// with `add` while this thread consumes; checks every item arrives exactly
/// once and each producer's items in order.
fn many_producers_one_consumer<S, L, R>(
    b: &RawBatcher<u64, S, L, R>,
    producers: usize,
    per_producer: u64,
    shard_of: impl Fn(usize) -> usize + Sync,
) where
    S: Storage<u64, L> + Send,
    L: RawLock + Sync,
    R: Relax,
{
    let mut seen = vec![false; producers * per_producer as usize];
    let mut next = vec![0u64; producers];
    let finished = AtomicUsize::new(0);
    let mut batches = 0usize;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let (finished, shard_of) = (&finished, &shard_of);
                s.spawn(move || {
                    let producer = b.producer(shard_of(p));
                    for i in 0..per_producer {
                        producer.add(((p as u64) << 32) | i).unwrap();
                    }
                    finished.fetch_add(1, Ordering::Release);
                })
            })
            .collect();
        loop {
            if let Some(mut batch) = b.try_take() {
                batches += 1;
                assert!(batch.len() <= b.batch_size());
                for v in batch.drain() {
                    let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                    assert!(!std::mem::replace(
                        &mut seen[p * per_producer as usize + i as usize],
                        true
                    ));
                    assert_eq!(i, next[p], "producer {p} out of order");
                    next[p] += 1;
                }
            } else if finished.load(Ordering::Acquire) == producers
                || handles.iter().all(|h| h.is_finished())
            {
                // Producers are done (or one panicked, which the join below
                // re-raises): seal what is left, take it, stop when empty.
                // The shard locks taken by `flush` order their last writes.
                if !b.flush() && b.is_empty() {
                    break;
                }
            } else {
                std::thread::yield_now();
            }
        }
        for h in handles {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    assert!(seen.iter().all(|&s| s), "every item arrived");
    assert!(next.iter().all(|&n| n == per_producer));
    let stats = b.stats();
    assert_eq!(stats.added, seen.len());
    assert_eq!(stats.taken, batches);
    assert_eq!(stats.sealed(), batches);
    assert_eq!(stats.refused, 0);
    assert!(b.is_empty());
}

fn per_producer() -> u64 {
    if cfg!(miri) {
        50
    } else {
        200_000
    }
}

#[test]
fn four_producers_one_consumer_single_shard() {
    let b: Batcher<u64, 64, 8, YieldLock, YieldNow> = Batcher::new();
    many_producers_one_consumer(&b, 4, per_producer(), |_| 0);
}

#[test]
fn four_producers_one_consumer_own_shards() {
    let b: ShardedBatcher<u64, 64, 12, 4, YieldLock, YieldNow> = ShardedBatcher::new();
    many_producers_one_consumer(&b, 4, per_producer(), |p| p);
}

#[test]
fn six_producers_share_three_shards() {
    let b: ShardedBatcher<u64, 16, 8, 3, YieldLock, YieldNow> = ShardedBatcher::new();
    let n = if cfg!(miri) { 20 } else { 20_000 };
    many_producers_one_consumer(&b, 6, n, |p| p % 3);
}

#[test]
fn a_tiny_batcher_under_heavy_contention() {
    // One item per batch, one buffer: every add waits for the consumer.
    let b: Batcher<u64, 1, 1, YieldLock, YieldNow> = Batcher::new();
    let n = if cfg!(miri) { 10 } else { 5_000 };
    many_producers_one_consumer(&b, 4, n, |_| 0);
}

#[cfg(feature = "alloc")]
#[test]
fn four_producers_one_consumer_heap_storage() {
    use snail::HeapStorage;
    let b: RawBatcher<u64, HeapStorage<u64, YieldLock>, YieldLock, YieldNow> =
        RawBatcher::with_storage(HeapStorage::new(32, 10, 4).unwrap());
    let n = if cfg!(miri) { 30 } else { 50_000 };
    many_producers_one_consumer(&b, 4, n, |p| p);
}

#[test]
fn items_are_dropped_exactly_once_across_threads() {
    // Drop counting with an atomic counter: items die on several threads.
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
    let n = if cfg!(miri) { 30 } else { 10_000 };
    let b: Batcher<Counted, 8, 3, YieldLock, YieldNow> = Batcher::new();
    let finished = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..n {
                    b.add(Counted).unwrap();
                }
                finished.fetch_add(1, Ordering::Release);
            });
        }
        let mut turn = 0u32;
        while finished.load(Ordering::Acquire) < 2 {
            turn += 1;
            match (b.try_take(), turn % 3) {
                (Some(mut batch), 0) => drop(batch.drain()), // all dropped by the drain
                (Some(mut batch), 1) => drop(batch.drain().next()), // one by us, rest by the drain
                (Some(batch), _) => drop(batch),             // by the guard
                (None, _) => std::thread::yield_now(),
            }
        }
    });
    drop(b); // what is left in partial and sealed batches
    assert_eq!(DROPS.load(Ordering::Relaxed), 2 * n);
}

// ---------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------

#[test]
fn a_panicking_clone_in_try_add_many_leaves_the_batcher_consistent() {
    reset();
    let b: Batcher<Tracked, 2, 4> = Batcher::new();
    let items = tracked(0..6);
    assert!(panics_cloning(3, || {
        b.try_add_many(&items);
    }));
    // 0, 1 (sealed) and 2 (partial) were accepted before the panic.
    assert_eq!(b.len(), 3);
    assert_eq!(b.stats().added, 3);
    assert_eq!(live(), 6 + 3);
    // The shard lock was released: adding works again.
    b.try_add(Tracked::new(10)).unwrap();
    assert_eq!(b.try_add_many(&items[4..]), 2);
    assert!(!b.flush(), "[2, 10] and [4, 5] were sealed full");
    assert_eq!(take_values(&b), vec![vec![0, 1], vec![2, 10], vec![4, 5]]);
    drop(items);
    drop(b);
    assert_eq!(live(), 0);
}

/// A batcher of 3 buffers of 2 after `try_add_many(items)` (at least 3
/// items, from 0): 0 and 1 fill a batch, 2 opens the next buffer, and its
/// clone panics.
fn first_item_clone_panicked(items: &[Tracked]) -> Batcher<Tracked, 2, 3> {
    let b = Batcher::new();
    assert!(panics_cloning(2, || {
        b.try_add_many(items);
    }));
    b
}

#[test]
fn a_panicking_clone_of_a_new_buffers_first_item_gives_the_buffer_back() {
    reset();
    let items = tracked(0..4);
    let b = first_item_clone_panicked(&items);
    assert_eq!(b.len(), 2);
    assert_eq!(b.stats().added, 2);
    assert!(b.has_free(), "the opened buffer went back to the free list");
    assert!(!b.flush(), "no partial batch");
    assert!(!b.tick() && !b.tick(), "nor for tick");
    // The next item opens a buffer again, and says so.
    let done = b.producer(0).try_add(items[2].clone()).unwrap();
    assert!(done.opened, "{done:?}");
    assert_eq!(b.try_add_many(&items[3..]), 1);
    b.try_add(Tracked::new(9)).unwrap();
    assert!(b.flush());
    assert_eq!(take_values(&b), vec![vec![0, 1], vec![2, 3], vec![9]]);
    assert!(b.try_take().is_none());
    drop(items);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn close_refuses_items_after_a_panicking_clone_of_a_first_item() {
    reset();
    let items = tracked(0..3);
    let b = first_item_clone_panicked(&items);
    b.close();
    let back = b.try_add(Tracked::new(7)).unwrap_err();
    assert_eq!(back.0 .0, 7, "the item comes back");
    assert_eq!(b.try_add_many(&items), 0);
    assert_eq!(b.add(Tracked::new(8)).unwrap_err().0 .0, 8);
    assert_eq!(b.len(), 2);
    drop(back);
    assert_eq!(take_values(&b), vec![vec![0, 1]]);
    drop(items);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn try_add_many_clones_only_what_it_adds() {
    reset();
    let b: Batcher<Tracked, 2, 1> = Batcher::new();
    let items = tracked(0..5);
    assert_eq!(b.try_add_many(&items), 2);
    assert_eq!(b.try_add_many(&items[2..]), 0);
    assert_eq!(
        live(),
        5 + 2,
        "no clone of a refused item, not even briefly"
    );
    assert_eq!(created(), 5 + 2);
    drop(items);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn a_panicking_iterator_in_try_extend_releases_the_lock() {
    reset();
    let b: Batcher<Tracked, 4, 2> = Batcher::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut iter = (0..).map(|i| {
            if i == 2 {
                panic!("iterator fails")
            } else {
                Tracked::new(i)
            }
        });
        b.producer(0).try_extend(&mut iter)
    }));
    assert!(result.is_err());
    assert_eq!(b.len(), 2);
    b.try_add(Tracked::new(2)).unwrap();
    b.flush();
    assert_eq!(take_values(&b), vec![vec![0, 1, 2]]);
    assert_eq!(live(), 0);
}

#[test]
fn a_panicking_item_drop_in_a_guard_still_drops_the_rest_and_recycles() {
    reset();
    let b: Batcher<Tracked, 3, 1> = Batcher::new();
    b.try_add_many(&tracked(0..3));
    let base = dropped();
    POISON_DROP.with(|p| p.set(Some(1)));
    let guard = b.try_take().unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| drop(guard))).is_err());
    POISON_DROP.with(|p| p.set(None));
    assert_eq!(
        dropped(),
        base + 3,
        "items after the panicking one were dropped too"
    );
    // The only buffer was recycled despite the panic.
    assert_eq!(b.try_add_many(&tracked(3..6)), 3);
    drop(b);
    assert_eq!(live(), 0);
}

#[test]
fn a_panicking_item_drop_in_the_batchers_drop_still_drops_every_other_item() {
    // A sharded batcher with a partial batch on each shard and sealed ones;
    // the panicking item is each item in turn.
    for poison in 0..10 {
        reset();
        let b: ShardedBatcher<Tracked, 2, 6, 2> = ShardedBatcher::new();
        for i in 0..5 {
            b.producer(0).try_add(Tracked::new(i)).unwrap(); // [0, 1] [2, 3] [4
        }
        for i in 5..10 {
            b.producer(1).try_add(Tracked::new(i)).unwrap(); // [5, 6] [7, 8] [9
        }
        POISON_DROP.with(|p| p.set(Some(poison)));
        assert!(catch_unwind(AssertUnwindSafe(|| drop(b))).is_err());
        POISON_DROP.with(|p| p.set(None));
        assert_eq!(dropped(), 10, "poison {poison}: every item dropped once");
        assert_eq!(live(), 0);
    }
}

#[test]
fn a_panicking_item_drop_in_a_drain_still_drops_the_rest() {
    reset();
    let b: Batcher<Tracked, 4, 1> = Batcher::new();
    b.try_add_many(&tracked(0..4));
    let base = dropped();
    POISON_DROP.with(|p| p.set(Some(2)));
    let mut guard = b.try_take().unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut drain = guard.drain();
        let first = drain.next().unwrap();
        drop(drain); // drops 1, 2 (panics), 3
        first
    }));
    assert!(result.is_err(), "the drop of 2 panicked");
    POISON_DROP.with(|p| p.set(None));
    assert_eq!(
        dropped(),
        base + 4,
        "the yielded item unwound with the closure"
    );
    assert!(guard.is_empty());
    drop(guard);
    assert_eq!(dropped(), base + 4);
    assert_eq!(b.try_add_many(&tracked(4..8)), 4);
    drop(b);
    assert_eq!(live(), 0);
}

// ---------------------------------------------------------------------------
// Auto traits
// ---------------------------------------------------------------------------

/// `Probe::<T>::SYNC` is `true` exactly when `T: Sync` (an inherent constant
/// wins over the trait's when its bound holds), and likewise for `SEND`.
struct Probe<T: ?Sized>(std::marker::PhantomData<T>);

trait NotSync {
    const SYNC: bool = false;
}
impl<T: ?Sized> NotSync for Probe<T> {}

trait NotSend {
    const SEND: bool = false;
}

impl<T: ?Sized + Sync> Probe<T> {
    const SYNC: bool = true;
}

struct SendProbe<T: ?Sized>(std::marker::PhantomData<T>);
impl<T: ?Sized> NotSend for SendProbe<T> {}
impl<T: ?Sized + Send> SendProbe<T> {
    const SEND: bool = true;
}

type CellBatcher = Batcher<Cell<u32>, 2, 2>;
type CellBatch<'a> = snail::Batch<
    'a,
    Cell<u32>,
    snail::ArrayStorage<Cell<u32>, 2, 2, SpinLock>,
    SpinLock,
    snail::relax::Spin,
>;
type RcBatch<'a> = snail::Batch<
    'a,
    std::rc::Rc<u32>,
    snail::ArrayStorage<std::rc::Rc<u32>, 2, 2, SpinLock>,
    SpinLock,
    snail::relax::Spin,
>;
type U32Batch<'a> =
    snail::Batch<'a, u32, snail::ArrayStorage<u32, 2, 2, SpinLock>, SpinLock, snail::relax::Spin>;

// Checked at compile time.
const _: () = {
    // A batcher hands items between threads: Sync needs T: Send only.
    assert!(Probe::<CellBatcher>::SYNC);
    assert!(SendProbe::<CellBatcher>::SEND);
    assert!(!Probe::<Batcher<std::rc::Rc<u32>, 2, 2>>::SYNC);
    // A guard derefs to &[T]: shared between threads only if T: Sync.
    assert!(!Probe::<CellBatch<'static>>::SYNC);
    assert!(SendProbe::<CellBatch<'static>>::SEND);
    assert!(Probe::<U32Batch<'static>>::SYNC);
    assert!(SendProbe::<U32Batch<'static>>::SEND);
    assert!(!SendProbe::<RcBatch<'static>>::SEND);
};

#[test]
fn a_batch_of_non_sync_items_works_on_one_thread() {
    let b: Batcher<RefCell<u32>, 2, 2> = Batcher::new();
    b.try_add(RefCell::new(1)).unwrap();
    b.flush();
    let batch = b.try_take().unwrap();
    *batch[0].borrow_mut() += 1;
    assert_eq!(*batch[0].borrow(), 2);
}

// ---------------------------------------------------------------------------
// critical-section lock
// ---------------------------------------------------------------------------

#[cfg(feature = "critical-section")]
mod critical_section_lock {
    use super::*;
    use snail::CsBatcher;

    #[test]
    fn cs_batcher_behaves_like_the_spin_one() {
        reset();
        static Q: CsBatcher<u16, 4, 2> = CsBatcher::new();
        assert_eq!(Q.try_add_many(&[1, 2, 3, 4, 5]), 5);
        assert!(Q.flush());
        assert_eq!(take_all(&Q), vec![vec![1, 2, 3, 4], vec![5]]);
        let b: CsBatcher<Tracked, 2, 2> = CsBatcher::new();
        let items = tracked(0..3);
        assert!(panics_cloning(1, || {
            b.try_add_many(&items);
        }));
        // The critical section was left on unwind: this would deadlock otherwise.
        b.try_add(Tracked::new(7)).unwrap();
        b.close();
        assert_eq!(take_values(&b), vec![vec![0, 7]]);
        drop((items, b));
        assert_eq!(live(), 0);
    }

    /// A critical section nests, so an iterator that adds to the batcher it
    /// is being added to would enter the shard's state a second time: the
    /// lock panics instead, and what was added before stays intact.
    #[test]
    fn entering_a_cs_lock_again_from_inside_panics_and_loses_nothing() {
        reset();
        let b: CsBatcher<Tracked, 4, 2> = CsBatcher::new();
        let mut calls = 0;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut iter = std::iter::from_fn(|| {
                calls += 1;
                if calls == 3 {
                    let _ = b.try_add(Tracked::new(10));
                }
                Some(Tracked::new(calls))
            });
            b.producer(0).try_extend(&mut iter)
        }));
        let message = *result.unwrap_err().downcast::<&str>().unwrap();
        assert!(message.contains("entered again"), "{message}");
        assert_eq!(b.len(), 2, "the items before the re-entry");
        assert_eq!(live(), 2, "the re-entering call's item was dropped");
        // The lock was left on unwind, outer and inner.
        b.try_add(Tracked::new(5)).unwrap();
        b.flush();
        assert_eq!(take_values(&b), vec![vec![1, 2, 5]]);
        drop(b);
        assert_eq!(live(), 0);
    }

    #[test]
    fn cs_batcher_across_threads() {
        let b: CsBatcher<u64, 16, 4> = CsBatcher::new();
        let n = if cfg!(miri) { 20 } else { 5_000 };
        many_producers_one_consumer(&b, 3, n, |_| 0);
    }
}

// ---------------------------------------------------------------------------
// The biased lock, on std threads
// ---------------------------------------------------------------------------

mod biased {
    use super::*;
    use snail::{Bias, BiasSlot, BiasedLock};

    /// A slot per thread, leaked (and listed in a static, so that Miri does
    /// not count it as a leak), `SeqCst` fences on both sides: the portable
    /// form of a [`Bias`] (the std shim's uses `membarrier`).
    struct StdBias;

    static SLOTS: std::sync::Mutex<Vec<&'static BiasSlot>> = std::sync::Mutex::new(Vec::new());

    // SAFETY: each thread gets a new slot on first use and keeps it; slots
    // are never reused or freed. Both fences are `fence(SeqCst)`.
    unsafe impl Bias for StdBias {
        fn slot() -> &'static BiasSlot {
            thread_local!(static SLOT: Cell<Option<&'static BiasSlot>> = const { Cell::new(None) });
            SLOT.with(|s| match s.get() {
                Some(slot) => slot,
                None => {
                    let slot: &'static BiasSlot = Box::leak(Box::new(BiasSlot::new()));
                    SLOTS.lock().unwrap().push(slot);
                    s.set(Some(slot));
                    slot
                }
            })
        }

        fn light() {
            std::sync::atomic::fence(Ordering::SeqCst);
        }

        fn heavy() {
            std::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// [`StdBias`] that counts the ownerships taken away (its heavy fences).
    struct Counted;

    static REVOKED: AtomicUsize = AtomicUsize::new(0);

    // SAFETY: `StdBias`'s slots and fences; `heavy` also counts.
    unsafe impl Bias for Counted {
        fn slot() -> &'static BiasSlot {
            StdBias::slot()
        }
        fn light() {
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        fn heavy() {
            REVOKED.fetch_add(1, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// A counter that is only ever touched under `lock`.
    struct Guarded<B = StdBias> {
        lock: BiasedLock<B>,
        count: std::cell::UnsafeCell<u64>,
    }

    // SAFETY: `count` is only accessed inside `lock.lock`.
    unsafe impl<B> Sync for Guarded<B> {}

    impl<B: Bias> Guarded<B> {
        fn new() -> Self {
            Self {
                lock: BiasedLock::new(),
                count: std::cell::UnsafeCell::new(0),
            }
        }

        fn bump(&self) {
            // SAFETY: under the lock, the only access.
            self.lock.lock(|| unsafe { *self.count.get() += 1 });
        }

        /// `n` bumps in this thread and in each of three more, all at once.
        fn bump_from_four_threads(&self, n: u64) {
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| (0..n).for_each(|_| self.bump()));
                }
                (0..n).for_each(|_| self.bump());
            });
        }

        /// The count, read under the lock.
        fn total(&self) -> u64 {
            // SAFETY: under the lock, the only access.
            self.lock.lock(|| unsafe { *self.count.get() })
        }
    }

    /// Lone bumps before the contention, and bumps per contending thread.
    const ALONE_THEN_EACH: (u64, u64) = if cfg!(miri) {
        (100, 50)
    } else {
        (10_000, 100_000)
    };

    /// One thread takes the lock long enough alone to own it; then three
    /// more join, each revoking and contending. No increment is lost (a
    /// non-atomic read-modify-write: two threads inside at once would lose
    /// some, and Miri would report the race).
    #[test]
    fn owner_then_contenders_count_exactly() {
        let g: Guarded = Guarded::new();
        let (alone, each) = ALONE_THEN_EACH;
        (0..alone).for_each(|_| g.bump());
        assert!(g.lock.is_biased(), "a lone thread came to own the lock");
        g.bump_from_four_threads(each);
        assert_eq!(g.total(), alone + 4 * each);
    }

    /// A bias that never grants (the std shim's without `membarrier`): the
    /// lock is a spin lock. Four threads, one of them alone first for long
    /// enough that a granting bias would have made it the owner; no
    /// increment is lost and the lock is never biased.
    #[test]
    fn a_lock_whose_bias_never_grants_still_excludes() {
        struct Never;
        // SAFETY: as `StdBias`: its slots, `SeqCst` fences.
        unsafe impl Bias for Never {
            fn slot() -> &'static BiasSlot {
                StdBias::slot()
            }
            fn grant() -> bool {
                false
            }
            fn light() {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
            fn heavy() {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
        }
        let g: Guarded<Never> = Guarded::new();
        let (alone, each) = ALONE_THEN_EACH;
        (0..alone).for_each(|_| g.bump());
        assert!(!g.lock.is_biased());
        g.bump_from_four_threads(each);
        assert!(!g.lock.is_biased());
        assert_eq!(g.total(), alone + 4 * each);
    }

    /// Threads take turns: each runs alone for a while, then hands over, so
    /// ownership moves from thread to thread. A turn of 5000 entries owns
    /// the lock for more than 4096 of them, so the next owner needs only 64
    /// again: every turn ends with the lock biased. (Under Miri, turns of
    /// 80: only the first ends biased, as the short biases double what the
    /// next owner needs.)
    #[test]
    fn ownership_moves_between_threads() {
        let g: Guarded = Guarded::new();
        let turn = AtomicUsize::new(0);
        let biased = AtomicUsize::new(0);
        let (threads, rounds, run) = if cfg!(miri) {
            (2, 2, 80)
        } else {
            (4, 20, 5000)
        };
        std::thread::scope(|s| {
            for t in 0..threads {
                let (g, turn, biased) = (&g, &turn, &biased);
                s.spawn(move || {
                    for r in 0..rounds {
                        while turn.load(Ordering::Acquire) != r * threads + t {
                            std::thread::yield_now();
                        }
                        (0..run).for_each(|_| g.bump());
                        if g.lock.is_biased() {
                            biased.fetch_add(1, Ordering::Relaxed);
                        }
                        turn.fetch_add(1, Ordering::Release);
                    }
                });
            }
        });
        assert_eq!(g.total(), (threads * rounds * run) as u64);
        let turns = if cfg!(miri) { 1 } else { threads * rounds };
        assert_eq!(biased.load(Ordering::Relaxed), turns, "turns ending biased");
    }

    /// A sharded batcher on biased locks, as the std shim builds it: four
    /// producers on two shards, a consumer, and a thread that flushes the
    /// shards while they run, taking the ownership from whoever holds it
    /// (the revocations are counted: some must happen, outside Miri's
    /// short run). Every item once, in order.
    #[test]
    fn sharded_batcher_on_biased_locks() {
        let b: ShardedBatcher<u64, 32, 6, 2, BiasedLock<Counted>> = ShardedBatcher::new();
        let n = if cfg!(miri) { 100 } else { 50_000 };
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    b.flush();
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            });
            many_producers_one_consumer(&b, 4, n, |p| p % 2);
            done.store(true, Ordering::Release);
        });
        let revoked = REVOKED.load(Ordering::SeqCst);
        eprintln!("biased sharded batcher: {revoked} revocations");
        assert!(
            cfg!(miri) || revoked > 0,
            "no lock was ever biased and revoked"
        );
    }

    /// A bias that lasted (4096 entries or more) is granted again after 64
    /// lone entries; one revoked early doubles what the next owner needs.
    #[test]
    fn a_long_bias_is_granted_again_soon_a_short_one_later() {
        let g: Guarded = Guarded::new();
        // The revoking entry is contended, so a thread becomes the owner on
        // its threshold-th entry after that one.
        let bumps = |n: usize| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    (0..n).for_each(|_| g.bump());
                    g.lock.is_biased()
                })
                .join()
                .unwrap()
            })
        };
        (0..64).for_each(|_| g.bump());
        assert!(g.lock.is_biased(), "64 lone entries grant the first bias");
        (0..5000).for_each(|_| g.bump());
        assert!(bumps(65), "after a long bias the threshold is back at 64");
        // That owner made 0 entries of its own: its revocation doubles.
        assert!(!bumps(65), "after a short bias 64 entries are not enough");
        assert!(bumps(129), "the doubled threshold is 128");
        assert_eq!(g.total(), 64 + 5000 + 65 + 65 + 129);
    }

    /// A bias that is not ready (`grant` returns `false`, as the std shim's
    /// does without `membarrier`) leaves the lock unbiased however long one
    /// thread keeps it alone, and counts none of those entries; once it is
    /// ready, the 64th lone entry gets the bias.
    #[test]
    fn no_bias_until_the_bias_grants_it() {
        static READY: AtomicBool = AtomicBool::new(false);
        struct Later;
        // SAFETY: as `StdBias`: its slots, `SeqCst` fences.
        unsafe impl Bias for Later {
            fn slot() -> &'static BiasSlot {
                StdBias::slot()
            }
            fn grant() -> bool {
                READY.load(Ordering::SeqCst)
            }
            fn light() {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
            fn heavy() {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
        }
        let lock: BiasedLock<Later> = BiasedLock::new();
        let mut count = 0;
        for _ in 0..1000 {
            lock.lock(|| count += 1);
        }
        assert!(!lock.is_biased(), "biased without a grant");
        READY.store(true, Ordering::SeqCst);
        // Entries without a grant were not counted: 64 granted ones bias it.
        for _ in 0..63 {
            lock.lock(|| count += 1);
        }
        assert!(
            !lock.is_biased(),
            "ungranted entries counted toward the bias"
        );
        lock.lock(|| count += 1);
        assert!(lock.is_biased(), "not biased after 64 granted lone entries");
        lock.lock(|| count += 1);
        assert_eq!(count, 1065);
    }

    /// A closure that panics inside the owner's path leaves the lock usable.
    #[test]
    fn panic_inside_the_owned_lock_releases_it() {
        let g: Guarded = Guarded::new();
        for _ in 0..200 {
            g.bump();
        }
        assert!(g.lock.is_biased(), "this thread owns the lock");
        let r = catch_unwind(AssertUnwindSafe(|| g.lock.lock(|| panic!("inside"))));
        assert!(r.is_err());
        g.bump();
        std::thread::scope(|s| {
            s.spawn(|| g.bump());
        });
        assert_eq!(g.total(), 202);
    }
}
