//! Which shard a thread adds to.
//!
//! Producers that run on different CPUs at the same moment should use
//! different shards, or they contend for one lock (and take its bias from
//! each other) while another shard sits idle. Threads do not stay on one CPU,
//! and there may be many more of them than CPUs, so a fixed shard per thread
//! collides often. A thread therefore follows its CPU: whenever one of its
//! adds seals a batch it looks up the CPU it runs on (`sched_getcpu`, Linux
//! only) and moves to that CPU's shard. The add path itself does no more
//! than read the route; a thread that shares its shard seals its share of
//! the batches, so it checks about as often as it contends.
//!
//! A thread's items must stay in order. An add that sealed a batch left
//! none of its thread's items unsealed on the shard (its last item went into
//! that batch), so the move costs nothing; after an `add_many` that went on
//! into a new batch, the thread first seals the partial batch of the shard
//! it leaves: a batch sealed later is queued after that one. That costs one
//! lock of the old shard and may make one batch short.
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

// The route, one field per thread-local: the add path reads and writes
// single words (a struct in one `Cell` is copied in and out whole, and the
// wide loads of a value just stored narrowly stall the pipeline).
thread_local! {
    /// The routed batcher (its `Shared`'s address), or 0 for none.
    static BATCHER: Cell<usize> = const { Cell::new(0) };
    static SHARD: Cell<usize> = const { Cell::new(0) };
    /// This thread's fixed shard in the routed batcher.
    static FIXED: Cell<usize> = const { Cell::new(0) };
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
    // The routed batcher first: a batcher with one shard is never routed
    // (`take` is not called for it), so this needs no look at the mask.
    if BATCHER.get() == id(shared) {
        return SHARD.get();
    }
    if shared.mask == 0 {
        return 0;
    }
    take(shared)
}

/// After an add of this thread to `shared` sealed a batch: moves the route
/// to the current CPU's shard. `unsealed`: the add may have left items of
/// this thread in the shard's partial batch (it went on into a new batch),
/// which is then sealed before the move.
#[inline(never)]
pub(crate) fn after_seal<T>(shared: &Shared<T>, unsealed: bool) {
    // Not routed (which includes every batcher with one shard): the thread
    // keeps to its fixed shard.
    if BATCHER.get() != id(shared) {
        return;
    }
    let shard = SHARD.get();
    match current_cpu() {
        // Not from inside the handler: it may run on a producer blocked in
        // an add (helping), which then retries on the shard it picked
        // before; moving the route under it would put that item behind the
        // thread's later items on the new shard. (Checked only for a move:
        // the handler's thread writes what this reads for every batch.)
        Some(cpu) if cpu & shared.mask != shard && !crate::worker::in_handler(shared) => {
            if unsealed {
                shared.flush_shard(shard);
            }
            SHARD.set(cpu & shared.mask);
        }
        _ => {}
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
