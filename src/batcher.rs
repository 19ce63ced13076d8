//! The batching algorithm.
//!
//! # How it works
//!
//! A batcher owns `BUFFERS` buffers of `BATCH` slots. Each buffer is, at any
//! moment, in exactly one place:
//!
//! 1. **free**: on the free list (or never used yet);
//! 2. **filling**: the current buffer of one producer shard;
//! 3. **sealed**: in the FIFO queue of batches waiting for the consumer;
//! 4. **taken**: inside a [`Batch`] guard held by the consumer.
//!
//! A producer locks its shard and writes into the shard's current buffer;
//! only when it needs a new buffer (the first item of a batch) or seals a
//! full one does it take the queue lock. The consumer takes the queue lock to
//! pop the oldest sealed batch and again to return the buffer to the free
//! list when the guard drops. So the queue lock is taken twice per batch, not
//! once per item, and producers on different shards share no cache line on
//! their fast path. Lock order is always shard, then queue.
//!
//! A producer claims a free buffer (one compare-exchange on a counter)
//! before it takes the queue lock to pop one. When every buffer is in use
//! and many producers wait, each freed buffer lets one of them through: the
//! others fail the claim without queueing on the lock that the consumer
//! needs for its next batch.
//!
//! Buffers are never allocated or freed after construction; items are moved
//! in on `add` and moved out (or dropped) exactly once by the guard, or by the
//! batcher's own `Drop`.

use core::marker::PhantomData;

use crate::batch::Batch;
use crate::error::{Closed, Full};
use crate::lock::{RawLock, SpinLock};
use crate::pad::CachePadded;
use crate::relax::{Relax, Spin};
use crate::stats::{Reason, Stats};
use crate::storage::{ArrayStorage, ShardInner, ShardState, Storage, NONE};
use crate::sync::{maybe_const_fn, AtomicBool, AtomicUsize, Ordering, UnsafeCell};

/// A batcher with `BUFFERS` buffers of `BATCH` items stored inline and one
/// producer shard: the type for statics and firmware.
///
/// `L` is the lock ([`SpinLock`] by default, [`CsLock`](crate::CsLock) for
/// interrupt handlers) and `R` the relax hook [`add`](RawBatcher::add) waits
/// with. See [`RawBatcher`] for the methods.
pub type Batcher<T, const BATCH: usize, const BUFFERS: usize, L = SpinLock, R = Spin> =
    RawBatcher<T, ArrayStorage<T, BATCH, BUFFERS, L, 1>, L, R>;

/// A batcher with `SHARDS` producer shards, each filling its own buffer, so
/// that producers on different cores do not contend for one lock.
///
/// Producers pick a shard with [`RawBatcher::producer`]; one producer keeps
/// its order as long as it keeps to one shard. A partial batch holds a buffer
/// per shard, so `BUFFERS` should exceed `SHARDS`.
pub type ShardedBatcher<
    T,
    const BATCH: usize,
    const BUFFERS: usize,
    const SHARDS: usize,
    L = SpinLock,
    R = Spin,
> = RawBatcher<T, ArrayStorage<T, BATCH, BUFFERS, L, SHARDS>, L, R>;

/// A batcher for a single-core MCU whose interrupt handlers add items:
/// critical-section lock, busy-loop wait.
#[cfg(feature = "critical-section")]
pub type CsBatcher<T, const BATCH: usize, const BUFFERS: usize> =
    Batcher<T, BATCH, BUFFERS, crate::CsLock, crate::relax::Loop>;

/// One fill of a shard's open buffer: the write position stays in a
/// register while a loop writes items, and is stored back, with the shard's
/// count of added items, on drop, also if the loop's `next` or `make`
/// panics, so that both cover every item written. If `make` panicked on the
/// first item of an empty buffer, the buffer goes back to the free list:
/// a shard never keeps an open buffer without items (`close` relies on
/// that, and so does [`Added::opened`]).
struct Fill<'a, T, S: Storage<T, L>, L: RawLock, R: Relax> {
    batcher: &'a RawBatcher<T, S, L, R>,
    st: &'a mut ShardState,
    added: &'a AtomicUsize,
    start: usize,
    now: usize,
}

impl<T, S: Storage<T, L>, L: RawLock, R: Relax> Drop for Fill<'_, T, S, L, R> {
    #[inline(always)]
    fn drop(&mut self) {
        self.st.next = self.now;
        // Only written under the shard lock: a plain store suffices.
        let total = self.added.load(Ordering::Relaxed);
        self.added
            .store(total.wrapping_add(self.now - self.start), Ordering::Relaxed);
        // Nothing written: `make` panicked on the fill's first item.
        if self.now == self.start && self.st.len(self.batcher.storage.batch()) == 0 {
            self.batcher.unopen(self.st);
        }
    }
}

/// What an accepted `add` did, for code that schedules a consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Added {
    /// Items accepted by this call.
    pub items: usize,
    /// This call started at least one new batch (its first item went into an
    /// empty buffer). A linger timer starts here.
    pub opened: bool,
    /// This call sealed at least one full batch: there is work for the consumer.
    pub sealed: bool,
}

