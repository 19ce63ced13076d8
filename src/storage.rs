//! Where the batch buffers live.
//!
//! The algorithm in [`RawBatcher`](crate::RawBatcher) is written once against
//! the sealed [`Storage`] trait. Two storages implement it:
//!
//! - [`ArrayStorage`]: `BUFFERS` arrays of `BATCH` slots inline, sizes fixed at
//!   compile time, built by a `const fn` so a batcher can be a `static`.
//! - [`HeapStorage`] (feature `alloc`): the same layout with sizes chosen at
//!   run time and allocated once, in [`HeapStorage::new`]. The std shim uses it.

use core::mem::MaybeUninit;

use crate::lock::RawLock;
use crate::pad::CachePadded;
use crate::sync::{maybe_const_fn, AtomicUsize, UnsafeCell};

/// Marks "no buffer" in indices and links.
pub(crate) const NONE: usize = usize::MAX;

/// One item's place in a buffer.
///
/// Always a plain `core::cell::UnsafeCell`, also under loom: consumers see a
/// batch as one `&[T]`, which needs `Slot<T>` to have the layout of `T`.
/// Access to slots is ordered by the shard and queue locks, whose state loom
/// does track; under loom each slot also has a loom cell, its [`Shadow`],
/// that every slot access touches.
#[repr(transparent)]
pub struct Slot<T>(core::cell::UnsafeCell<MaybeUninit<T>>);

impl<T> Slot<T> {
    pub(crate) const fn new() -> Self {
        Self(core::cell::UnsafeCell::new(MaybeUninit::uninit()))
    }

    /// The item's place; the caller decides when reading or writing it is
    /// sound.
    #[inline(always)]
    pub(crate) fn get(&self) -> *mut T {
        self.0.get().cast()
    }
}

/// Under `--cfg snail_loom`: one loom cell per slot, at the slot's index,
/// touched on every access to that slot, so that loom checks the slot
/// accesses too. The slots themselves stay plain cells (see [`Slot`]).
#[cfg(snail_loom)]
pub(crate) type Shadow = UnsafeCell<()>;

/// What the queue lock protects about one buffer: its link in the free list
/// or the sealed queue, and its length once sealed.
#[derive(Debug)]
pub struct BufferMeta {
    pub(crate) next: UnsafeCell<usize>,
    pub(crate) len: UnsafeCell<usize>,
}

impl BufferMeta {
    maybe_const_fn! {
        pub(crate) fn new() -> Self {
            Self { next: UnsafeCell::new(NONE), len: UnsafeCell::new(0) }
        }
    }
}

/// What a shard's lock protects: the buffer its producers are filling.
///
/// Positions are indices among all slots, so that an add writes at `next`
/// and checks `end` without computing where the buffer starts. A buffer is
/// sealed as soon as it is full, so between calls `next == end` exactly
/// when no buffer is open, and then both are 0. A buffer is opened to write
/// into it, and goes back to the free list if making its first item
/// panicked: between calls an open buffer holds at least one item.
#[derive(Debug, Clone, Copy)]
pub struct ShardState {
    /// Index of the buffer being filled, or `NONE`.
    pub(crate) current: usize,
    /// The slot the next item goes to.
    pub(crate) next: usize,
    /// One past the open buffer's last slot.
    pub(crate) end: usize,
    /// Set by `tick` when it finds this partial batch; the next tick seals it.
    pub(crate) ticked: bool,
}

impl ShardState {
    pub(crate) const fn new() -> Self {
        Self {
            current: NONE,
            next: 0,
            end: 0,
            ticked: false,
        }
    }

    /// `true` if an item can be written at `next`: a buffer is open and not
    /// full (between calls: a buffer is open).
    #[inline(always)]
    pub(crate) fn has_room(&self) -> bool {
        self.next != self.end
    }

    /// Items in the open buffer (0 if none), for buffers of `batch` slots.
    #[inline(always)]
    pub(crate) fn len(&self, batch: usize) -> usize {
        if self.current == NONE {
            0
        } else {
            self.next - (self.end - batch)
        }
    }
}

/// A producer shard: a lock, the partial batch it guards, and its counter of
/// added items. Padded so that shards on different cores share no line.
#[derive(Debug)]
pub struct ShardInner<L> {
    pub(crate) lock: L,
    pub(crate) state: UnsafeCell<ShardState>,
    /// Items added through this shard, written only under `lock`.
    pub(crate) added: AtomicUsize,
}

pub type Shard<L> = CachePadded<ShardInner<L>>;

maybe_const_fn! {
    pub(crate) fn new_shard<L: RawLock>() -> Shard<L> {
        CachePadded::new(ShardInner {
            #[cfg(not(snail_loom))]
            lock: L::INIT,
            #[cfg(snail_loom)]
            lock: L::new(),
            state: UnsafeCell::new(ShardState::new()),
            added: AtomicUsize::new(0),
        })
    }
}

