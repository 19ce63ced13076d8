//! How producers blocked for a buffer wait: the *watch*.
//!
//! At most `room` blocked producers are on the watch: awake, spinning and
//! yielding, retrying when a buffer is freed. The others sleep on a
//! condvar. A freed buffer is so taken by a producer already awake; the
//! thread that freed it wakes a sleeper only when nobody watches, and a
//! producer that leaves the watch empty calls a sleeper to it. The few
//! watchers leave the lines that the worker writes for each batch alone
//! enough that it keeps its pace with many producers blocked.
//!
//! The protocol against lost wake-ups (`watching`, `sleeping` and `signals`
//! are `SeqCst`): every event that may let a sleeper proceed (a freed
//! buffer, a turn on the watch, the close) bumps `signals` after it made
//! the buffer free (or the batcher closed), then reads who sleeps (the
//! close wakes them all without reading), and notifies with the lock held. A sleeper registers, reads `signals`,
//! retries, and then, with the lock held, waits only while `signals` still
//! holds what it read. Three cases:
//! - the event read the counts after the registration: it wakes a sleeper
//!   (this one, or another that then takes the buffer or the turn);
//! - the sleeper read `signals` after the bump: that read synchronizes
//!   with the bump, so its retry sees the free buffer (or the close);
//! - it read `signals` before the bump, and checks again under the lock
//!   after it: the value changed, and it retries instead of waiting.
//!
//! A freed buffer wakes nobody while a producer watches, so the watch never
//! empties silently: a producer leaves it by taking a buffer or giving up
//! (its `Drop` then calls a sleeper if it finds the watch empty), or by
//! falling asleep (it then reads `signals` and retries, as above).
//!
//! Under `--cfg snail_std_loom` the atomics, the mutex and the condvar come
//! from loom, and the models at the end of this file check the protocol:
//! bounded ones (two or three producers, one of which may block twice, 2 or 3
//! preemptions, no timeouts, no helping). Loom has no timeouts, so a lost
//! wake-up is a deadlock there.

use std::time::Duration;

#[cfg(snail_std_loom)]
use loom::sync::{atomic::AtomicUsize, Condvar, Mutex};
use snail::CachePadded;
use std::sync::atomic::Ordering::*;
#[cfg(not(snail_std_loom))]
use std::sync::{atomic::AtomicUsize, Condvar, Mutex};

/// A `SeqCst` load of a counter that the protocol orders against a `SeqCst`
/// read-modify-write of another (a store-load pair, as in Dekker's
/// algorithm). Loom models `SeqCst` loads as acquire loads, which may read
/// values older than any `SeqCst` execution allows. Under loom this is a
/// compare-exchange that always fails (no counter reaches `usize::MAX`):
/// it reads the newest value, as the `SeqCst` load does here (every write
/// of these counters is a `SeqCst` read-modify-write), and writes nothing,
/// so it adds no happens-before edge that the real load lacks (a
/// `fetch_add(0)` would, and hid a lost wake-up from the models).
#[inline(always)]
fn seq_load(counter: &AtomicUsize) -> usize {
    #[cfg(snail_std_loom)]
    return match counter.compare_exchange(usize::MAX, usize::MAX, SeqCst, SeqCst) {
        Ok(v) | Err(v) => v,
    };
    #[cfg(not(snail_std_loom))]
    counter.load(SeqCst)
}

/// The blocked path's counters and its condvar.
pub(crate) struct Watch {
    /// Written only on the blocked path and once per freed buffer, so kept
    /// off the lines that every `add` reads.
    counts: CachePadded<Counts>,
    lock: Mutex<()>,
    cv: Condvar,
    /// The most producers on the watch at one time.
    room: usize,
}

struct Counts {
    /// Producers in the blocked path (watching or asleep).
    blocked: AtomicUsize,
    /// Producers on the watch.
    watching: AtomicUsize,
    /// Producers sleeping (or about to) until they are signalled.
    sleeping: AtomicUsize,
    /// Bumped whenever a buffer is freed, a sleeper is called to the watch,
    /// or the batcher closes: a sleeper sleeps only while it is unchanged.
    signals: AtomicUsize,
    /// Sleepers that have left their sleep for the watch, for tests (a
    /// plain atomic: loom need not model it).
    #[cfg(test)]
    woken: std::sync::atomic::AtomicUsize,
}