/// `shards[shard % shards.len()]`, out of line: callers usually pass an
/// index in range.
#[cold]
#[inline(never)]
fn wrap<T>(shards: &[T], shard: usize) -> &T {
    &shards[shard % shards.len()]
}

/// [`RawBatcher::push_one`]'s result bits.
const OPENED: u8 = 1;
const SEALED: u8 = 2;

/// The queue lock's data.
#[derive(Debug)]
struct Queue {
    /// Head of the free list, linked through `BufferMeta::next`.
    free_head: usize,
    /// Buffers `fresh..` have never been used (they are free too).
    fresh: usize,
    /// Oldest and newest sealed batch, linked through `BufferMeta::next`.
    sealed_head: usize,
    sealed_tail: usize,
    /// Items in sealed batches.
    sealed_items: usize,
    sealed_full: usize,
    sealed_flush: usize,
    sealed_tick: usize,
    taken: usize,
}

/// State shared by every producer and the consumer, touched once per batch.
struct Hub<L> {
    lock: L,
    queue: UnsafeCell<Queue>,
    /// Free buffers (on the free list or never used) that no producer has
    /// claimed yet. A producer decrements it before it takes the queue lock
    /// to pop a buffer; the consumer increments it, with the queue lock
    /// held, after pushing one. So it never exceeds the buffers in the free
    /// list, and a claim always finds its buffer there.
    free: AtomicUsize,
    /// Copy of `Queue::sealed_items`, so a consumer can poll for work
    /// without taking the lock. Written and read `SeqCst`: a consumer that
    /// announces it will sleep and then reads 0 here is sure to be seen by
    /// the producer sealing the next batch.
    sealed_hint: AtomicUsize,
    closed: AtomicBool,
    refused: AtomicUsize,
}

/// The batcher, generic over where its buffers live.
///
/// Use it through [`Batcher`] (inline, `const`), [`ShardedBatcher`], or the
/// std shim (`snail-std`), which builds it on [`HeapStorage`](crate::HeapStorage).
///
/// Guarantees:
/// - Items come out exactly once: moved out by [`Batch::drain`], or dropped by
///   the [`Batch`] guard, or by the batcher's own `Drop`.
/// - Batches come out in the order they were sealed; a batch sealed because
///   it was full holds exactly the batch size.
/// - Items added through one shard come out in the order they were added.
/// - Producers wait (spin with `R`) when every buffer is in use; the batcher
///   is not lock-free: a producer preempted inside its shard's lock delays the
///   others on that shard.
pub struct RawBatcher<T, S: Storage<T, L>, L = SpinLock, R = Spin> {
    hub: CachePadded<Hub<L>>,
    storage: S,
    _marker: PhantomData<(T, fn() -> R)>,
}

// SAFETY: the batcher hands items from one thread to another (so `T: Send`),
// but never gives two threads access to the same item: slots are reached only
// by the holder of their shard lock, or by the single owner of a taken batch.
// The locks must be shareable (`L: Sync`).
unsafe impl<T: Send, S: Storage<T, L> + Send, L: Sync, R> Sync for RawBatcher<T, S, L, R> {}

impl<T, const BATCH: usize, const BUFFERS: usize, L: RawLock, R, const SHARDS: usize>
    RawBatcher<T, ArrayStorage<T, BATCH, BUFFERS, L, SHARDS>, L, R>
{
    maybe_const_fn! {
        /// Returns an empty batcher. `const`, so it can initialise a `static`.
        ///
        /// Sizes are checked at compile time: `BATCH`, `BUFFERS` and `SHARDS`
        /// must be at least 1 and `SHARDS <= BUFFERS`.
        ///
        /// ```compile_fail
        /// static BAD: snail::Batcher<u8, 0, 2> = snail::Batcher::new();
        /// ```
        pub fn new() -> Self {
            Self {
                hub: CachePadded::new(Hub::new(BUFFERS)),
                storage: ArrayStorage::new(),
                _marker: PhantomData,
            }
        }
    }
}

impl<T, const BATCH: usize, const BUFFERS: usize, L: RawLock, R, const SHARDS: usize> Default
    for RawBatcher<T, ArrayStorage<T, BATCH, BUFFERS, L, SHARDS>, L, R>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<L: RawLock> Hub<L> {
    maybe_const_fn! {
        fn new(buffers: usize) -> Self {
            Self {
                #[cfg(not(snail_loom))]
                lock: L::INIT,
                #[cfg(snail_loom)]
                lock: L::new(),
                queue: UnsafeCell::new(Queue {
                    free_head: NONE,
                    fresh: 0,
                    sealed_head: NONE,
                    sealed_tail: NONE,
                    sealed_items: 0,
                    sealed_full: 0,
                    sealed_flush: 0,
                    sealed_tick: 0,
                    taken: 0,
                }),
                free: AtomicUsize::new(buffers),
                sealed_hint: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                refused: AtomicUsize::new(0),
            }
        }
    }

    /// Runs `f` on the queue with the queue lock held.
    #[inline(always)]
    fn with_queue<X>(&self, f: impl FnOnce(&mut Queue) -> X) -> X {
        self.lock.lock(|| {
            // SAFETY: the queue lock is held, so this is the only reference.
            self.queue.with_mut(|q| f(unsafe { &mut *q }))
        })
    }
}