pub(crate) mod sealed {
    use super::{BufferMeta, Shard, Slot};

    /// The accessors the algorithm uses; sealed so that only this crate's
    /// storages, whose slices never change, implement [`super::Storage`].
    pub trait StorageImpl<T, L> {
        /// Items per buffer, at least 1.
        fn batch(&self) -> usize;
        /// `batch() * metas().len()` slots; buffer `b` is `b*batch..(b+1)*batch`.
        fn slots(&self) -> &[Slot<T>];
        /// One entry per buffer, at least 1.
        fn metas(&self) -> &[BufferMeta];
        /// At least 1 and at most `metas().len()` shards.
        fn shards(&self) -> &[Shard<L>];
        /// Under loom: one shadow cell per slot.
        #[cfg(snail_loom)]
        fn shadows(&self) -> &[super::Shadow];
    }
}

/// Storage for a batcher's buffers; implemented by [`ArrayStorage`] and
/// [`HeapStorage`] only.
pub trait Storage<T, L>: sealed::StorageImpl<T, L> {}

/// `BUFFERS` buffers of `BATCH` items and `SHARDS` producer shards, inline.
///
/// Memory: `BATCH * BUFFERS * size_of::<T>()` for the items, two words per
/// buffer, and one (cache-padded on multi-core targets) shard header each.
pub struct ArrayStorage<T, const BATCH: usize, const BUFFERS: usize, L, const SHARDS: usize = 1> {
    shards: [Shard<L>; SHARDS],
    metas: [BufferMeta; BUFFERS],
    slots: [[Slot<T>; BATCH]; BUFFERS],
    #[cfg(snail_loom)]
    shadows: [[Shadow; BATCH]; BUFFERS],
}

impl<T, const BATCH: usize, const BUFFERS: usize, L: RawLock, const SHARDS: usize>
    ArrayStorage<T, BATCH, BUFFERS, L, SHARDS>
{
    #[cfg(not(snail_loom))]
    pub(crate) const fn new() -> Self {
        const {
            assert!(BATCH > 0, "BATCH must be at least 1");
            assert!(BUFFERS > 0, "BUFFERS must be at least 1");
            assert!(SHARDS > 0, "SHARDS must be at least 1");
            assert!(SHARDS <= BUFFERS, "SHARDS must not exceed BUFFERS");
            assert!(
                BUFFERS < usize::MAX / BATCH,
                "BATCH * BUFFERS overflows usize"
            );
        }
        Self {
            shards: [const { new_shard::<L>() }; SHARDS],
            metas: [const { BufferMeta::new() }; BUFFERS],
            slots: [const { [const { Slot::<T>::new() }; BATCH] }; BUFFERS],
        }
    }

    #[cfg(snail_loom)]
    pub(crate) fn new() -> Self {
        assert!(BATCH > 0 && BUFFERS > 0 && SHARDS > 0 && SHARDS <= BUFFERS);
        Self {
            shards: core::array::from_fn(|_| new_shard::<L>()),
            metas: core::array::from_fn(|_| BufferMeta::new()),
            slots: [const { [const { Slot::<T>::new() }; BATCH] }; BUFFERS],
            shadows: core::array::from_fn(|_| core::array::from_fn(|_| Shadow::new(()))),
        }
    }
}

impl<T, const BATCH: usize, const BUFFERS: usize, L, const SHARDS: usize> sealed::StorageImpl<T, L>
    for ArrayStorage<T, BATCH, BUFFERS, L, SHARDS>
{
    #[inline(always)]
    fn batch(&self) -> usize {
        BATCH
    }
    #[inline(always)]
    fn slots(&self) -> &[Slot<T>] {
        self.slots.as_flattened()
    }
    #[cfg(snail_loom)]
    fn shadows(&self) -> &[Shadow] {
        self.shadows.as_flattened()
    }
    #[inline(always)]
    fn metas(&self) -> &[BufferMeta] {
        &self.metas
    }
    #[inline(always)]
    fn shards(&self) -> &[Shard<L>] {
        &self.shards
    }
}

impl<T, const BATCH: usize, const BUFFERS: usize, L, const SHARDS: usize> Storage<T, L>
    for ArrayStorage<T, BATCH, BUFFERS, L, SHARDS>
{
}

/// Buffers and shards sized at run time, allocated once by [`HeapStorage::new`].
#[cfg(feature = "alloc")]
pub struct HeapStorage<T, L> {
    batch: usize,
    shards: alloc::boxed::Box<[Shard<L>]>,
    metas: alloc::boxed::Box<[BufferMeta]>,
    slots: alloc::boxed::Box<[Slot<T>]>,
    #[cfg(snail_loom)]
    shadows: alloc::boxed::Box<[Shadow]>,
}