impl Watch {
    /// A watch for at most `room` producers (at least 1).
    pub(crate) fn new(room: usize) -> Self {
        Self {
            counts: CachePadded::new(Counts {
                blocked: AtomicUsize::new(0),
                watching: AtomicUsize::new(0),
                sleeping: AtomicUsize::new(0),
                signals: AtomicUsize::new(0),
                #[cfg(test)]
                woken: std::sync::atomic::AtomicUsize::new(0),
            }),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            room: room.max(1),
        }
    }

    /// Producers in the blocked path at this moment.
    pub(crate) fn blocked(&self) -> usize {
        self.counts.blocked.load(Relaxed)
    }

    /// `(watching, sleeping, blocked)` at this moment, for tests.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let c = &*self.counts;
        (
            c.watching.load(SeqCst),
            c.sleeping.load(SeqCst),
            c.blocked.load(SeqCst),
        )
    }

    /// How many sleepers have left their sleep for the watch so far (woken,
    /// timed out, or signalled before they slept), for tests: unlike
    /// [`counts`](Self::counts) it cannot miss a short turn on the watch.
    #[cfg(test)]
    pub(crate) fn woken(&self) -> usize {
        self.counts.woken.load(SeqCst)
    }

    /// A buffer was freed: a producer on the watch takes it; with nobody
    /// watching, one sleeper is woken. Call after the buffer is free.
    pub(crate) fn notify_freed(&self) {
        let c = &*self.counts;
        c.signals.fetch_add(1, SeqCst);
        // After the bump: a producer that falls asleep after this read
        // reads `signals` after the bump too, and retries.
        if seq_load(&c.watching) == 0 && seq_load(&c.sleeping) > 0 {
            self.wake_sleepers(false);
        }
    }

    /// Wakes every blocked producer: the batcher is closing. Call after
    /// the close is visible to a producer's retry.
    pub(crate) fn notify_closed(&self) {
        self.counts.signals.fetch_add(1, SeqCst);
        self.wake_sleepers(true);
    }

    /// Calls one sleeping producer to the watch, if one sleeps.
    fn wake_one(&self) {
        self.counts.signals.fetch_add(1, SeqCst);
        if seq_load(&self.counts.sleeping) > 0 {
            self.wake_sleepers(false);
        }
    }

    /// Wakes one sleeper on the condvar, or all of them.
    fn wake_sleepers(&self, all: bool) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if all {
            self.cv.notify_all();
        } else {
            self.cv.notify_one();
        }
    }
}

/// A producer's place in the blocked path: on the watch, or asleep.
/// Dropped (also when a panic unwinds out of the wait), it leaves, and
/// calls a sleeper to the watch if it leaves that empty.
///
/// Use: [`join`](Self::join), then retry the add; after each failed retry
/// [`sleep`](Self::sleep) if [`is_asleep`](Self::is_asleep), else spin or
/// yield, or [`fall_asleep`](Self::fall_asleep) when watching has gone on
/// long enough.
pub(crate) struct Blocked<'a> {
    watch: &'a Watch,
    asleep: bool,
    /// `signals` as read after registering as a sleeper.
    seen: usize,
}

impl<'a> Blocked<'a> {
    /// Joins the watch if it has room, else registers as a sleeper. Retry
    /// the add after this before sleeping.
    pub(crate) fn join(watch: &'a Watch) -> Self {
        let c = &*watch.counts;
        c.blocked.fetch_add(1, Relaxed);
        let mut me = Self {
            watch,
            asleep: false,
            seen: 0,
        };
        if c.watching.fetch_add(1, SeqCst) >= watch.room {
            me.fall_asleep();
        }
        me
    }

    /// `true` if registered as a sleeper: call [`sleep`](Self::sleep) after
    /// a failed retry.
    pub(crate) fn is_asleep(&self) -> bool {
        self.asleep
    }

    /// From the watch to sleep: registers as a sleeper and reads `signals`.
    /// Retry the add after this before sleeping.
    pub(crate) fn fall_asleep(&mut self) {
        let c = &*self.watch.counts;
        c.sleeping.fetch_add(1, SeqCst);
        c.watching.fetch_sub(1, SeqCst);
        self.asleep = true;
        self.seen = seq_load(&c.signals);
    }