/// Runs `f` on a shard's state with the shard lock held.
#[inline(always)]
fn with_shard<L: RawLock, X>(shard: &ShardInner<L>, f: impl FnOnce(&mut ShardState) -> X) -> X {
    shard.lock.lock(|| {
        // SAFETY: the shard lock is held, so this is the only reference.
        shard.state.with_mut(|st| f(unsafe { &mut *st }))
    })
}

impl<T, S: Storage<T, L>, L: RawLock, R: Relax> RawBatcher<T, S, L, R> {
    /// Returns an empty batcher over `storage` (for run-time sized
    /// [`HeapStorage`](crate::HeapStorage); inline storage uses `new`).
    pub fn with_storage(storage: S) -> Self {
        Self {
            hub: CachePadded::new(Hub::new(storage.metas().len())),
            storage,
            _marker: PhantomData,
        }
    }

    /// Items per batch.
    #[inline]
    pub fn batch_size(&self) -> usize {
        self.storage.batch()
    }

    /// Number of buffers.
    #[inline]
    pub fn buffers(&self) -> usize {
        self.storage.metas().len()
    }

    /// Number of producer shards.
    #[inline]
    pub fn shards(&self) -> usize {
        self.storage.shards().len()
    }

    /// Most items the batcher ever holds: batch size × buffers.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.batch_size() * self.buffers()
    }

    /// A handle that adds through shard `shard % self.shards()`.
    ///
    /// Items added through one shard keep their order. Producers on
    /// different cores should use different shards.
    #[inline]
    pub fn producer(&self, shard: usize) -> Producer<'_, T, S, L, R> {
        let shards = self.storage.shards();
        // Callers usually pass an index already in range: skip the division.
        let shard = match shards.get(shard) {
            Some(s) => s,
            None => wrap(shards, shard),
        };
        Producer {
            batcher: self,
            shard,
        }
    }

    /// Adds `item` through shard 0 if a buffer has room, without waiting.
    ///
    /// Never waits for a buffer; it only takes short locks (shard 0's, and
    /// the queue's when it opens or seals a buffer).
    ///
    /// # Errors
    ///
    /// [`Full`] with the item when every buffer is in use, or when the
    /// batcher is closed (a closed batcher is permanently full).
    #[inline]
    pub fn try_add(&self, item: T) -> Result<(), Full<T>> {
        self.producer(0).try_add(item).map(drop)
    }

    /// Adds `item` through shard 0, waiting with the relax hook `R` while
    /// every buffer is in use.
    ///
    /// It waits until the consumer returns a buffer; if nothing ever takes
    /// batches (or flushes the partial one a waiting buffer is stuck in),
    /// it waits forever.
    ///
    /// # Errors
    ///
    /// [`Closed`] with the item if the batcher is (or becomes) closed.
    #[inline]
    pub fn add(&self, item: T) -> Result<(), Closed<T>> {
        self.producer(0).add(item).map(drop)
    }

    /// Adds clones of a prefix of `items` through shard 0, as many as fit
    /// without waiting, and returns how many.
    pub fn try_add_many(&self, items: &[T]) -> usize
    where
        T: Clone,
    {
        self.producer(0).try_add_many(items)
    }

    /// Seals every non-empty partial batch now. Returns `true` if it sealed
    /// one.
    pub fn flush(&self) -> bool {
        let mut sealed = false;
        for shard in 0..self.shards() {
            sealed |= self.producer(shard).flush();
        }
        sealed
    }

    /// Call periodically: seals each partial batch that was already non-empty
    /// at the previous tick, so no item waits longer than two tick periods
    /// for its batch to be sealed. Returns `true` if it sealed one.
    pub fn tick(&self) -> bool {
        let mut sealed = false;
        let batch = self.storage.batch();
        for shard in self.storage.shards() {
            sealed |= with_shard(shard, |st| {
                if st.len(batch) == 0 {
                    false
                } else if st.ticked {
                    self.seal(st, Reason::Tick);
                    true
                } else {
                    st.ticked = true;
                    false
                }
            });
        }
        sealed
    }

    /// Closes the batcher: seals the partial batches and refuses every item
    /// from now on. Sealed batches can still be taken.
    pub fn close(&self) {
        // Relaxed is enough: every shard lock is taken below after this
        // store, and a producer reads the flag under its shard lock.
        self.hub.closed.store(true, Ordering::Relaxed);
        self.flush();
    }

    /// `true` once [`close`](Self::close) was called.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.hub.closed.load(Ordering::Acquire)
    }

    /// Takes the oldest sealed batch, if any. Dropping the guard drops the
    /// items left in it and hands the buffer back to producers;
    /// [`Batch::take_next`] does that and takes the next batch in one step.
    pub fn try_take(&self) -> Option<Batch<'_, T, S, L, R>> {
        let (buffer, len) = self.hub.with_queue(|q| self.pop_sealed(q))?;
        Some(Batch::new(self, buffer, len))
    }

    /// Hands taken buffer `b` back and takes the oldest sealed batch, under
    /// one hold of the queue lock; for [`Batch::take_next`].
    pub(crate) fn recycle_and_take(&self, b: usize) -> Option<Batch<'_, T, S, L, R>> {
        let (buffer, len) = self.hub.with_queue(|q| {
            self.push_free(q, b);
            self.pop_sealed(q)
        })?;
        Some(Batch::new(self, buffer, len))
    }

    /// Unlinks the oldest sealed batch: its buffer and length. Called with
    /// the queue lock held (`q`).
    #[inline(always)]
    fn pop_sealed(&self, q: &mut Queue) -> Option<(usize, usize)> {
        let metas = self.storage.metas();
        let b = q.sealed_head;
        if b == NONE {
            return None;
        }
        // SAFETY: the queue lock is held; sealed buffers' metadata is only
        // touched under it.
        let (next, len) = unsafe { (metas[b].next.with(|p| *p), metas[b].len.with(|p| *p)) };
        q.sealed_head = next;
        if next == NONE {
            q.sealed_tail = NONE;
        }
        q.sealed_items -= len;
        self.hub.sealed_hint.store(q.sealed_items, Ordering::SeqCst);
        q.taken = q.taken.wrapping_add(1);
        Some((b, len))
    }

    /// `true` if a buffer is free at this moment: a hint for a producer
    /// that waits for room (another producer may take the buffer first).
    /// One relaxed load; no lock.
    pub fn has_free(&self) -> bool {
        self.hub.free.load(Ordering::Relaxed) > 0
    }

    /// `true` if a sealed batch is waiting to be taken.
    ///
    /// Lock-free (one `SeqCst` load), so a consumer can poll it. A `true`
    /// may be taken by another consumer first; a `false` read after a
    /// `SeqCst` store of the consumer's own "about to sleep" flag is not
    /// missed by a producer that seals afterwards and then reads that flag.
    pub fn has_sealed(&self) -> bool {
        self.hub.sealed_hint.load(Ordering::SeqCst) > 0
    }

    /// Items accepted and not yet taken (in partial and sealed batches).
    /// Exact when nothing runs concurrently, a moment's estimate otherwise,
    /// never above [`capacity`](Self::capacity).
    pub fn len(&self) -> usize {
        // Sealed first: items only move from shards to the queue, so none is
        // counted twice. A batch taken and its buffer refilled while we read
        // could still be counted in both; the clamp keeps that within bounds.
        let sealed = self.hub.with_queue(|q| q.sealed_items);
        let partial: usize = self
            .storage
            .shards()
            .iter()
            .map(|s| with_shard(s, |st| st.len(self.storage.batch())))
            .sum();
        (sealed + partial).min(self.capacity())
    }

    /// `true` if [`len`](Self::len) is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let added = self.storage.shards().iter().fold(0usize, |sum, s| {
            sum.wrapping_add(s.added.load(Ordering::Relaxed))
        });
        let refused = self.hub.refused.load(Ordering::Relaxed);
        self.hub.with_queue(|q| Stats {
            added,
            refused,
            sealed_full: q.sealed_full,
            sealed_flush: q.sealed_flush,
            sealed_tick: q.sealed_tick,
            taken: q.taken,
        })
    }

    /// The slots of buffer `b`.
    #[inline(always)]
    pub(crate) fn buffer_slots(&self, b: usize) -> &[crate::storage::Slot<T>] {
        let batch = self.storage.batch();
        &self.storage.slots()[b * batch..(b + 1) * batch]
    }

    /// Takes a free buffer for a shard, or `None` if there is none or the
    /// batcher is closed. Called with the shard lock held.
    #[inline]
    fn open(&self) -> Option<usize> {
        let hub = &*self.hub;
        if hub.closed.load(Ordering::Relaxed) {
            return None;
        }
        // Claim first: producers that find no buffer leave without touching
        // the queue lock. Acquire pairs with the consumer's Release
        // increment (the queue lock orders the list itself).
        hub.free
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()?;
        let metas = self.storage.metas();
        let b = hub.with_queue(|q| {
            if q.free_head != NONE {
                let b = q.free_head;
                // SAFETY: the queue lock is held; free buffers' metadata is
                // only touched under it.
                q.free_head = unsafe { metas[b].next.with(|p| *p) };
                Some(b)
            } else if q.fresh < metas.len() {
                q.fresh += 1;
                Some(q.fresh - 1)
            } else {
                None
            }
        });
        // A claim always finds a buffer (see `Hub::free`); were it ever not
        // so, the claim goes back and the producer sees no room.
        debug_assert!(b.is_some(), "a claimed buffer was missing");
        if b.is_none() {
            hub.free.fetch_add(1, Ordering::Release);
        }
        b
    }

    /// Gives a shard without a buffer a free one; `false` if there is none
    /// (or the batcher is closed). Called with the shard lock held.
    #[inline(always)]
    fn open_for(&self, st: &mut ShardState) -> bool {
        debug_assert!(st.current == NONE && !st.has_room());
        match self.open() {
            Some(b) => {
                let batch = self.storage.batch();
                st.current = b;
                st.next = b * batch;
                st.end = st.next + batch;
                st.ticked = false;
                crate::prefetch::opening(self.buffer_base(b), self.buffer_bytes());
                true
            }
            None => false,
        }
    }

    /// Where buffer `b`'s slots start, for prefetching only.
    #[inline(always)]
    fn buffer_base(&self, b: usize) -> *const u8 {
        let batch = self.storage.batch();
        self.storage.slots().as_ptr().wrapping_add(b * batch).cast()
    }

    /// Bytes in one buffer's slots.
    #[inline(always)]
    fn buffer_bytes(&self) -> usize {
        self.storage.batch() * core::mem::size_of::<T>()
    }

    /// As slot `index` (among all slots) is written into a buffer that ends
    /// before slot `end`: if that slot starts a cache line, prefetches the
    /// line [`AHEAD`](crate::prefetch::AHEAD) lines on, if it is still in
    /// the buffer.
    #[inline(always)]
    fn prefetch_ahead(&self, index: usize, end: usize) {
        let size = core::mem::size_of::<T>();
        let slots = self.storage.slots().as_ptr().cast();
        crate::prefetch::ahead_of(slots, index * size, size, end * size);
    }

    /// Moves a shard's current buffer to the tail of the sealed queue.
    /// Called with the shard lock held, and items in that buffer. Cold: once
    /// per batch, and kept out of the add path's straight line.
    #[cold]
    fn seal(&self, st: &mut ShardState, reason: Reason) {
        let (b, len) = (st.current, st.len(self.storage.batch()));
        debug_assert!(len > 0 && b != NONE);
        let metas = self.storage.metas();
        self.hub.with_queue(|q| {
            // SAFETY: the queue lock is held; `b` is this
            // shard's buffer and `sealed_tail` a sealed one, whose metadata is
            // only touched under the queue lock.
            unsafe {
                metas[b].len.with_mut(|p| *p = len);
                metas[b].next.with_mut(|p| *p = NONE);
            }
            if q.sealed_tail == NONE {
                q.sealed_head = b;
            } else {
                // SAFETY: as above.
                unsafe { metas[q.sealed_tail].next.with_mut(|p| *p = b) };
            }
            q.sealed_tail = b;
            q.sealed_items += len;
            self.hub.sealed_hint.store(q.sealed_items, Ordering::SeqCst);
            let counter = match reason {
                Reason::Full => &mut q.sealed_full,
                Reason::Flush => &mut q.sealed_flush,
                Reason::Tick => &mut q.sealed_tick,
            };
            *counter = counter.wrapping_add(1);
        });
        *st = ShardState::new();
    }

    /// Returns a shard's open buffer, still empty, to the free list: the
    /// `make` of its first item panicked (see [`Fill`]). Called with the
    /// shard lock held.
    #[cold]
    #[inline(never)]
    fn unopen(&self, st: &mut ShardState) {
        let b = st.current;
        debug_assert!(b != NONE && st.len(self.storage.batch()) == 0);
        *st = ShardState::new();
        self.recycle(b);
    }

    /// Returns a taken buffer to the free list.
    pub(crate) fn recycle(&self, b: usize) {
        self.hub.with_queue(|q| self.push_free(q, b));
    }

    /// Links taken buffer `b` into the free list. Called with the queue
    /// lock held (`q`).
    #[inline(always)]
    fn push_free(&self, q: &mut Queue, b: usize) {
        let metas = self.storage.metas();
        // SAFETY: the queue lock is held and `b` was taken, so nobody else
        // touches its metadata.
        unsafe { metas[b].next.with_mut(|p| *p = q.free_head) };
        q.free_head = b;
        // Inside the lock: a producer that claims this buffer takes the lock
        // after this section, so it finds the buffer on the list.
        self.hub.free.fetch_add(1, Ordering::Release);
    }

    /// Writes items pulled from `next` into the shard, opening and sealing
    /// buffers as needed, until `next` returns `None` or no buffer is free.
    /// `next` yields a pending item `P` that `make` turns into the item as
    /// it is written (a slice's `&T` is cloned only once it has a slot).
    /// Returns what was done and the pending item that found no room, if
    /// any.
    #[inline(always)]
    fn push_in<P>(
        &self,
        shard: &ShardInner<L>,
        mut next: impl FnMut() -> Option<P>,
        make: impl Fn(P) -> T,
    ) -> (Added, Option<P>) {
        let slots = self.storage.slots();
        with_shard(shard, |st| {
            let mut done = Added::default();
            while let Some(mut pending) = next() {
                if !st.has_room() {
                    if !self.open_for(st) {
                        return (done, Some(pending));
                    }
                    done.opened = true;
                }
                // Fill the open buffer without looking for a buffer again,
                // its write position in a register.
                let end = st.end;
                let full = {
                    let mut fill = Fill {
                        batcher: self,
                        start: st.next,
                        now: st.next,
                        st: &mut *st,
                        added: &shard.added,
                    };
                    // By runs of several lines, each prefetching ahead of
                    // all its lines first: the loop inside has no line
                    // test, and the compiler can unroll it.
                    let full = 'fill: loop {
                        let size = core::mem::size_of::<T>();
                        let stop = end.min(crate::prefetch::run_end(fill.now, size));
                        crate::prefetch::ahead_of_run(
                            slots.as_ptr().cast(),
                            fill.now * size,
                            stop * size,
                            end * size,
                        );
                        loop {
                            debug_assert!(fill.now < end && end <= slots.len());
                            self.track_slots(fill.now, 1, true);
                            // SAFETY: `now < end`, and an open buffer ends at
                            // `end = (current + 1) * batch <= slots.len()`
                            // (`current < buffers`).
                            let slot = unsafe { slots.get_unchecked(fill.now) };
                            // A panicking `make` (a clone) leaves the slot
                            // empty and uncounted; if it was a new buffer's
                            // first item, `Fill` gives the buffer back.
                            let item = make(pending);
                            // SAFETY: the slot belongs to this shard's open
                            // buffer and lies past its filled part: only the
                            // holder of this shard's lock touches it, and it
                            // holds no item to overwrite.
                            unsafe { slot.get().write(item) };
                            fill.now += 1;
                            if fill.now == stop {
                                break;
                            }
                            match next() {
                                Some(more) => pending = more,
                                None => break 'fill false,
                            }
                        }
                        if fill.now == end {
                            break true;
                        }
                        match next() {
                            Some(more) => pending = more,
                            None => break false,
                        }
                    };
                    done.items += fill.now - fill.start;
                    full
                };
                if !full {
                    break;
                }
                self.seal(st, Reason::Full);
                done.sealed = true;
            }
            (done, None)
        })
    }

    /// Writes one item into the shard: [`push_in`](Self::push_in) for one
    /// item, with the common case (room in the open buffer) inline and
    /// opening a buffer out of line. Returns whether it opened and sealed a
    /// buffer, as `(opened, sealed)` bits of one byte, which a caller keeps
    /// in a register with the item.
    #[inline(always)]
    fn push_one(&self, shard: &ShardInner<L>, item: T) -> Result<u8, T> {
        with_shard(shard, |st| {
            let opened = if st.has_room() {
                0
            } else if self.open_cold(st) {
                OPENED
            } else {
                return Err(item);
            };
            let sealed = self.write_one(shard, st, item);
            Ok(opened | if sealed { SEALED } else { 0 })
        })
    }

    /// [`open_for`](Self::open_for) out of line, for
    /// [`push_one`](Self::push_one): a shard opens a buffer once per batch,
    /// and a call that returns only a flag keeps the item out of memory.
    #[cold]
    #[inline(never)]
    fn open_cold(&self, st: &mut ShardState) -> bool {
        self.open_for(st)
    }

    /// Writes `item` at the shard's position (the shard has room), and
    /// seals the buffer if that filled it; returns whether it did.
    #[inline(always)]
    fn write_one(&self, shard: &ShardInner<L>, st: &mut ShardState, item: T) -> bool {
        let slots = self.storage.slots();
        let index = st.next;
        debug_assert!(index < st.end && st.end <= slots.len());
        self.track_slots(index, 1, true);
        // SAFETY: `next < end` (the shard has room), and an open buffer ends
        // at `end = (current + 1) * batch <= slots.len()` (`current <
        // buffers`). The slot belongs to this shard's open buffer and lies
        // past its filled part: only the holder of this shard's lock touches
        // it, and it holds no item to overwrite.
        unsafe { slots.get_unchecked(index).get().write(item) };
        self.prefetch_ahead(index, st.end);
        st.next = index + 1;
        // Only written under the shard lock: a plain store suffices.
        let added = shard.added.load(Ordering::Relaxed).wrapping_add(1);
        shard.added.store(added, Ordering::Relaxed);
        if st.next == st.end {
            self.seal(st, Reason::Full);
            return true;
        }
        false
    }

    fn count_refusal(&self) {
        self.hub.refused.fetch_add(1, Ordering::Relaxed);
    }
}

