//! The locks that guard a batcher's shards and its queue of batches.
//!
//! A lock here is a [`RawLock`]: it owns no data, it only runs a closure with
//! mutual exclusion. The batcher keeps its state in cells next to the lock.
//!
//! - [`SpinLock`]: test-and-test-and-set on one atomic flag, waiting with a
//!   [`Relax`] hook. For threads on several cores.
//! - [`BiasedLock`]: a spin lock that a thread which keeps taking it alone
//!   comes to own, so that it then enters and leaves with plain loads and
//!   stores instead of a locked read-modify-write. Another thread takes the
//!   ownership back with a heavy fence. Needs a [`Bias`]: a thread number and
//!   an asymmetric pair of fences (the std shim uses Linux `membarrier`).
//! - [`CsLock`] (feature `critical-section`): runs the closure inside
//!   `critical_section::with`, so code in an interrupt handler and the main
//!   loop of a single-core MCU can share one batcher.

use core::marker::PhantomData;

use crate::pad::CachePadded;
use crate::relax::{Relax, Spin};
use crate::sync::{maybe_const_fn, AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// A lock that runs closures one at a time.
///
/// # Safety
///
/// Implementations must guarantee that no two calls of [`RawLock::lock`] on
/// the same value run their closures at the same time, and that everything a
/// closure wrote happens-before the start of the next closure on that lock.
/// If the closure unwinds, the lock must be released (or stay held forever:
/// never left half-open).
pub unsafe trait RawLock {
    /// An unlocked lock, usable in `static` initialisers.
    #[cfg(not(snail_loom))]
    const INIT: Self;

    /// Returns an unlocked lock.
    fn new() -> Self;

    /// Runs `f` with the lock held and returns its result.
    fn lock<R>(&self, f: impl FnOnce() -> R) -> R;
}

/// A spin lock: an atomic flag taken with a compare-exchange, waited on with
/// loads and `R::relax()` so that waiters do not bounce the cache line.
///
/// It is not fair and not interrupt-safe: an interrupt handler that spins on
/// a lock held by the code it interrupted spins forever. Use [`CsLock`] there.
pub struct SpinLock<R = Spin> {
    locked: AtomicBool,
    _relax: PhantomData<R>,
}

impl<R> SpinLock<R> {
    maybe_const_fn! {
        /// Returns an unlocked spin lock.
        pub fn new() -> Self {
            Self { locked: AtomicBool::new(false), _relax: PhantomData }
        }
    }
}

impl<R> Default for SpinLock<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> core::fmt::Debug for SpinLock<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SpinLock")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .finish()
    }
}

/// Releases the spin lock when dropped, also during unwinding.
struct Unlock<'a>(&'a AtomicBool);

impl Drop for Unlock<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

// SAFETY: the `false -> true` compare-exchange (Acquire) succeeds for exactly
// one thread until the `Release` store in `Unlock::drop`, which runs after the
// closure, also when it unwinds. Acquire/Release order the closures.
unsafe impl<R: Relax> RawLock for SpinLock<R> {
    #[cfg(not(snail_loom))]
    const INIT: Self = Self::new();

    fn new() -> Self {
        SpinLock::new()
    }

    #[inline(always)]
    fn lock<T>(&self, f: impl FnOnce() -> T) -> T {
        // A compare-exchange, not a swap: a waiter's failed attempt stores
        // nothing. (Loom orders a waiter's `swap(true)` only partially against
        // the holder's release store, so under loom a swap-based waiter can
        // read its own stale `true` forever and the model never finishes.)
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                crate::sync::relax::<R>();
            }
        }
        let _unlock = Unlock(&self.locked);
        f()
    }
}