    /// Sleeps until signalled (unless a signal came since the registration)
    /// or for at most `slice`, then rejoins the watch, even if it is full
    /// (so no sleeper waits longer than a slice for its turn).
    pub(crate) fn sleep(&mut self, slice: Duration) {
        debug_assert!(self.asleep);
        let c = &*self.watch.counts;
        let guard = self.watch.lock.lock().unwrap_or_else(|e| e.into_inner());
        if seq_load(&c.signals) == self.seen {
            let _ = self.watch.cv.wait_timeout(guard, slice);
        } else {
            drop(guard);
        }
        c.watching.fetch_add(1, SeqCst);
        c.sleeping.fetch_sub(1, SeqCst);
        self.asleep = false;
        #[cfg(test)]
        c.woken.fetch_add(1, SeqCst);
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        let c = &*self.watch.counts;
        if self.asleep {
            c.sleeping.fetch_sub(1, SeqCst);
        } else {
            c.watching.fetch_sub(1, SeqCst);
        }
        c.blocked.fetch_sub(1, Relaxed);
        // Leaving with the watch empty (from it or from sleep): call a
        // sleeper to it, so that the worker need not wake one for the next
        // freed buffer.
        if seq_load(&c.watching) == 0 {
            self.watch.wake_one();
        }
    }
}

/// Loom models of the protocol: `RUSTFLAGS="--cfg snail_std_loom"
/// LOOM_MAX_PREEMPTIONS=3 cargo test --release -p snail-std --lib
/// watch::models` (README; without a bound they run for a long time). Producers wait for
/// a counter of free buffers as `add` waits for the core's; loom explores
/// every interleaving up to `LOOM_MAX_PREEMPTIONS` preemptions and fails
/// a model that can end with a producer asleep forever (a deadlock).
#[cfg(all(test, snail_std_loom))]
mod models {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    /// The shared state of a model: the watch, free buffers, closed.
    struct Pool {
        watch: Watch,
        free: AtomicUsize,
        closed: AtomicBool,
    }

    impl Pool {
        fn new(room: usize) -> Arc<Self> {
            Arc::new(Self {
                watch: Watch::new(room),
                free: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            })
        }

        /// One attempt: takes a free buffer if there is one.
        fn try_take(&self) -> bool {
            self.free
                .fetch_update(AcqRel, Acquire, |n| n.checked_sub(1))
                .is_ok()
        }

        /// Frees a buffer, as the worker does after a batch.
        fn free_one(&self) {
            self.free.fetch_add(1, Release);
            self.watch.notify_freed();
        }

        /// Closes, as `close` does: the flag, then the wake-up.
        fn close(&self) {
            self.closed.store(true, SeqCst);
            self.watch.notify_closed();
        }

        /// A blocked `add`: `true` with a buffer, `false` once closed or
        /// given up. On the watch it retries `patience` times, yielding,
        /// then falls asleep; asleep, it sleeps until signalled. With
        /// `give_up` it leaves after that many failed retries, as an
        /// `add_timeout` whose deadline passed.
        fn take(&self, patience: u32, give_up: Option<u32>) -> bool {
            if self.try_take() {
                return true;
            }
            let mut me = Blocked::join(&self.watch);
            let (mut tries, mut failed) = (0, 0);
            loop {
                if self.try_take() {
                    return true;
                }
                if self.closed.load(SeqCst) {
                    return false;
                }
                failed += 1;
                if give_up.is_some_and(|n| failed > n) {
                    return false;
                }
                if me.is_asleep() {
                    me.sleep(Duration::from_secs(3600));
                    tries = 0;
                } else if tries < patience {
                    tries += 1;
                    thread::yield_now();
                } else {
                    me.fall_asleep();
                }
            }
        }
    }

    /// Starts `n` producers, each blocked in [`Pool::take`].
    fn blocked_producers(
        pool: &Arc<Pool>,
        n: usize,
        patience: u32,
    ) -> Vec<thread::JoinHandle<bool>> {
        (0..n)
            .map(|_| {
                let pool = Arc::clone(pool);
                thread::spawn(move || pool.take(patience, None))
            })
            .collect()
    }