impl<T, S: Storage<T, L>, L, R> RawBatcher<T, S, L, R> {
    /// Under `--cfg snail_loom`, tells loom that slots `start..start + len`
    /// (indices into all slots) are read now, or written when `write`, so
    /// that it checks them like its own cells; otherwise does nothing.
    #[inline(always)]
    pub(crate) fn track_slots(&self, start: usize, len: usize, write: bool) {
        #[cfg(snail_loom)]
        for shadow in &self.storage.shadows()[start..start + len] {
            if write {
                shadow.with_mut(|_| ());
            } else {
                shadow.with(|_| ());
            }
        }
        #[cfg(not(snail_loom))]
        let _ = (start, len, write);
    }
}

impl<T, S: Storage<T, L>, L, R> RawBatcher<T, S, L, R> {
    /// Drops the items of partial batches, then of sealed ones; taken
    /// buffers were emptied by their guards. Each batch is detached before
    /// its items drop, so that if an item's `Drop` panics, a guard drops the
    /// batches left (as `Vec` does, a second panic aborts).
    ///
    /// # Safety
    ///
    /// Called only by `Drop`: no guard, producer or lock holder is left.
    unsafe fn drop_items(&self) {
        /// Drops what is left if an item's drop unwinds.
        struct Rest<'a, T, S: Storage<T, L>, L, R>(&'a RawBatcher<T, S, L, R>);
        impl<T, S: Storage<T, L>, L, R> Drop for Rest<'_, T, S, L, R> {
            fn drop(&mut self) {
                // SAFETY: as for the call this guard belongs to.
                unsafe { self.0.drop_items() }
            }
        }
        let rest = Rest(self);
        let batch = self.storage.batch();
        let slots = self.storage.slots();
        let metas = self.storage.metas();
        for shard in self.storage.shards() {
            // SAFETY: exclusive access (see above).
            let st = shard
                .state
                .with_mut(|st| unsafe { core::mem::replace(&mut *st, ShardState::new()) });
            if st.current != NONE {
                let start = st.current * batch;
                self.track_slots(start, st.next - start, true);
                // SAFETY: the slots of a shard's buffer before `next` hold
                // items, and the shard no longer points at them.
                unsafe { crate::storage::drop_slots(&slots[start..st.next]) };
            }
        }
        loop {
            // SAFETY: exclusive access.
            let b = self.hub.queue.with_mut(|q| unsafe {
                let b = (*q).sealed_head;
                if b != NONE {
                    (*q).sealed_head = metas[b].next.with(|p| *p);
                }
                b
            });
            if b == NONE {
                break;
            }
            // SAFETY: exclusive access; `b` was a sealed buffer whose first
            // `len` slots hold items, now off the queue: dropped once here.
            unsafe {
                let len = metas[b].len.with(|p| *p);
                self.track_slots(b * batch, len, true);
                crate::storage::drop_slots(&slots[b * batch..b * batch + len]);
            }
        }
        core::mem::forget(rest);
    }
}

