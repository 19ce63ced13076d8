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

use crate::relax::{Relax, Spin};
use crate::sync::{maybe_const_fn, AtomicBool, AtomicUsize, Ordering};

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

/// What a [`BiasedLock`] needs from the platform: a number per thread and a
/// pair of fences of unequal cost.
///
/// The owner of a biased lock runs [`light`](Self::light) on every entry;
/// a thread that takes the ownership away runs [`heavy`](Self::heavy) once.
/// With Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` as the heavy
/// fence, the light one is only a compiler fence; `fence(SeqCst)` on both
/// sides is always correct, and no faster than a [`SpinLock`].
///
/// # Safety
///
/// - [`thread_id`](Self::thread_id) returns the same value every time it is
///   called on one thread, never 0 or `usize::MAX`, and never the value of
///   another thread that is running at the same time. A value may pass from a
///   finished thread to a new one only through synchronisation (for example
///   a lock around a pool of numbers).
/// - A `light()` in one thread and a `heavy()` in another order memory like two
///   `fence(SeqCst)`: when each thread stores, then fences, then loads what
///   the other stored, at least one of the loads sees the other's store.
pub unsafe trait Bias {
    /// The calling thread's number.
    fn thread_id() -> usize;
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
/// The threshold doubles with every revocation, up to this.
const MAX_THRESHOLD: usize = 1 << 20;

/// A spin lock biased towards the thread that uses it alone.
///
/// After one thread has taken the lock 64 times in a
/// row without meeting another, the lock stays held on its behalf between
/// calls: it becomes the lock's owner. The owner enters by storing a flag,
/// running [`Bias::light`] and checking that it still owns the lock, and
/// leaves by clearing the flag: no read-modify-write on its path. A thread
/// that finds the lock owned by another revokes the ownership (one
/// compare-exchange and [`Bias::heavy`]), waits until the owner is outside
/// the lock, and takes it. Each revocation doubles the number of lone
/// entries needed before the lock is biased again (up to about a million),
/// so a lock that threads share stops being biased and behaves like a
/// [`SpinLock`].
///
/// It suits a producer shard used by one thread at a time, where the
/// consumer only rarely needs the shard (linger, flush, close). It is
/// not interrupt-safe.
pub struct BiasedLock<B, R = Spin> {
    /// Held by a thread inside the lock, or on the owner's behalf.
    locked: AtomicBool,
    /// The owner is inside the lock on its fast path.
    busy: AtomicBool,
    /// The owner's [`Bias::thread_id`], `UNBIASED` or `REVOKING`.
    owner: AtomicUsize,
    /// The following three are only touched with `locked` held.
    last: AtomicUsize,
    streak: AtomicUsize,
    threshold: AtomicUsize,
    /// Under loom, the fences are read-modify-writes of this word, which
    /// order memory the way `light` and `heavy` are required to.
    #[cfg(snail_loom)]
    fence: AtomicUsize,
    _marker: PhantomData<(fn() -> B, R)>,
}

impl<B, R> BiasedLock<B, R> {
    maybe_const_fn! {
        /// Returns an unlocked, unbiased lock.
        pub fn new() -> Self {
            Self {
                locked: AtomicBool::new(false),
                busy: AtomicBool::new(false),
                owner: AtomicUsize::new(UNBIASED),
                last: AtomicUsize::new(UNBIASED),
                streak: AtomicUsize::new(0),
                threshold: AtomicUsize::new(FIRST_THRESHOLD),
                #[cfg(snail_loom)]
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
            .field("owner", &self.owner.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Clears the owner's `busy` flag when dropped, also during unwinding.
struct LeaveOwned<'a>(&'a AtomicBool);

impl Drop for LeaveOwned<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Leaves the slow path when dropped, also during unwinding: hands the lock
/// to its new owner (keeping it held) or releases it.
struct LeaveLocked<'a, B, R> {
    lock: &'a BiasedLock<B, R>,
    grant: usize,
}

impl<B, R> Drop for LeaveLocked<'_, B, R> {
    #[inline]
    fn drop(&mut self) {
        if self.grant == UNBIASED {
            self.lock.locked.store(false, Ordering::Release);
        } else {
            // Release: a revoker that reads this with its Acquire
            // compare-exchange sees what the closure wrote.
            self.lock.owner.store(self.grant, Ordering::Release);
        }
    }
}

impl<B: Bias, R: Relax> BiasedLock<B, R> {
    #[inline(always)]
    fn light(&self) {
        #[cfg(snail_loom)]
        self.fence.fetch_add(0, Ordering::AcqRel);
        #[cfg(not(snail_loom))]
        B::light();
    }

    #[inline(always)]
    fn heavy(&self) {
        #[cfg(snail_loom)]
        self.fence.fetch_add(0, Ordering::AcqRel);
        #[cfg(not(snail_loom))]
        B::heavy();
    }

    /// Takes the lock the ordinary way, revoking an owner if there is one,
    /// then runs `f`.
    #[cold]
    #[inline(never)]
    fn lock_slow<T>(&self, me: usize, f: impl FnOnce() -> T) -> T {
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
                if owner != UNBIASED && owner != REVOKING && owner != me {
                    // Acquire: pairs with the Release store that made `owner`
                    // the owner, for what it wrote on its way there.
                    if self
                        .owner
                        .compare_exchange(owner, REVOKING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        self.revoke();
                        break 'acquire;
                    }
                }
                crate::sync::relax::<R>();
                if !self.locked.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        // `locked` is held: the bookkeeping below is ours alone.
        let streak = if contended {
            0
        } else if self.last.load(Ordering::Relaxed) == me {
            self.streak.load(Ordering::Relaxed) + 1
        } else {
            1
        };
        self.last.store(me, Ordering::Relaxed);
        let threshold = self.threshold.load(Ordering::Relaxed);
        let grant = if streak >= threshold { me } else { UNBIASED };
        self.streak
            .store(if grant == me { 0 } else { streak }, Ordering::Relaxed);
        let _leave = LeaveLocked { lock: self, grant };
        f()
    }

    /// Called by the thread that set `owner` to `REVOKING`: waits until the
    /// old owner is outside the lock. The lock stays held (it was held on
    /// the owner's behalf), now by the caller.
    #[cold]
    fn revoke(&self) {
        // The old owner stores `busy`, fences lightly, then reads `owner`;
        // we stored `owner`, fence heavily, then read `busy`. So either it
        // sees `REVOKING` and backs off, or we see it inside and wait.
        self.heavy();
        while self.busy.load(Ordering::Acquire) {
            crate::sync::relax::<R>();
        }
        self.owner.store(UNBIASED, Ordering::Relaxed);
        let threshold = self.threshold.load(Ordering::Relaxed);
        self.threshold
            .store((threshold * 2).min(MAX_THRESHOLD), Ordering::Relaxed);
    }
}

// SAFETY: exclusion. A thread runs a closure either (a) holding `locked`,
// taken by its Acquire compare-exchange or handed over by `revoke`, or
// (b) as the owner, between its `busy = true; light(); owner == me` and
// `busy = false`. Only the holder of `locked` makes a thread the owner,
// keeping `locked` held, so (a) excludes (a) and an owner's own entries are
// sequential. (a) against (b): `locked` passes from an owner to another
// thread only through `revoke`, after `owner` became `REVOKING` and the
// `busy` flag was seen false after a heavy fence; the owner's entries fence
// lightly between `busy = true` and reading `owner`, so by the fence pair each
// later entry reads `REVOKING` (or a later value, never its own id) and backs
// off to the slow path. Ordering: `locked` is Acquire/Release; the owner's
// grant is a Release store read by the revoker's Acquire compare-exchange;
// `busy = false` is a Release store read by the revoker's Acquire load.
unsafe impl<B: Bias, R: Relax> RawLock for BiasedLock<B, R> {
    #[cfg(not(snail_loom))]
    const INIT: Self = Self::new();

    fn new() -> Self {
        BiasedLock::new()
    }

    #[inline(always)]
    fn lock<T>(&self, f: impl FnOnce() -> T) -> T {
        let me = B::thread_id();
        // `busy` already set means a closure of ours is running and calls
        // back into the lock: take the slow path, which waits (forever),
        // as a spin lock would, instead of entering twice.
        if self.owner.load(Ordering::Relaxed) == me && !self.busy.load(Ordering::Relaxed) {
            self.busy.store(true, Ordering::Relaxed);
            self.light();
            if self.owner.load(Ordering::Relaxed) == me {
                let _leave = LeaveOwned(&self.busy);
                return f();
            }
            self.busy.store(false, Ordering::Release);
        }
        self.lock_slow(me, f)
    }
}

/// A lock that runs its closure inside `critical_section::with`.
///
/// On a single-core MCU the usual critical-section implementation masks
/// interrupts, so an interrupt handler can add items while the main loop takes
/// batches. It never waits, so it needs no relax hook. The program must link
/// one critical-section implementation (for Cortex-M, the `cortex-m` crate's
/// `critical-section-single-core` feature).
#[cfg(feature = "critical-section")]
#[derive(Debug, Default)]
pub struct CsLock {
    _private: (),
}

#[cfg(feature = "critical-section")]
impl CsLock {
    /// Returns the lock (it holds no state).
    pub const fn new() -> Self {
        Self { _private: () }
    }
}

// SAFETY: critical sections never overlap (the critical-section crate's
// contract), and entering and leaving one is a full compiler and hardware
// barrier on the implementations it allows.
#[cfg(feature = "critical-section")]
unsafe impl RawLock for CsLock {
    #[cfg(not(snail_loom))]
    const INIT: Self = Self::new();

    fn new() -> Self {
        CsLock::new()
    }

    #[inline(always)]
    fn lock<T>(&self, f: impl FnOnce() -> T) -> T {
        critical_section::with(|_| f())
    }
}