/// Where a thread marks itself inside a [`BiasedLock`] it owns.
///
/// A [`Bias`] gives each thread a slot of its own. The lock remembers its
/// owner's slot, so an owner only ever writes to its own slot: a thread that
/// read "I own this lock" just before losing it, and marks itself inside
/// late, disturbs nobody (with one flag per lock, such a late mark could hide
/// the next owner from a revoker). Create slots with `BiasSlot::new()` and
/// keep them alive for the rest of the program (leak them, or keep them in a
/// pool), as locks refer to them.
#[derive(Debug)]
pub struct BiasSlot {
    /// The address of the lock this thread is inside on the owner's path,
    /// or 0. Padded: each thread writes its own on every entry.
    inside: CachePadded<AtomicUsize>,
}

impl BiasSlot {
    maybe_const_fn! {
        /// Returns a slot that is inside no lock.
        pub fn new() -> Self {
            Self {
                inside: CachePadded::new(AtomicUsize::new(0)),
            }
        }
    }
}

impl Default for BiasSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// What a [`BiasedLock`] needs from the platform: a [`BiasSlot`] per thread
/// and a pair of fences of unequal cost.
///
/// The owner of a biased lock runs [`light`](Self::light) on every entry;
/// a thread that takes the ownership away runs [`heavy`](Self::heavy) once.
/// With Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` as the heavy
/// fence, the light one is only a compiler fence; `fence(SeqCst)` on both
/// sides is always correct, and no faster than a [`SpinLock`].
///
/// # Safety
///
/// - [`slot`](Self::slot) returns a slot that no other running thread uses:
///   normally the same one on every call from a thread; a thread may also
///   get a slot that no thread used before (for example while its
///   thread-locals are being destroyed). A slot may pass from a finished
///   thread to a new one only through synchronisation (for example a lock
///   around a pool of slots).
/// - A `light()` in one thread and a `heavy()` in another order memory like two
///   `fence(SeqCst)`: when each thread stores, then fences, then loads what
///   the other stored, at least one of the loads sees the other's store.
///   This is needed in every thread that uses a slot that a lock made its
///   owner: the thread in which [`grant`](Self::grant) returned `true`,
///   from then on, and any later thread that the slot passes to (it
///   inherits the ownership, without a `grant` of its own). So a `grant`
///   that sets the fences up must set them up for every such thread (a
///   process-wide registration does). A lock may run `light()` in other
///   threads too; what they read after it sends them the slow way.
pub unsafe trait Bias {
    /// The calling thread's slot.
    fn slot() -> &'static BiasSlot;
    /// Whether the calling thread may become an owner now (default: always).
    /// A bias whose light fence is cheap only once something is set up (a
    /// `membarrier` registration) returns `false` until then, and its
    /// `light` may then rely on it: locks stay unbiased meanwhile, and
    /// work as spin locks without counting entries (the 64 lone entries
    /// that bias a lock are counted from the first granted one).
    #[inline(always)]
    fn grant() -> bool {
        true
    }
    /// The owner's fence, run on every uncontended entry.
    fn light();
    /// The revoker's fence, run when ownership is taken away.
    fn heavy();
}

/// No thread owns the lock.
const UNBIASED: usize = 0;
/// A thread is taking the ownership away.
const REVOKING: usize = usize::MAX;
/// Uncontended entries in a row by one thread before it becomes the owner
/// (under loom 1, so that models reach the biased state in a few steps).
#[cfg(not(snail_loom))]
const FIRST_THRESHOLD: usize = 64;
#[cfg(snail_loom)]
const FIRST_THRESHOLD: usize = 1;
/// A revocation doubles the threshold, up to this, unless the bias paid off.
const MAX_THRESHOLD: usize = 1 << 20;
/// A bias whose owner entered at least this often before it was revoked
/// paid for its revocation many times over: the threshold goes back to
/// [`FIRST_THRESHOLD`]. (A revocation costs about what a few hundred
/// unbiased entries cost; an owner's entry saves a read-modify-write.)
#[cfg(not(snail_loom))]
const PAID_OFF: usize = 4096;
#[cfg(snail_loom)]
const PAID_OFF: usize = 1;

