//! The locks that guard a batcher's shards and its queue of batches.
//!
//! A lock here is a [`RawLock`]: it owns no data, it only runs a closure with
//! mutual exclusion. The batcher keeps its state in cells next to the lock.
//!
//! - [`SpinLock`]: test-and-test-and-set on one atomic flag, waiting with a
//!   [`Relax`] hook. For threads on several cores.
//! - [`CsLock`] (feature `critical-section`): runs the closure inside
//!   `critical_section::with`, so code in an interrupt handler and the main
//!   loop of a single-core MCU can share one batcher.

use core::marker::PhantomData;

use crate::relax::{Relax, Spin};
use crate::sync::{maybe_const_fn, AtomicBool, Ordering};

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
