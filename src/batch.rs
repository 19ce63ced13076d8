//! The consumer's view of one sealed batch.

use core::iter::FusedIterator;
use core::marker::PhantomData;

use crate::batcher::RawBatcher;
use crate::lock::RawLock;
use crate::relax::Relax;
use crate::storage::{drop_slots, Slot, Storage};

/// A sealed batch taken by [`RawBatcher::try_take`] or
/// [`Batch::take_next`].
///
/// It derefs to `[T]` and `&mut [T]`; [`drain`](Batch::drain) moves the
/// items out. Dropping the guard drops the items still in it and hands the
/// buffer back to the producers, so hold it only as long as the work needs:
/// while it lives, its buffer is unavailable.
pub struct Batch<'a, T, S: Storage<T, L>, L: RawLock, R: Relax> {
    batcher: &'a RawBatcher<T, S, L, R>,
    buffer: usize,
    /// Slots `start..end` of the buffer hold items.
    start: usize,
    end: usize,
    /// The guard owns its items and hands out `&[T]`: it may be shared
    /// between threads only if `T: Sync` (`&RawBatcher` alone is `Sync` for
    /// any `T: Send`), and it drops `T`s.
    _items: PhantomData<T>,
}

impl<'a, T, S: Storage<T, L>, L: RawLock, R: Relax> Batch<'a, T, S, L, R> {
    pub(crate) fn new(batcher: &'a RawBatcher<T, S, L, R>, buffer: usize, len: usize) -> Self {
        Self {
            batcher,
            buffer,
            start: 0,
            end: len,
            _items: PhantomData,
        }
    }

    /// Items still in the batch.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// `true` when every item was drained.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The slots that hold this batch's items.
    #[inline(always)]
    fn live(&self) -> &'a [Slot<T>] {
        &self.batcher.buffer_slots(self.buffer)[self.start..self.end]
    }

    /// Under loom, records an access to the slots `start..end` (see
    /// [`RawBatcher::track_slots`]).
    #[inline(always)]
    fn track(&self, write: bool) {
        let start = self.buffer * self.batcher.batch_size() + self.start;
        self.batcher
            .track_slots(start, self.end - self.start, write);
    }

    /// Moves every item out, in order, like `Vec::drain(..)`: the batch is
    /// empty afterwards, and the items the iterator does not yield are dropped
    /// with it. If the iterator is leaked, its items are leaked too (never
    /// dropped twice).
    pub fn drain(&mut self) -> Drain<'_, T> {
        let slots = self.live();
        self.track(true);
        self.start = self.end;
        Drain {
            slots,
            pos: 0,
            _batch: PhantomData,
        }
    }
}

impl<'a, T, S: Storage<T, L>, L: RawLock, R: Relax> Batch<'a, T, S, L, R> {
    /// Drops the items left in the batch, hands its buffer back and takes
    /// the next sealed batch, if any: what dropping the guard and calling
    /// [`try_take`](RawBatcher::try_take) do, with one hold of the batcher's
    /// queue lock instead of two. For a consumer that handles batches back
    /// to back. The buffer is handed back even when none is waiting.
    ///
    /// ```
    /// static EVENTS: snail::Batcher<u32, 2, 4> = snail::Batcher::new();
    ///
    /// (0..5).for_each(|i| EVENTS.try_add(i).unwrap());
    /// let mut seen = Vec::new();
    /// let mut next = EVENTS.try_take();
    /// while let Some(mut batch) = next {
    ///     seen.extend(batch.drain());
    ///     next = batch.take_next();
    /// }
    /// assert_eq!(seen, [0, 1, 2, 3]); // 4 waits in a partial batch
    /// ```
    #[must_use = "the batch taken is handed back as soon as it is dropped"]
    pub fn take_next(mut self) -> Option<Self> {
        // If an item's destructor panics, `self` is dropped while unwinding
        // and hands the buffer back on its own.
        drop(self.drain());
        let batcher = self.batcher;
        let buffer = self.buffer;
        // Empty now: nothing is left for the guard's `Drop` but the buffer,
        // which the next line hands back.
        core::mem::forget(self);
        batcher.recycle_and_take(buffer)
    }
}

impl<T, S: Storage<T, L>, L: RawLock, R: Relax> core::ops::Deref for Batch<'_, T, S, L, R> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        self.track(false);
        let live = self.live();
        // SAFETY: `Slot<T>` has the layout of `T`; slots `start..end` hold
        // initialised items, owned by this guard, so no one writes them while
        // `&self` is borrowed.
        unsafe { core::slice::from_raw_parts(live.as_ptr().cast::<T>(), live.len()) }
    }
}

impl<T, S: Storage<T, L>, L: RawLock, R: Relax> core::ops::DerefMut for Batch<'_, T, S, L, R> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        self.track(true);
        let live = self.live();
        // SAFETY: as for `deref`, and `&mut self` makes this the only access;
        // `UnsafeCell` permits writing through the shared slot slice.
        unsafe { core::slice::from_raw_parts_mut(live.as_ptr().cast::<T>().cast_mut(), live.len()) }
    }
}

impl<T: core::fmt::Debug, S: Storage<T, L>, L: RawLock, R: Relax> core::fmt::Debug
    for Batch<'_, T, S, L, R>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T, S: Storage<T, L>, L: RawLock, R: Relax> Drop for Batch<'_, T, S, L, R> {
    fn drop(&mut self) {
        /// Recycles the buffer even if an item's destructor panics.
        struct Recycle<'a, T, S, L, R>(&'a RawBatcher<T, S, L, R>, usize)
        where
            S: Storage<T, L>,
            L: RawLock,
            R: Relax;
        impl<T, S: Storage<T, L>, L: RawLock, R: Relax> Drop for Recycle<'_, T, S, L, R> {
            fn drop(&mut self) {
                self.0.recycle(self.1);
            }
        }
        let _recycle = Recycle(self.batcher, self.buffer);
        self.track(true);
        let live = self.live();
        self.start = self.end;
        // SAFETY: the guard owns these initialised items and marked them gone
        // above, so they are dropped exactly once.
        unsafe { drop_slots(live) };
    }
}

/// Moves the items out of a [`Batch`]; from [`Batch::drain`].
pub struct Drain<'b, T> {
    slots: &'b [Slot<T>],
    pos: usize,
    /// Holds the batch mutably borrowed: its buffer cannot be recycled
    /// while the drain reads it.
    _batch: PhantomData<&'b mut T>,
}

impl<T> Iterator for Drain<'_, T> {
    type Item = T;

    #[inline]
    fn next(&mut self) -> Option<T> {
        let slot = self.slots.get(self.pos)?;
        self.pos += 1;
        // SAFETY: slots at and after `pos` hold items this drain owns; `pos`
        // moved past this one, so it is read exactly once.
        Some(unsafe { slot.get().read() })
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.slots.len() - self.pos;
        (n, Some(n))
    }
}

impl<T> ExactSizeIterator for Drain<'_, T> {}
impl<T> FusedIterator for Drain<'_, T> {}

impl<T> Drop for Drain<'_, T> {
    fn drop(&mut self) {
        let rest = &self.slots[self.pos..];
        self.pos = self.slots.len();
        // SAFETY: the items not yielded are owned here and dropped once.
        unsafe { drop_slots(rest) };
    }
}

impl<T> core::fmt::Debug for Drain<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Drain")
            .field("remaining", &(self.slots.len() - self.pos))
            .finish()
    }
}