impl<T, S: Storage<T, L>, L, R> Drop for RawBatcher<T, S, L, R> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no guard, producer or lock holder is left.
        unsafe { self.drop_items() }
    }
}

impl<T, S, L, R> core::fmt::Debug for RawBatcher<T, S, L, R>
where
    S: Storage<T, L>,
    L: RawLock,
    R: Relax,
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RawBatcher")
            .field("batch_size", &self.batch_size())
            .field("buffers", &self.buffers())
            .field("shards", &self.shards())
            .field("closed", &self.is_closed())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Adds through one shard of a batcher: from [`RawBatcher::producer`].
///
/// Cheap to create and `Copy`; keep one per thread (or per core, or per
/// interrupt priority) so that its items stay in order and its shard stays
/// in its core's cache.
pub struct Producer<'a, T, S: Storage<T, L>, L = SpinLock, R = Spin> {
    batcher: &'a RawBatcher<T, S, L, R>,
    shard: &'a ShardInner<L>,
}

impl<T, S: Storage<T, L>, L, R> Clone for Producer<'_, T, S, L, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, S: Storage<T, L>, L, R> Copy for Producer<'_, T, S, L, R> {}

impl<T, S: Storage<T, L>, L, R> core::fmt::Debug for Producer<'_, T, S, L, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

