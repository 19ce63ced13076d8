//! Which shard a thread adds to.
//!
//! Producers that run on different CPUs at the same moment should use
//! different shards, or they contend for one lock (and take its bias from
//! each other) while another shard sits idle. Threads do not stay on one CPU,
//! and there may be many more of them than CPUs, so a fixed shard per thread
//! collides often. A thread therefore follows its CPU: every
//! [`CHECK_EVERY`] adds it looks up the CPU it runs on (`sched_getcpu`,
//! Linux only) and moves to that CPU's shard.
//!
//! A thread's items must stay in order, so before it moves it seals the
//! partial batch of the shard it leaves, which holds its last items there
//! if any are unsealed: a batch sealed later is queued after that one. A
//! move costs one lock of the old shard and may make one batch short; a
//! thread moves when the scheduler moved it, which is rare next to adds.
//!
//! The route lives in a thread-local and serves one batcher at a time. For
//! any other batcher the thread adds through its fixed shard, its
//! [`thread_number`] masked, which is where its items there are: a thread
//! leaves its fixed shard only on a route, and gives up a route only when the
//! route's batcher is gone or the route is on its fixed shard.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::sync::Weak;

use crate::batcher::Shared;
use crate::bias::thread_number;

/// Adds between two looks at the CPU.
const CHECK_EVERY: u32 = 64;

// The route, one field per thread-local: the add path reads and writes
// single words (a struct in one `Cell` is copied in and out whole, and the
// wide loads of a value just stored narrowly stall the pipeline).
thread_local! {
    /// The routed batcher (its `Shared`'s address), or 0 for none.
    static BATCHER: Cell<usize> = const { Cell::new(0) };
    static SHARD: Cell<usize> = const { Cell::new(0) };
    /// This thread's fixed shard in the routed batcher.
    static FIXED: Cell<usize> = const { Cell::new(0) };
    /// Adds left before the next look at the CPU.
    static COUNTDOWN: Cell<u32> = const { Cell::new(0) };
    /// The routed batcher (its `Shared`), kept allocated so that its address
    /// is nobody else's while `BATCHER` holds it, and so that its end shows.
    static HELD: RefCell<Option<Weak<dyn Any + Send + Sync>>> = const { RefCell::new(None) };
}

fn id<T>(shared: &Shared<T>) -> usize {
    shared as *const Shared<T> as usize
}

/// The shard for this thread's next add to `shared`.
#[inline]
pub(crate) fn pick<T>(shared: &Shared<T>) -> usize {
    if shared.mask == 0 {
        return 0;
    }
    if BATCHER.get() != id(shared) {
        return take(shared);
    }
    let countdown = COUNTDOWN.get();
    if countdown > 0 {
        COUNTDOWN.set(countdown - 1);
        return SHARD.get();
    }
    follow_cpu(shared)
}

/// Moves the route to the current CPU's shard, sealing the partial batch of
/// the shard it leaves (which may hold this thread's last items).
#[inline(never)]
fn follow_cpu<T>(shared: &Shared<T>) -> usize {
    COUNTDOWN.set(CHECK_EVERY - 1);
    let shard = SHARD.get();
    match current_cpu() {
        Some(cpu) if cpu & shared.mask != shard => {
            shared.flush_shard(shard);
            SHARD.set(cpu & shared.mask);
            cpu & shared.mask
        }
        _ => shard,
    }
}

/// An add to a batcher other than the routed one: through the fixed shard,
/// and the route moves to this batcher if the old one lets it go (it is
/// gone, or the route had not left the fixed shard there).
#[cold]
fn take<T>(shared: &Shared<T>) -> usize {
    let fixed = thread_number() & shared.mask;
    let free = BATCHER.get() == 0
        || SHARD.get() == FIXED.get()
        // While thread-locals are being destroyed: keep to the fixed shard.
        || HELD
            .try_with(|h| h.borrow().as_ref().map_or(true, |w| w.strong_count() == 0))
            .unwrap_or(false);
    if free
        && HELD
            .try_with(|h| *h.borrow_mut() = Some(shared.me.clone()))
            .is_ok()
    {
        BATCHER.set(id(shared));
        SHARD.set(fixed);
        FIXED.set(fixed);
        // Not at once: a move seals the partial batch it leaves, and a
        // thread that adds a handful of items should not cut its batches.
        COUNTDOWN.set(CHECK_EVERY - 1);
    }
    fixed
}

/// The CPU this thread runs on (it may move at any moment).
#[cfg(target_os = "linux")]
fn current_cpu() -> Option<usize> {
    // SAFETY: `sched_getcpu` takes no arguments and touches no memory of
    // ours.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

#[cfg(not(target_os = "linux"))]
fn current_cpu() -> Option<usize> {
    None
}
