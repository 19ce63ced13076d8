//! The [`Bias`] of the shim's shard locks: a slot per thread, and Linux
//! `membarrier` as the heavy half of an asymmetric fence.
//!
//! A shard lock that one thread keeps taking alone becomes biased to it (see
//! [`snail::BiasedLock`]): the thread then enters with plain stores and a
//! compiler fence, and a thread that wants the shard back (the worker, for
//! linger or close) pays one `membarrier` system call, which makes every
//! running thread of the process execute a full memory barrier. Where the
//! call is missing (not Linux, old kernels, seccomp filters) no shard lock
//! is ever biased: they work as plain spin locks (a biased entry with a full
//! fence would cost what a compare-exchange costs).

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, fence, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::Mutex;

use snail::{Bias, BiasSlot};

/// `membarrier` not probed yet: grant no bias.
const UNKNOWN: u8 = 0;
/// Registered for `MEMBARRIER_CMD_PRIVATE_EXPEDITED`.
const EXPEDITED: u8 = 1;
/// Not available: grant no bias.
const UNAVAILABLE: u8 = 2;

static MEMBARRIER: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Probes and registers `membarrier` once per process (again if two threads
/// race here; registering twice is harmless). `Builder::spawn` calls it, and
/// so does every heavy fence, so `ThreadBias` is correct without it: until
/// a thread reads `EXPEDITED`, its `grant` is `false` and no lock makes it
/// an owner that relies on the light fence.
///
/// The first answer stays: two threads may get different ones (a seccomp
/// filter is per thread), and a later `UNAVAILABLE` stored over
/// `EXPEDITED` would turn heavy fences into plain fences under owners that
/// rely on the system call.
pub(crate) fn init() {
    if MEMBARRIER.load(Acquire) == UNKNOWN {
        let state = if sys::register() {
            EXPEDITED
        } else {
            UNAVAILABLE
        };
        let _ = MEMBARRIER.compare_exchange(UNKNOWN, state, AcqRel, Acquire);
    }
}

/// Probes `membarrier` if that was not done yet, and returns `true` if
/// shard locks can be biased in this process, with a compiler fence as
/// [`ThreadBias`]'s light fence (`false`: they are never biased).
pub fn expedited_after_probe() -> bool {
    init();
    MEMBARRIER.load(Acquire) == EXPEDITED
}

/// A small number per thread, fixed for the thread's life and never reused:
/// it picks the thread's fixed shard (see `route`).
#[inline]
pub(crate) fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    thread_local!(static NUMBER: Cell<usize> = const { Cell::new(0) });
    NUMBER.with(|n| {
        let mut v = n.get();
        if v == 0 {
            v = next_number(&NEXT);
            n.set(v);
        }
        v
    })
}

#[cold]
fn next_number(next: &AtomicUsize) -> usize {
    let v = next.fetch_add(1, Relaxed);
    // 2^63 threads would wrap into 0 or `usize::MAX`; no process gets there,
    // but a wrong id would break the lock, so refuse rather than reuse.
    assert!(
        v != 0 && v < usize::MAX / 2,
        "snail-std: thread numbers exhausted"
    );
    v
}

/// Slots of finished threads, handed to new ones. Locks keep referring to
/// the slot of their last owner, so slots are never freed: a process holds
/// as many as it ever ran threads at once, plus one for each thread that
/// added from a thread-local destructor after its slot went back.
static SLOTS: Mutex<Vec<&'static BiasSlot>> = Mutex::new(Vec::new());

/// A thread's slot; goes back to [`SLOTS`] when the thread ends.
struct Slot(&'static BiasSlot);

impl Slot {
    fn take() -> Self {
        let pooled = SLOTS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Slot(pooled.unwrap_or_else(new_slot))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Later calls in this thread (other thread-locals' destructors) must
        // not find the slot once it is back in the pool.
        CACHED.set(None);
        // The thread is ending and runs no closure under a lock: the next
        // thread may use the slot (the pool's mutex orders the two).
        SLOTS.lock().unwrap_or_else(|e| e.into_inner()).push(self.0);
    }
}

fn new_slot() -> &'static BiasSlot {
    Box::leak(Box::new(BiasSlot::new()))
}

thread_local! {
    static SLOT: Slot = Slot::take();
    /// `SLOT`'s slot while it lives, else `None`: a thread-local without a
    /// destructor, which an add reads without the check whether `SLOT` was
    /// initialized or destroyed.
    static CACHED: Cell<Option<&'static BiasSlot>> = const { Cell::new(None) };
}

/// The calling thread's slot, for a call that did not find it in `CACHED`:
/// takes `SLOT`, or once `SLOT` is destroyed (a later thread-local
/// destructor adds) a new slot, never pooled; either is cached for the
/// thread's later calls. So a thread leaks at most one slot, however often
/// its last destructors add.
#[cold]
fn uncached_slot() -> &'static BiasSlot {
    let slot = SLOT.try_with(|s| s.0).unwrap_or_else(|_| new_slot());
    CACHED.set(Some(slot));
    slot
}