impl<'a, T, S: Storage<T, L>, L: RawLock, R: Relax> Producer<'a, T, S, L, R> {
    /// The batcher this producer adds to.
    pub fn batcher(&self) -> &'a RawBatcher<T, S, L, R> {
        self.batcher
    }

    /// Adds `item` if a buffer has room, without waiting.
    ///
    /// # Errors
    ///
    /// [`Full`] with the item when every buffer is in use or the batcher is
    /// closed.
    #[inline]
    pub fn try_add(&self, item: T) -> Result<Added, Full<T>> {
        match self.push(item) {
            Ok(done) => Ok(done),
            Err(item) => {
                self.batcher.count_refusal();
                Err(Full(item))
            }
        }
    }

    /// Adds `item`, waiting with the relax hook while every buffer is in use.
    ///
    /// # Errors
    ///
    /// [`Closed`] with the item if the batcher is (or becomes) closed.
    #[inline]
    pub fn add(&self, item: T) -> Result<Added, Closed<T>> {
        self.add_with(item, || {
            crate::sync::relax::<R>();
            true
        })
        .map_err(|Full(item)| Closed(item))
    }

    /// Adds `item`, calling `wait` after each attempt that found every
    /// buffer in use; gives up when `wait` returns `false` or the batcher is
    /// closed. For callers with their own way of waiting (the std shim spins,
    /// then yields, then sleeps). Refusals here are not counted in
    /// [`Stats::refused`].
    ///
    /// # Errors
    ///
    /// [`Full`] with the item when `wait` gave up or the batcher is closed
    /// (check [`RawBatcher::is_closed`] to tell which).
    #[inline]
    pub fn add_with(&self, mut item: T, mut wait: impl FnMut() -> bool) -> Result<Added, Full<T>> {
        loop {
            match self.push(item) {
                Ok(done) => return Ok(done),
                Err(back) => item = back,
            }
            if self.batcher.is_closed() || !wait() {
                return Err(Full(item));
            }
        }
    }

    /// Adds clones of a prefix of `items`, as many as fit without waiting,
    /// under one lock acquisition; returns how many. Only the items added
    /// are cloned, each with the shard lock held: a `Clone` must not use
    /// this batcher.
    pub fn try_add_many(&self, items: &[T]) -> usize
    where
        T: Clone,
    {
        let mut iter = items.iter();
        let (done, refused) = self.batcher.push_in(self.shard, || iter.next(), T::clone);
        if refused.is_some() {
            self.batcher.count_refusal();
        }
        done.items
    }

    /// Moves items from `iter` into the batcher under one lock acquisition
    /// until it ends or no buffer has room. Returns what was done and the
    /// item that found no room (taken from `iter`, handed back).
    ///
    /// `iter` runs with the shard lock held: keep it cheap, and never add to
    /// the same batcher from inside it (with a spin lock that waits forever;
    /// a [`CsLock`](crate::CsLock) panics).
    #[inline]
    pub fn try_extend<I: Iterator<Item = T>>(&self, iter: &mut I) -> (Added, Option<T>) {
        let (done, refused) = self
            .batcher
            .push_in(self.shard, || iter.next(), |item| item);
        if refused.is_some() {
            self.batcher.count_refusal();
        }
        (done, refused)
    }

    /// Seals this shard's partial batch now, if it has one. Returns `true`
    /// if it sealed one.
    pub fn flush(&self) -> bool {
        let batch = self.batcher.storage.batch();
        with_shard(self.shard, |st| {
            let had = st.len(batch) > 0;
            if had {
                self.batcher.seal(st, Reason::Flush);
            }
            had
        })
    }

    #[inline(always)]
    fn push(&self, item: T) -> Result<Added, T> {
        self.batcher.push_one(self.shard, item).map(|bits| Added {
            items: 1,
            opened: bits & OPENED != 0,
            sealed: bits & SEALED != 0,
        })
    }
}