/// A value no `owner` or slot ever holds: ids and lock addresses are
/// aligned, `UNBIASED` is 0 and `REVOKING` is `usize::MAX`.
#[cfg(all(snail_loom, snail_loom_dekker))]
const NEVER_STORED: usize = usize::MAX - 1;

/// The load after a light or heavy fence: the owner's read of `owner`, the
/// revoker's read of the owner's slot.
///
/// Under `--cfg snail_loom --cfg snail_loom_dekker` the fences do nothing
/// and this is a compare-exchange that always fails, which in loom reads
/// the newest value. That models what the fence pair guarantees (of two
/// threads that each store, fence, then load what the other stored, at
/// least one sees the other's store) without the happens-before edges that
/// the default model's read-modify-writes add and a compiler fence paired
/// with `membarrier` does not: ordering must then come from the lock's own
/// Release and Acquire operations.
#[inline(always)]
fn fenced_load(word: &AtomicUsize, order: Ordering) -> usize {
    #[cfg(all(snail_loom, snail_loom_dekker))]
    match word.compare_exchange(NEVER_STORED, NEVER_STORED, order, order) {
        Ok(v) | Err(v) => v,
    }
    #[cfg(not(all(snail_loom, snail_loom_dekker)))]
    word.load(order)
}

/// A thread's identity for a lock: its slot's address (never 0 or
/// `usize::MAX`).
#[inline(always)]
fn id(slot: &BiasSlot) -> usize {
    slot as *const BiasSlot as usize
}

/// A spin lock biased towards the thread that uses it alone.
///
/// After one thread has taken the lock 64 times in a row without meeting
/// another, the lock stays held on its behalf between calls: it becomes the
/// lock's owner. The owner enters by marking its [`BiasSlot`], running
/// [`Bias::light`] and checking that it still owns the lock, and leaves by
/// clearing the mark: no read-modify-write on its path. A thread that finds
/// the lock owned by another revokes the ownership (one compare-exchange and
/// [`Bias::heavy`]), waits until the owner is outside the lock, and takes
/// it.
///
/// A revocation that comes early (the owner entered fewer than 4096 times)
/// doubles the number of lone entries needed before the lock is biased
/// again, up to about a million, so a lock that threads use at the same time
/// stops being biased and behaves like a [`SpinLock`]. A revocation after a
/// long bias resets that number to 64: threads that take turns, such as more
/// producers than cores, each running for a scheduler time slice, keep the
/// lock biased.
///
/// An owner that calls into another biased lock from inside this one takes
/// that one the ordinary way. A closure that calls back into the same lock
/// waits forever, as with a spin lock. It suits a producer shard used by one
/// thread at a time, where the consumer only rarely needs the shard (linger,
/// flush, close). It is not interrupt-safe.
pub struct BiasedLock<B, R = Spin> {
    /// Held by a thread inside the lock, or on the owner's behalf.
    locked: AtomicBool,
    /// The owner's [`id`], `UNBIASED` or `REVOKING`.
    owner: AtomicUsize,
    /// The owner's slot; written before `owner` by the thread granting the
    /// ownership, read by the thread that revokes it.
    owner_slot: AtomicPtr<BiasSlot>,
    /// The owner's entries since the grant, counted inside the lock.
    entries: AtomicUsize,
    /// The following three are only touched with `locked` held.
    last: AtomicUsize,
    streak: AtomicUsize,
    threshold: AtomicUsize,
    /// Under loom, the fences are read-modify-writes of this word, which
    /// order memory the way `light` and `heavy` are required to (and more:
    /// see [`fenced_load`] for the other model).
    #[cfg(all(snail_loom, not(snail_loom_dekker)))]
    fence: AtomicUsize,
    _marker: PhantomData<(fn() -> B, R)>,
}

