//! Model test: random sequences of operations on a small batcher, checked
//! step by step against a reference model built from `Vec`s and a
//! `VecDeque`: every delivered item, every refused item, `len()`, `stats()`,
//! the flags `Added` reports, and the exact number of items created and
//! dropped.
//!
//! Cases: `PROPTEST_CASES` (proptest's default 256 otherwise; at most 8
//! under Miri, where `-Zmiri-env-forward=PROPTEST_CASES` lowers it further).
//! The long run (about 2 s per 10,000 cases on the 2-core machine):
//!
//! ```text
//! PROPTEST_CASES=10000 cargo test --release -p snail --test model
//! ```
#![cfg(not(snail_loom))]

use std::cell::Cell;
use std::collections::VecDeque;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use snail::{Batch, Batcher, Full, RawBatcher, ShardedBatcher, SpinLock, Storage};

// ---------------------------------------------------------------------------
// Counted items
// ---------------------------------------------------------------------------

thread_local! {
    static CREATED: Cell<usize> = const { Cell::new(0) };
    static DROPPED: Cell<usize> = const { Cell::new(0) };
}

/// A non-`Copy` item with an id; counts creations (also by `clone`) and drops
/// on this thread. No heap memory, so the cases that leak guards or drains on
/// purpose leak nothing that Miri would report.
#[derive(Debug)]
struct Tracked(u32);

impl Tracked {
    fn new(id: u32) -> Self {
        CREATED.with(|c| c.set(c.get() + 1));
        Tracked(id)
    }
}

impl Clone for Tracked {
    fn clone(&self) -> Self {
        Tracked::new(self.0)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        DROPPED.with(|c| c.set(c.get() + 1));
    }
}