/// Why [`HeapStorage::new`] refused its sizes.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// `batch` was 0.
    ZeroBatch,
    /// `buffers` was 0.
    ZeroBuffers,
    /// `shards` was 0 or more than `buffers`.
    Shards,
    /// `batch * buffers` slots do not fit in memory: more than `isize::MAX`
    /// bytes, or the allocator refused them.
    TooLarge,
}

#[cfg(feature = "alloc")]
impl core::fmt::Display for SizeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SizeError::ZeroBatch => "batch size must be at least 1",
            SizeError::ZeroBuffers => "at least one buffer is needed",
            SizeError::Shards => "shards must be between 1 and the number of buffers",
            SizeError::TooLarge => "batch size times buffers does not fit in memory",
        })
    }
}

#[cfg(feature = "alloc")]
impl core::error::Error for SizeError {}

#[cfg(feature = "alloc")]
impl<T, L: RawLock> HeapStorage<T, L> {
    /// Allocates `buffers` buffers of `batch` items and `shards` shards.
    ///
    /// # Errors
    ///
    /// [`SizeError`] for a zero size, `shards > buffers`, or a total that does
    /// not fit in memory (including an allocator that refuses the buffers).
    pub fn new(batch: usize, buffers: usize, shards: usize) -> Result<Self, SizeError> {
        use alloc::vec::Vec;
        if batch == 0 {
            return Err(SizeError::ZeroBatch);
        }
        if buffers == 0 {
            return Err(SizeError::ZeroBuffers);
        }
        if shards == 0 || shards > buffers {
            return Err(SizeError::Shards);
        }
        let total = batch.checked_mul(buffers).ok_or(SizeError::TooLarge)?;
        let bytes = total
            .checked_mul(core::mem::size_of::<T>())
            .ok_or(SizeError::TooLarge)?;
        if bytes > isize::MAX as usize {
            return Err(SizeError::TooLarge);
        }
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(total)
            .map_err(|_| SizeError::TooLarge)?;
        // SAFETY: the capacity was reserved above, and a `Slot<T>` is an
        // `UnsafeCell<MaybeUninit<T>>`, for which uninitialised memory is a
        // valid value: no slot needs writing. (Writing each one costs
        // `total` steps even for zero-sized items, where `total` may be
        // `usize::MAX`.)
        unsafe { slots.set_len(total) };
        Ok(Self {
            batch,
            shards: try_collect(shards, new_shard::<L>)?,
            metas: try_collect(buffers, BufferMeta::new)?,
            slots: slots.into_boxed_slice(),
            #[cfg(snail_loom)]
            shadows: try_collect(total, || Shadow::new(()))?,
        })
    }
}

/// `n` values from `f`, or [`SizeError::TooLarge`] if they do not fit in
/// memory (instead of a capacity-overflow panic or an allocation abort).
#[cfg(feature = "alloc")]
fn try_collect<X>(n: usize, mut f: impl FnMut() -> X) -> Result<alloc::boxed::Box<[X]>, SizeError> {
    let mut v = alloc::vec::Vec::new();
    v.try_reserve_exact(n).map_err(|_| SizeError::TooLarge)?;
    v.extend((0..n).map(|_| f()));
    Ok(v.into_boxed_slice())
}

#[cfg(feature = "alloc")]
impl<T, L> sealed::StorageImpl<T, L> for HeapStorage<T, L> {
    #[inline(always)]
    fn batch(&self) -> usize {
        self.batch
    }
    #[inline(always)]
    fn slots(&self) -> &[Slot<T>] {
        &self.slots
    }
    #[cfg(snail_loom)]
    fn shadows(&self) -> &[Shadow] {
        &self.shadows
    }
    #[inline(always)]
    fn metas(&self) -> &[BufferMeta] {
        &self.metas
    }
    #[inline(always)]
    fn shards(&self) -> &[Shard<L>] {
        &self.shards
    }
}

#[cfg(feature = "alloc")]
impl<T, L> Storage<T, L> for HeapStorage<T, L> {}

/// Drops the items in `slots`, in order; if one panics the rest are still
/// dropped (as for a slice).
///
/// # Safety
///
/// Every slot holds an initialised item, no one else accesses these slots
/// meanwhile, and none of them is read again as initialised afterwards.
pub(crate) unsafe fn drop_slots<T>(slots: &[Slot<T>]) {
    // `Slot<T>` is `repr(transparent)` around `UnsafeCell<MaybeUninit<T>>`,
    // so a slot slice has the layout of `[T]`, and `UnsafeCell` permits
    // writing through a shared slice of it.
    let items = core::ptr::slice_from_raw_parts_mut(slots.as_ptr() as *mut T, slots.len());
    // SAFETY: the caller guarantees the items are initialised, unshared and
    // dropped only here.
    unsafe { core::ptr::drop_in_place(items) }
}