impl<B, R> BiasedLock<B, R> {
    maybe_const_fn! {
        /// Returns an unlocked, unbiased lock.
        pub fn new() -> Self {
            Self {
                locked: AtomicBool::new(false),
                owner: AtomicUsize::new(UNBIASED),
                owner_slot: AtomicPtr::new(core::ptr::null_mut()),
                entries: AtomicUsize::new(0),
                last: AtomicUsize::new(UNBIASED),
                streak: AtomicUsize::new(0),
                threshold: AtomicUsize::new(FIRST_THRESHOLD),
                #[cfg(all(snail_loom, not(snail_loom_dekker)))]
                fence: AtomicUsize::new(0),
                _marker: PhantomData,
            }
        }
    }
}

impl<B, R> BiasedLock<B, R> {
    /// `true` if the lock is biased to a thread at this moment (a snapshot,
    /// for tests and diagnostics).
    pub fn is_biased(&self) -> bool {
        let owner = self.owner.load(Ordering::Relaxed);
        owner != UNBIASED && owner != REVOKING
    }

    /// What an owner stores in its slot while inside this lock.
    #[inline(always)]
    fn addr(&self) -> usize {
        self as *const Self as usize
    }
}

impl<B, R> Default for BiasedLock<B, R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B, R> core::fmt::Debug for BiasedLock<B, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BiasedLock")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .field("biased", &self.is_biased())
            .finish_non_exhaustive()
    }
}

/// Leaves a biased lock when dropped after the closure, also during
/// unwinding. The closure runs in `lock` itself, whichever way the lock was
/// taken, so that it is never passed to (and spilled for) the slow path.
enum Leave<'a, B, R> {
    /// The owner's entry: clear the owner's mark.
    Owned(&'a AtomicUsize),
    /// The slow path: hand the lock to its new owner, if granted (keeping
    /// it held), or release it.
    Locked {
        lock: &'a BiasedLock<B, R>,
        grant: Option<&'static BiasSlot>,
    },
}

impl<B, R> Drop for Leave<'_, B, R> {
    #[inline(always)]
    fn drop(&mut self) {
        match *self {
            Leave::Owned(inside) => inside.store(0, Ordering::Release),
            Leave::Locked { lock, grant } => lock.leave_locked(grant),
        }
    }
}

impl<B, R> BiasedLock<B, R> {
    /// Leaves the slow path: see [`Leave::Locked`].
    #[cold]
    #[inline(never)]
    fn leave_locked(&self, grant: Option<&'static BiasSlot>) {
        match grant {
            None => self.locked.store(false, Ordering::Release),
            Some(slot) => {
                self.entries.store(0, Ordering::Relaxed);
                self.owner_slot
                    .store(slot as *const BiasSlot as *mut BiasSlot, Ordering::Relaxed);
                // Release: a revoker that reads this with its Acquire
                // compare-exchange sees the two stores above and what the
                // closure wrote.
                self.owner.store(id(slot), Ordering::Release);
            }
        }
    }
}

impl<B: Bias, R: Relax> BiasedLock<B, R> {
    #[inline(always)]
    fn light(&self) {
        #[cfg(all(snail_loom, not(snail_loom_dekker)))]
        self.fence.fetch_add(0, Ordering::AcqRel);
        #[cfg(not(snail_loom))]
        B::light();
    }

    #[inline(always)]
    fn heavy(&self) {
        #[cfg(all(snail_loom, not(snail_loom_dekker)))]
        self.fence.fetch_add(0, Ordering::AcqRel);
        #[cfg(not(snail_loom))]
        B::heavy();
    }