fn ids(items: &[Tracked]) -> Vec<u32> {
    items.iter().map(|t| t.0).collect()
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// What to do with a taken batch.
#[derive(Debug, Clone, Copy)]
enum Consume {
    /// `drain()` to the end.
    DrainAll,
    /// `drain()`, take `n` items, drop the drain (it drops the rest).
    DrainSome(usize),
    /// Drop the guard without draining (it drops the items).
    DropGuard,
    /// `drain()`, take `n` items, `mem::forget` the drain: the rest leak.
    LeakDrain(usize),
    /// `mem::forget` the guard: its items and its buffer leak.
    ForgetGuard,
}

#[derive(Debug, Clone)]
enum Op {
    TryAdd {
        shard: usize,
    },
    /// `add`, only when it would not wait (otherwise skipped).
    Add {
        shard: usize,
    },
    TryAddMany {
        shard: usize,
        n: usize,
    },
    TryExtend {
        shard: usize,
        n: usize,
    },
    Flush,
    Tick,
    Close,
    /// Take the oldest batch and consume it at once.
    Take(Consume),
    /// Take the oldest batch and hold the guard (at most 2 held).
    Hold,
    /// Consume one of the held guards.
    Release {
        which: usize,
        how: Consume,
    },
    /// Consume a held guard's items as `first` says (`DropGuard`: leave
    /// them), then hand its buffer back and take the next batch in its
    /// place (`take_next`, which drops what is left).
    TakeNext {
        which: usize,
        first: Consume,
    },
    /// Reverse a held guard's items in place (`DerefMut`).
    Reverse {
        which: usize,
    },
}

fn consume() -> impl Strategy<Value = Consume> {
    prop_oneof![
        3 => Just(Consume::DrainAll),
        2 => (0..5usize).prop_map(Consume::DrainSome),
        3 => Just(Consume::DropGuard),
        1 => (0..5usize).prop_map(Consume::LeakDrain),
        1 => Just(Consume::ForgetGuard),
    ]
}

/// The ways to consume a guard's items that leave the guard.
fn consume_in_place() -> impl Strategy<Value = Consume> {
    consume().prop_map(|how| match how {
        Consume::ForgetGuard => Consume::DropGuard,
        how => how,
    })
}

fn op() -> impl Strategy<Value = Op> {
    op_adding_many(8)
}

/// The operations, with `try_add_many` and `try_extend` of up to
/// `many - 1` items.
fn op_adding_many(many: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..4usize).prop_map(|shard| Op::TryAdd { shard }),
        2 => (0..4usize).prop_map(|shard| Op::Add { shard }),
        3 => (0..4usize, 0..many).prop_map(|(shard, n)| Op::TryAddMany { shard, n }),
        2 => (0..4usize, 0..many).prop_map(|(shard, n)| Op::TryExtend { shard, n }),
        2 => Just(Op::Flush),
        3 => Just(Op::Tick),
        1 => Just(Op::Close),
        5 => consume().prop_map(Op::Take),
        2 => Just(Op::Hold),
        3 => (0..2usize, consume()).prop_map(|(which, how)| Op::Release { which, how }),
        1 => (0..2usize).prop_map(|which| Op::Reverse { which }),
        2 => (0..2usize, consume_in_place()).prop_map(|(which, first)| Op::TakeNext { which, first }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    // Miri runs each case some thousand times slower: shorter sequences.
    let max = if cfg!(miri) { 40 } else { 80 };
    prop::collection::vec(op(), 0..max)
}

/// Shorter sequences of operations that add up to 399 items at once
/// (under Miri, where nothing is prefetched and runs never stop a fill,
/// fewer and smaller).
fn ops_adding_many() -> impl Strategy<Value = Vec<Op>> {
    let (max, many) = if cfg!(miri) { (8, 150) } else { (40, 400) };
    prop::collection::vec(op_adding_many(many), 0..max)
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ModelStats {
    added: usize,
    refused: usize,
    sealed_full: usize,
    sealed_flush: usize,
    sealed_tick: usize,
    taken: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reason {
    Full,
    Flush,
    Tick,
}

struct Model {
    batch: usize,
    buffers: usize,
    /// Per shard: the partial batch and whether a tick has marked it.
    partial: Vec<Vec<u32>>,
    ticked: Vec<bool>,
    sealed: VecDeque<Vec<u32>>,
    /// What each held guard still holds, in the order of `held`.
    held: Vec<Vec<u32>>,
    /// Buffers lost to forgotten guards.
    leaked_buffers: usize,
    /// Items that are never dropped (forgotten guards and drains).
    leaked_items: usize,
    closed: bool,
    stats: ModelStats,
    created: usize,
    dropped: usize,
    next_id: u32,
}

impl Model {
    fn new(batch: usize, buffers: usize, shards: usize) -> Self {
        Model {
            batch,
            buffers,
            partial: vec![Vec::new(); shards],
            ticked: vec![false; shards],
            sealed: VecDeque::new(),
            held: Vec::new(),
            leaked_buffers: 0,
            leaked_items: 0,
            closed: false,
            stats: ModelStats::default(),
            created: 0,
            dropped: 0,
            next_id: 0,
        }
    }

    fn shard(&self, shard: usize) -> usize {
        shard % self.partial.len()
    }

    fn in_use(&self) -> usize {
        self.partial.iter().filter(|p| !p.is_empty()).count()
            + self.sealed.len()
            + self.held.len()
            + self.leaked_buffers
    }

    fn len(&self) -> usize {
        self.partial.iter().map(Vec::len).sum::<usize>()
            + self.sealed.iter().map(Vec::len).sum::<usize>()
    }

    /// A new item id (the test creates the real item).
    fn create(&mut self) -> u32 {
        self.created += 1;
        self.next_id += 1;
        self.next_id - 1
    }

    /// Whether an item for `shard` would be accepted now.
    fn has_room(&self, shard: usize) -> bool {
        !self.partial[shard].is_empty() || (!self.closed && self.in_use() < self.buffers)
    }

    /// Adds `id` to `shard` if there is room: `Some((opened, sealed))`.
    fn push(&mut self, shard: usize, id: u32) -> Option<(bool, bool)> {
        if !self.has_room(shard) {
            return None;
        }
        let opened = self.partial[shard].is_empty();
        if opened {
            self.ticked[shard] = false;
        }
        self.partial[shard].push(id);
        self.stats.added += 1;
        let sealed = self.partial[shard].len() == self.batch;
        if sealed {
            self.seal(shard, Reason::Full);
        }
        Some((opened, sealed))
    }

    fn seal(&mut self, shard: usize, reason: Reason) {
        let items = std::mem::take(&mut self.partial[shard]);
        assert!(!items.is_empty());
        self.sealed.push_back(items);
        self.ticked[shard] = false;
        match reason {
            Reason::Full => self.stats.sealed_full += 1,
            Reason::Flush => self.stats.sealed_flush += 1,
            Reason::Tick => self.stats.sealed_tick += 1,
        }
    }

    fn flush(&mut self) -> bool {
        let mut any = false;
        for shard in 0..self.partial.len() {
            if !self.partial[shard].is_empty() {
                self.seal(shard, Reason::Flush);
                any = true;
            }
        }
        any
    }

    fn tick(&mut self) -> bool {
        let mut any = false;
        for shard in 0..self.partial.len() {
            if self.partial[shard].is_empty() {
                continue;
            }
            if self.ticked[shard] {
                self.seal(shard, Reason::Tick);
                any = true;
            } else {
                self.ticked[shard] = true;
            }
        }
        any
    }

    fn take(&mut self) -> Option<Vec<u32>> {
        let items = self.sealed.pop_front()?;
        self.stats.taken += 1;
        Some(items)
    }

    /// Accounts for consuming a taken batch that held `len` items.
    fn consume(&mut self, len: usize, how: Consume) {
        match how {
            Consume::DrainAll | Consume::DrainSome(_) | Consume::DropGuard => self.dropped += len,
            Consume::LeakDrain(n) => {
                let yielded = n.min(len);
                self.dropped += yielded;
                self.leaked_items += len - yielded;
            }
            Consume::ForgetGuard => {
                self.leaked_items += len;
                self.leaked_buffers += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

type Guard<'a, S> = Batch<'a, Tracked, S, SpinLock, snail::relax::Spin>;

/// Consumes a real guard as `how` says and checks the items it yields.
fn consume_guard<S: Storage<Tracked, SpinLock>>(
    mut guard: Guard<'_, S>,
    expected: &[u32],
    how: Consume,
) -> Result<(), TestCaseError> {
    consume_items(&mut guard, expected, how)?;
    if let Consume::ForgetGuard = how {
        std::mem::forget(guard);
    }
    Ok(())
}

/// Consumes a real guard's items as `how` says (all but forgetting the
/// guard, which is left to the caller) and checks the items it yields.
fn consume_items<S: Storage<Tracked, SpinLock>>(
    guard: &mut Guard<'_, S>,
    expected: &[u32],
    how: Consume,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(ids(guard), expected);
    prop_assert_eq!(guard.len(), expected.len());
    match how {
        Consume::DrainAll => {
            let items: Vec<Tracked> = guard.drain().collect();
            prop_assert_eq!(ids(&items), expected);
            prop_assert!(guard.is_empty());
        }
        Consume::DrainSome(n) | Consume::LeakDrain(n) => {
            let mut drain = guard.drain();
            let items: Vec<Tracked> = drain.by_ref().take(n).collect();
            prop_assert_eq!(ids(&items), &expected[..n.min(expected.len())]);
            prop_assert_eq!(drain.len(), expected.len() - items.len());
            if let Consume::LeakDrain(_) = how {
                std::mem::forget(drain);
            } else {
                drop(drain);
            }
            prop_assert!(guard.is_empty());
        }
        Consume::DropGuard | Consume::ForgetGuard => {}
    }
    Ok(())
}

fn counts() -> (usize, usize) {
    (CREATED.with(Cell::get), DROPPED.with(Cell::get))
}

fn check<S: Storage<Tracked, SpinLock>>(
    b: &RawBatcher<Tracked, S>,
    m: &Model,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(b.len(), m.len());
    prop_assert_eq!(b.is_empty(), m.len() == 0);
    prop_assert_eq!(b.is_closed(), m.closed);
    let s = b.stats();
    let real = ModelStats {
        added: s.added,
        refused: s.refused,
        sealed_full: s.sealed_full,
        sealed_flush: s.sealed_flush,
        sealed_tick: s.sealed_tick,
        taken: s.taken,
    };
    prop_assert_eq!(&real, &m.stats);
    prop_assert_eq!(counts(), (m.created, m.dropped), "(created, dropped)");
    Ok(())
}

/// Applies `ops` to `b` and to a model of it, comparing after every step,
/// then drops the guards and the batcher and checks every item was dropped
/// exactly once (except those leaked on purpose).
fn run<S: Storage<Tracked, SpinLock>>(
    b: RawBatcher<Tracked, S>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    CREATED.with(|c| c.set(0));
    DROPPED.with(|c| c.set(0));
    let mut m = Model::new(b.batch_size(), b.buffers(), b.shards());
    prop_assert_eq!(b.capacity(), m.batch * m.buffers);
    let mut held: Vec<Guard<'_, S>> = Vec::new();
    for op in ops {
        match *op {
            Op::TryAdd { shard } => {
                let id = m.create();
                let result = b.producer(shard).try_add(Tracked::new(id));
                let s = m.shard(shard);
                match (result, m.push(s, id)) {
                    (Ok(done), Some((opened, sealed))) => {
                        prop_assert_eq!(
                            (done.items, done.opened, done.sealed),
                            (1, opened, sealed)
                        );
                    }
                    (Err(Full(back)), None) => {
                        prop_assert_eq!(back.0, id, "the refused item comes back");
                        m.stats.refused += 1;
                        drop(back);
                        m.dropped += 1;
                    }
                    (result, expected) => prop_assert!(
                        false,
                        "try_add: got {:?}, model {:?}",
                        result.map(|d| d.items),
                        expected
                    ),
                }
            }
            Op::Add { shard } => {
                let s = m.shard(shard);
                if !m.closed && !m.has_room(s) {
                    continue; // add would wait forever: nobody else takes batches
                }
                let id = m.create();
                let result = b.producer(shard).add(Tracked::new(id));
                match (result, m.push(s, id)) {
                    (Ok(done), Some((opened, sealed))) => {
                        prop_assert_eq!(
                            (done.items, done.opened, done.sealed),
                            (1, opened, sealed)
                        );
                    }
                    (Err(closed), None) => {
                        prop_assert!(m.closed);
                        prop_assert_eq!(closed.into_inner().0, id);
                        m.dropped += 1; // not counted as refused
                    }
                    (result, _) => prop_assert!(false, "add: got {:?}", result.map(|d| d.items)),
                }
            }
            Op::TryAddMany { shard, n } => {
                let items: Vec<Tracked> = (0..n).map(|_| Tracked::new(m.create())).collect();
                let accepted = b.producer(shard).try_add_many(&items);
                let s = m.shard(shard);
                let mut expected = 0;
                for item in &items {
                    if m.push(s, item.0).is_none() {
                        break;
                    }
                    expected += 1;
                }
                prop_assert_eq!(accepted, expected);
                // Only the accepted items are cloned (none for the refusal).
                m.created += accepted;
                if accepted < n {
                    m.stats.refused += 1;
                }
                drop(items);
                m.dropped += n;
            }
            Op::TryExtend { shard, n } => {
                let items: Vec<Tracked> = (0..n).map(|_| Tracked::new(m.create())).collect();
                let first = m.next_id - n as u32;
                let mut iter = items.into_iter();
                let (done, back) = b.producer(shard).try_extend(&mut iter);
                let s = m.shard(shard);
                let mut expected = 0;
                for id in first..first + n as u32 {
                    if m.push(s, id).is_none() {
                        break;
                    }
                    expected += 1;
                }
                prop_assert_eq!(done.items, expected);
                if expected < n {
                    m.stats.refused += 1;
                    prop_assert_eq!(back.as_ref().map(|t| t.0), Some(first + expected as u32));
                    prop_assert_eq!(
                        iter.len(),
                        n - expected - 1,
                        "the rest stays in the iterator"
                    );
                } else {
                    prop_assert!(back.is_none());
                }
                drop((back, iter));
                m.dropped += n - expected;
            }
            Op::Flush => prop_assert_eq!(b.flush(), m.flush(), "flush"),
            Op::Tick => prop_assert_eq!(b.tick(), m.tick(), "tick"),
            Op::Close => {
                b.close();
                m.closed = true;
                m.flush();
            }
            Op::Take(how) => match (b.try_take(), m.take()) {
                (None, None) => {}
                (Some(guard), Some(expected)) => {
                    consume_guard(guard, &expected, how)?;
                    m.consume(expected.len(), how);
                }
                (got, expected) => prop_assert!(
                    false,
                    "try_take: got {:?}, model {:?}",
                    got.map(|g| ids(&g)),
                    expected
                ),
            },
            Op::Hold => {
                if held.len() == 2 {
                    continue;
                }
                match (b.try_take(), m.take()) {
                    (None, None) => {}
                    (Some(guard), Some(expected)) => {
                        prop_assert_eq!(ids(&guard), &expected[..]);
                        held.push(guard);
                        m.held.push(expected);
                    }
                    (got, expected) => prop_assert!(
                        false,
                        "try_take: got {:?}, model {:?}",
                        got.map(|g| ids(&g)),
                        expected
                    ),
                }
            }
            Op::Release { which, how } => {
                if held.is_empty() {
                    continue;
                }
                let i = which % held.len();
                let guard = held.remove(i);
                let expected = m.held.remove(i);
                consume_guard(guard, &expected, how)?;
                m.consume(expected.len(), how);
            }
            Op::TakeNext { which, first } => {
                if held.is_empty() {
                    continue;
                }
                let i = which % held.len();
                let mut guard = held.remove(i);
                let expected = m.held.remove(i);
                consume_items(&mut guard, &expected, first)?;
                let next = guard.take_next();
                m.consume(expected.len(), first);
                match (next, m.take()) {
                    (None, None) => {}
                    (Some(guard), Some(expected)) => {
                        prop_assert_eq!(ids(&guard), &expected[..]);
                        held.insert(i, guard);
                        m.held.insert(i, expected);
                    }
                    (got, expected) => prop_assert!(
                        false,
                        "take_next: got {:?}, model {:?}",
                        got.map(|g| ids(&g)),
                        expected
                    ),
                }
            }
            Op::Reverse { which } => {
                if held.is_empty() {
                    continue;
                }
                let i = which % held.len();
                held[i].reverse();
                m.held[i].reverse();
                prop_assert_eq!(ids(&held[i]), &m.held[i][..]);
            }
        }
        check(&b, &m)?;
    }
    // The end: the held guards go first (they borrow the batcher), then the
    // batcher drops what is left in partial and sealed batches.
    for (guard, expected) in held.drain(..).zip(std::mem::take(&mut m.held)) {
        consume_guard(guard, &expected, Consume::DropGuard)?;
        m.dropped += expected.len();
    }
    drop(held);
    check(&b, &m)?;
    let left = m.len();
    drop(b);
    m.dropped += left;
    prop_assert_eq!(
        counts(),
        (m.created, m.dropped),
        "(created, dropped) after drop"
    );
    prop_assert_eq!(m.created - m.dropped, m.leaked_items);
    Ok(())
}

fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default(); // reads PROPTEST_CASES
    if cfg!(miri) {
        config.cases = config.cases.min(8);
        // Miri's isolation forbids the regression file's I/O.
        config.failure_persistence = None;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_one_shard(ops in ops()) {
        run(Batcher::<Tracked, 3, 3>::new(), &ops)?;
    }

    #[test]
    fn model_two_shards(ops in ops()) {
        run(ShardedBatcher::<Tracked, 3, 3, 2>::new(), &ops)?;
    }

    #[test]
    fn model_three_shards_many_buffers(ops in ops()) {
        run(ShardedBatcher::<Tracked, 2, 5, 3>::new(), &ops)?;
    }

    #[test]
    fn model_batch_of_one(ops in ops()) {
        run(Batcher::<Tracked, 1, 2>::new(), &ops)?;
    }
}

#[cfg(feature = "alloc")]
mod heap {
    use super::*;
    use snail::HeapStorage;

    /// Sizes chosen at run time: batch 1..=4, buffers 1..=4, shards 1..=buffers.
    fn sizes() -> impl Strategy<Value = (usize, usize, usize)> {
        (1..=4usize, 1..=4usize)
            .prop_flat_map(|(batch, buffers)| (Just(batch), Just(buffers), 1..=buffers))
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn model_heap_storage((batch, buffers, shards) in sizes(), ops in ops()) {
            let storage = HeapStorage::<Tracked, SpinLock>::new(batch, buffers, shards).unwrap();
            run(RawBatcher::with_storage(storage), &ops)?;
        }

        /// Fills that cross prefetch runs: on x86_64 and aarch64 a fill
        /// goes in runs of 512 bytes (128 `Tracked`), prefetching ahead of
        /// each run's lines first, so batches of 100 to 300 items, filled
        /// up to 399 at a time, split fills within a buffer and across
        /// buffers.
        #[test]
        fn model_fills_across_prefetch_runs(
            batch in 100..=300usize,
            buffers in 1..=3usize,
            ops in ops_adding_many(),
        ) {
            let storage = HeapStorage::<Tracked, SpinLock>::new(batch, buffers, 1).unwrap();
            run(RawBatcher::with_storage(storage), &ops)?;
        }
    }
}