    /// `n` producers blocked on a watch with room for `room`, and `n`
    /// buffers freed one after the other: each producer gets one, and the
    /// counts go back to zero.
    fn each_blocked_producer_gets_a_buffer(room: usize, n: usize, patience: u32) {
        let pool = Pool::new(room);
        let producers = blocked_producers(&pool, n, patience);
        for _ in 0..n {
            pool.free_one();
        }
        for p in producers {
            assert!(p.join().unwrap(), "a producer got no buffer");
        }
        assert_eq!(pool.watch.counts(), (0, 0, 0));
    }

    /// Two producers blocked, room on the watch for one, two buffers freed
    /// one after the other: both producers get one. Fails (deadlocks)
    /// without the worker's wake-up in `notify_freed` (both producers may
    /// be asleep), and without the call of a producer that leaves the
    /// watch empty (the watcher takes both signals' turn, the sleeper is
    /// never woken).
    #[test]
    fn every_freed_buffer_reaches_a_blocked_producer() {
        for patience in [0, 1] {
            loom::model(move || each_blocked_producer_gets_a_buffer(1, 2, patience));
        }
    }

    /// Three producers blocked, room on the watch for two, three buffers
    /// freed: each producer gets one, in every order the sleepers queue in
    /// (loom's `notify_one` wakes the first waiter).
    /// At most 2 preemptions (about a minute; 3 would take far longer).
    #[test]
    fn three_producers_two_on_the_watch() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(builder.preemption_bound.map_or(2, |b| b.min(2)));
        builder.check(|| each_blocked_producer_gets_a_buffer(2, 3, 0));
    }

    /// One producer takes two buffers one after the other, the other one;
    /// three buffers are freed one after the other: every take gets one.
    /// A take waits only if no buffer is free yet, so the first producer
    /// blocks twice in a row (as a producer does whose every add waits)
    /// only in the interleavings where the frees come late; there its
    /// second block starts from whatever its first left behind (the
    /// counts, a signal it slept through, a turn on the watch it was
    /// called to).
    #[test]
    fn a_producer_that_blocks_twice() {
        loom::model(|| {
            let pool = Pool::new(1);
            let twice = {
                let pool = Arc::clone(&pool);
                thread::spawn(move || pool.take(0, None) && pool.take(0, None))
            };
            let once = blocked_producers(&pool, 1, 0);
            for _ in 0..3 {
                pool.free_one();
            }
            assert!(twice.join().unwrap(), "the second block got no buffer");
            for p in once {
                assert!(p.join().unwrap(), "a producer got no buffer");
            }
            assert_eq!(pool.watch.counts(), (0, 0, 0));
        });
    }

    /// One producer gives up after its first failed retry (on the watch,
    /// or asleep when it joined behind the other), the other waits; two
    /// buffers are freed: the one that waits gets one, whether or not the
    /// other took one before it left.
    #[test]
    fn a_producer_giving_up_leaves_nobody_asleep_behind_it() {
        loom::model(|| {
            let pool = Pool::new(1);
            let quitter = {
                let pool = Arc::clone(&pool);
                thread::spawn(move || pool.take(0, Some(1)))
            };
            let waiter = blocked_producers(&pool, 1, 0);
            pool.free_one();
            pool.free_one();
            let _ = quitter.join().unwrap();
            for p in waiter {
                assert!(p.join().unwrap(), "the waiting producer got no buffer");
            }
            assert_eq!(pool.watch.counts(), (0, 0, 0));
        });
    }

    /// Two producers blocked, one buffer freed, then a close: each producer
    /// gets the buffer or sees the close; none sleeps through it.
    #[test]
    fn a_close_wakes_every_blocked_producer() {
        loom::model(|| {
            let pool = Pool::new(1);
            let producers = blocked_producers(&pool, 2, 0);
            pool.free_one();
            pool.close();
            let got: usize = producers
                .into_iter()
                .map(|p| usize::from(p.join().unwrap()))
                .sum();
            assert!(got <= 1, "two producers took one buffer");
            assert_eq!(pool.watch.counts(), (0, 0, 0));
        });
    }
}