    /// Takes the lock the ordinary way, revoking an owner if there is one
    /// (this thread too, when it comes here from inside another biased lock
    /// it owns); the returned guard leaves it.
    #[cold]
    #[inline(never)]
    fn lock_slow(&self, slot: &'static BiasSlot) -> Leave<'_, B, R> {
        let me = id(slot);
        let mut contended = false;
        'acquire: loop {
            match self.locked.compare_exchange_weak(
                false,
                true,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                // A spurious failure (LL/SC targets, Miri) is no contention.
                Err(false) => continue,
                Err(true) => contended = true,
            }
            // Wait with loads, not compare-exchanges, so that the holder
            // keeps the line; revoke an owner, which never lets go by itself.
            loop {
                let owner = self.owner.load(Ordering::Relaxed);
                // Acquire: pairs with the Release store that made `owner`
                // the owner, for its slot and what it wrote on its way there.
                if owner != UNBIASED
                    && owner != REVOKING
                    && self
                        .owner
                        .compare_exchange(owner, REVOKING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    self.revoke();
                    break 'acquire;
                }
                crate::sync::relax::<R>();
                if !self.locked.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        // `locked` is held: the bookkeeping below is ours alone, and
        // needless while the bias grants no ownership (no `membarrier`):
        // then this is a spin lock.
        if !B::grant() {
            return Leave::Locked {
                lock: self,
                grant: None,
            };
        }
        let streak = if contended {
            0
        } else if self.last.load(Ordering::Relaxed) == me {
            self.streak.load(Ordering::Relaxed) + 1
        } else {
            1
        };
        self.last.store(me, Ordering::Relaxed);
        let threshold = self.threshold.load(Ordering::Relaxed);
        let grant = (streak >= threshold).then_some(slot);
        self.streak
            .store(if grant.is_some() { 0 } else { streak }, Ordering::Relaxed);
        Leave::Locked { lock: self, grant }
    }

    /// Called by the thread that set `owner` to `REVOKING`: waits until the
    /// old owner is outside the lock. The lock stays held (it was held on
    /// the owner's behalf), now by the caller.
    #[cold]
    fn revoke(&self) {
        // The old owner marks its slot, fences lightly, then reads `owner`;
        // we stored `owner`, fence heavily, then read its slot. So either it
        // sees `REVOKING` and backs off, or we see it inside and wait.
        self.heavy();
        let slot = self.owner_slot.load(Ordering::Relaxed);
        // SAFETY: `owner` held an id when we replaced it, so a grant stored
        // the owner's slot here before it (our Acquire compare-exchange read
        // that grant's Release store, and no grant happens while `owner` is
        // `REVOKING`). Slots come from `Bias::slot` as `&'static`.
        let slot = unsafe { &*slot };
        let here = self.addr();
        // Acquire: every store to a slot is Release, and each follows the
        // closures its thread ran before it.
        while fenced_load(&slot.inside, Ordering::Acquire) == here {
            crate::sync::relax::<R>();
        }
        let entries = self.entries.load(Ordering::Relaxed);
        self.owner.store(UNBIASED, Ordering::Relaxed);
        let threshold = if entries >= PAID_OFF {
            FIRST_THRESHOLD
        } else {
            (self.threshold.load(Ordering::Relaxed) * 2).min(MAX_THRESHOLD)
        };
        self.threshold.store(threshold, Ordering::Relaxed);
    }
}

// SAFETY: exclusion. A thread runs a closure either (a) holding `locked`,
// taken by its Acquire compare-exchange or handed over by `revoke`, or
// (b) as the owner, between storing this lock's address in its own slot,
// `light()`, reading `owner` equal to its id, and clearing its slot. Only
// the holder of `locked` makes a thread the owner, keeping `locked` held, so
// (a) excludes (a) and an owner's own entries are sequential (a thread
// already inside a lock on the owner's path takes every biased lock the slow
// way). (a) against (b): `locked` passes from an owner to another thread
// only through `revoke`, after `owner` became `REVOKING` and the owner's
// slot was seen not holding this lock after a heavy fence; the owner's
// entries fence lightly between marking the slot and reading `owner`, so by
// the fence pair each later entry reads `REVOKING` (or a later value, never
// its own id: ids are slot addresses, and no other running thread has its
// slot) and backs off to the slow path. Only a thread writes its own slot,
// so a thread that lost the ownership cannot hide the next owner. Ordering:
// `locked` is Acquire/Release; the grant is a Release store of `owner` read
// by the revoker's Acquire compare-exchange; every store to a slot is a
// Release store, read by the revoker's Acquire load.
unsafe impl<B: Bias, R: Relax> RawLock for BiasedLock<B, R> {
    #[cfg(not(snail_loom))]
    const INIT: Self = Self::new();

    fn new() -> Self {
        BiasedLock::new()
    }

    #[inline(always)]
    fn lock<T>(&self, f: impl FnOnce() -> T) -> T {
        let slot = B::slot();
        // A slot that is already inside a lock means a closure of ours is
        // running: this lock or another is taken the slow way (which waits
        // forever for this one, as a spin lock would). Whether this thread
        // owns the lock is read once, after the mark: a mark in a thread
        // that turns out not to own the lock is cleared again and disturbs
        // nobody (a revoker looks only at the owner's slot).
        let _leave = if slot.inside.load(Ordering::Relaxed) == 0 {
            slot.inside.store(self.addr(), Ordering::Release);
            self.light();
            if fenced_load(&self.owner, Ordering::Relaxed) == id(slot) {
                // Counted inside the lock: a revoker waits until we leave.
                let n = self.entries.load(Ordering::Relaxed);
                self.entries.store(n.wrapping_add(1), Ordering::Relaxed);
                Leave::Owned(&slot.inside)
            } else {
                slot.inside.store(0, Ordering::Release);
                self.lock_slow(slot)
            }
        } else {
            self.lock_slow(slot)
        };
        f()
    }
}

/// A lock that runs its closure inside `critical_section::with`.
///
/// On a single-core MCU the usual critical-section implementation masks
/// interrupts, so an interrupt handler can add items while the main loop takes
/// batches. It never waits, so it needs no relax hook. The program must link
/// one critical-section implementation (for Cortex-M, the `cortex-m` crate's
/// `critical-section-single-core` feature).
///
/// Critical sections nest: code inside one may enter it again. So a closure
/// that takes the same `CsLock` again (an item's `Clone` or an iterator that
/// adds to the batcher it is being added to) cannot wait as it would on a
/// spin lock: it panics instead.
#[cfg(feature = "critical-section")]
#[derive(Debug, Default)]
pub struct CsLock {
    /// Set while a closure runs: inside the critical section nothing else
    /// runs on this core and other cores wait outside it, so a set flag
    /// means this lock's closure is further up our own stack.
    held: AtomicBool,
}

#[cfg(feature = "critical-section")]
impl CsLock {
    maybe_const_fn! {
        /// Returns an unlocked lock.
        pub fn new() -> Self {
            Self { held: AtomicBool::new(false) }
        }
    }
}

/// Stops a closure that entered its own [`CsLock`] again.
#[cfg(feature = "critical-section")]
#[cold]
#[inline(never)]
fn entered_again() -> ! {
    panic!("snail: a CsLock was entered again from inside its own closure (a Clone or iterator that adds to the batcher it is adding to)")
}

// SAFETY: critical sections never overlap (the critical-section crate's
// contract), and entering and leaving one is a full compiler and hardware
// barrier on the implementations it allows. They may nest, though: `held`
// (read and written only inside the critical section) refuses a nested
// entry of the same lock before its closure runs, and `Unlock` clears it
// after the closure, also when it unwinds.
#[cfg(feature = "critical-section")]
unsafe impl RawLock for CsLock {
    #[cfg(not(snail_loom))]
    const INIT: Self = Self::new();

    fn new() -> Self {
        CsLock::new()
    }

    #[inline(always)]
    fn lock<T>(&self, f: impl FnOnce() -> T) -> T {
        critical_section::with(|_| {
            if self.held.load(Ordering::Relaxed) {
                entered_again();
            }
            self.held.store(true, Ordering::Relaxed);
            let _release = Unlock(&self.held);
            f()
        })
    }
}