/// The shim's [`Bias`]: a slot per thread, from a pool, and `membarrier`.
#[derive(Debug)]
pub struct ThreadBias;

// SAFETY: a thread's slot is its own from its first use until its
// thread-locals are destroyed; the pool's mutex orders the hand-over to a
// later thread. A thread whose slot is already gone (a lock taken by
// another thread-local's destructor) gets a new slot, never pooled, which
// it keeps (in `CACHED`) and no other thread ever uses. The fences: the
// pair is needed only in threads using a slot that a lock made its owner,
// which it did after some `grant` read `EXPEDITED`. That is final (the
// state moves from `UNKNOWN` to one value, by a compare-exchange: the first
// answer stays): the process is
// registered, for every thread in it (also one that inherits a slot from
// the pool), and a heavy fence, which probes first if it reads `UNKNOWN`,
// issues the system call. That makes every other running thread of the
// process execute a full barrier before it returns (and a thread that is
// not running was switched out, which is a full barrier), so a compiler
// fence on the light side pairs with it like two SeqCst fences. Without
// `membarrier` no lock is biased, so no owner relies on `light`, and
// `heavy` (which only revokes an owner) never runs.
unsafe impl Bias for ThreadBias {
    #[inline(always)]
    fn slot() -> &'static BiasSlot {
        CACHED.get().unwrap_or_else(uncached_slot)
    }

    #[inline]
    fn grant() -> bool {
        MEMBARRIER.load(Acquire) == EXPEDITED
    }

    #[inline(always)]
    fn light() {
        compiler_fence(SeqCst);
    }

    #[cold]
    fn heavy() {
        // Probe here too: a heavy fence that read a stale `UNKNOWN` while
        // some owner already reads `EXPEDITED` (and only fences its compiler)
        // must still issue the system call.
        init();
        if MEMBARRIER.load(Relaxed) == EXPEDITED {
            sys::barrier();
        } else {
            fence(SeqCst);
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::os::raw::c_long;

    const QUERY: c_long = 0;
    const PRIVATE_EXPEDITED: c_long = 1 << 3;
    const REGISTER_PRIVATE_EXPEDITED: c_long = 1 << 4;

    fn membarrier(cmd: c_long) -> c_long {
        // SAFETY: membarrier takes two integer arguments and touches no
        // memory of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as c_long) }
    }

    pub(super) fn register() -> bool {
        let supported = membarrier(QUERY);
        supported > 0
            && supported & PRIVATE_EXPEDITED != 0
            && membarrier(REGISTER_PRIVATE_EXPEDITED) == 0
    }

    pub(super) fn barrier() {
        // Registered above, so it cannot fail; if it did, the biased locks
        // would no longer exclude each other: stop rather than corrupt.
        if membarrier(PRIVATE_EXPEDITED) != 0 {
            eprintln!("snail-std: membarrier failed after registration");
            std::process::abort();
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub(super) fn register() -> bool {
        false
    }

    pub(super) fn barrier() {
        unreachable!("membarrier is only registered on Linux")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    /// Runs `f` in a new thread from a thread-local destructor that runs
    /// after `SLOT`'s (registered before it: a thread's destructors run in
    /// the reverse order of registration), and returns what `f` returned.
    fn after_slot_is_gone(f: fn() -> bool) -> bool {
        struct Late(fn() -> bool, mpsc::Sender<(bool, bool)>);
        impl Drop for Late {
            fn drop(&mut self) {
                let gone = SLOT.try_with(|_| ()).is_err();
                let _ = self.1.send((gone, (self.0)()));
            }
        }
        thread_local!(static LATE: Cell<Option<Late>> = const { Cell::new(None) });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            LATE.set(Some(Late(f, tx)));
            ThreadBias::slot();
        })
        .join()
        .unwrap();
        let (gone, result) = rx.recv().unwrap();
        assert!(gone, "the destructor ran before SLOT's: nothing was tested");
        result
    }

    /// A thread whose slot went back to the pool (its thread-locals are
    /// being destroyed) and that still adds gets one slot of its own for
    /// the rest of its life, not a new (leaked) slot on every add.
    #[test]
    fn late_calls_share_one_slot() {
        assert!(after_slot_is_gone(|| {
            let first: *const BiasSlot = ThreadBias::slot();
            (0..100).all(|_| core::ptr::eq(ThreadBias::slot(), first))
        }));
    }
}