#[cfg(all(test, not(snail_loom)))]
mod tests {
    use super::*;
    use crate::storage::sealed::StorageImpl;

    /// Counters near `usize::MAX` (as after 2³² items on a 32-bit MCU) wrap
    /// instead of overflowing, and a difference of two snapshots taken with
    /// `wrapping_sub` stays exact across the wrap.
    #[test]
    fn counters_wrap_and_differences_stay_exact() {
        let b: ShardedBatcher<u32, 4, 6, 2> = ShardedBatcher::new();
        let near = usize::MAX; // the next count wraps
        for shard in b.storage.shards() {
            shard.added.store(near, Ordering::Relaxed);
        }
        b.hub.refused.store(near, Ordering::Relaxed);
        b.hub.with_queue(|q| {
            q.sealed_full = near;
            q.sealed_flush = near;
            q.sealed_tick = near;
            q.taken = near;
        });
        let before = b.stats();
        assert_eq!(before.added, near.wrapping_add(near));
        let take_all = || {
            let mut items = 0;
            while let Some(batch) = b.try_take() {
                items += batch.len();
            }
            items
        };

        // Per shard, 4 items seal a full batch and 2 more wait for a flush:
        // added one at a time to shard 0, in one call to shard 1.
        for i in 0..6 {
            b.producer(0).try_add(i).unwrap();
        }
        assert_eq!(b.producer(1).try_add_many(&[6; 6]), 6);
        assert!(b.flush());
        assert_eq!(take_all(), 12);
        // One item sealed by the second tick, then (in one call) 5 full
        // batches until the 6 buffers are in use and an item is refused.
        b.producer(0).try_add(7).unwrap();
        assert!(!b.tick());
        assert!(b.tick());
        assert_eq!(b.producer(1).try_add_many(&[5; 21]), 20);
        assert_eq!(take_all(), 21);

        let after = b.stats();
        assert!(after.added < before.added, "the sum of added did not wrap");
        assert!(after.taken < before.taken, "taken did not wrap");
        assert_eq!(after.added.wrapping_sub(before.added), 33);
        assert_eq!(after.refused.wrapping_sub(before.refused), 1);
        assert_eq!(after.sealed_full.wrapping_sub(before.sealed_full), 7);
        assert_eq!(after.sealed_flush.wrapping_sub(before.sealed_flush), 2);
        assert_eq!(after.sealed_tick.wrapping_sub(before.sealed_tick), 1);
        assert_eq!(after.sealed().wrapping_sub(before.sealed()), 10);
        assert_eq!(after.taken.wrapping_sub(before.taken), 10);
    }
}
