//! The std batcher: the core algorithm plus a worker thread, linger and
//! sleeping back-pressure.

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use snail::relax::Yield;
use snail::{Added, BiasedLock, CachePadded, Full, HeapStorage, RawBatcher, SizeError};

use crate::bias::ThreadBias;
use crate::route;
use crate::watch::{Blocked, Watch};
use crate::worker::Consumer;

use crate::error::{BuildError, Closed, HandlerPanicked, TryAddError};

type Lock = BiasedLock<ThreadBias, Yield>;
type Storage<T> = HeapStorage<T, Lock>;
pub(crate) type Core<T> = RawBatcher<T, Storage<T>, Lock, Yield>;

/// One batch, as the handler sees it: derefs to `[T]` and `&mut [T]`;
/// [`drain`](snail::Batch::drain) moves the items out. What the handler
/// leaves in it is dropped after the handler returns.
pub type Batch<'a, T> = snail::Batch<'a, T, Storage<T>, Lock, Yield>;

/// Failed attempts a blocked `add` on the watch spends spinning...
const SPINS: u32 = 32;
/// ...and then yielding, before it sleeps (a unit test can keep a producer
/// on the watch longer: `STAYS_ON_WATCH`).
const YIELDS: u32 = 200;

/// While spinning and yielding, a blocked `add` retries when a buffer is
/// free, and after this many failed attempts without one.
const RECHECK: u32 = 16;

#[cfg(test)]
thread_local! {
    /// Set by a unit test on a producer thread that must stay on the watch
    /// however long it waits (it never falls asleep from it).
    static STAYS_ON_WATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `true` if this blocked producer keeps watching past `YIELDS` (only a
/// unit test's producer does).
#[inline(always)]
fn stays_on_watch() -> bool {
    #[cfg(test)]
    return STAYS_ON_WATCH.with(std::cell::Cell::get);
    #[cfg(not(test))]
    false
}

/// The most shards a batcher has by default (one per CPU up to this), and
/// at all.
const MAX_DEFAULT_SHARDS: usize = 64;
const MAX_SHARDS: usize = 1024;
/// At most this many blocked producers spin and yield at one time (the
/// watch, see `crate::watch`); the others sleep. Chosen on 2 and 16 cores:
/// 1 and 2 lost throughput there, 8 gained nothing.
const WATCH: usize = 4;
/// A sleeping `add` re-checks at least this often, and then joins the watch
/// (a safety net, and a bound on how long a sleeper waits for its turn;
/// wake-ups normally come from the worker or from a producer leaving the
/// watch). An hour in the unit tests, so that a lost wake-up hangs them.
const SLEEP_SLICE: Duration = if cfg!(test) {
    Duration::from_secs(3600)
} else {
    Duration::from_millis(100)
};

/// What the worker delivered, from [`Batcher::close`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Items handed to the handler.
    pub items: u64,
    /// Batches handed to the handler.
    pub batches: u64,
    /// Batches for which the handler returned an error.
    pub handler_errors: u64,
}

/// A snapshot of a batcher's counters, from [`Batcher::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Items accepted.
    pub added: u64,
    /// Adds that found no room without waiting: `try_add` calls refused
    /// because every buffer was in use or the batcher was closed, and
    /// `add_many` items that found no buffer (each then waits as in `add`).
    pub refused: u64,
    /// Batches sealed because they were full.
    pub sealed_full: u64,
    /// Partial batches sealed by `flush`, linger or close, after a handler
    /// panic, or as a thread moved to another shard.
    pub sealed_partial: u64,
    /// Of those, sealed because their linger ran out.
    pub lingered: u64,
    /// Items accepted and not yet handed to the worker.
    pub held: u64,
    /// What the worker delivered so far.
    pub delivered: Report,
}

/// When a producer blocked for a buffer runs the handler itself, from
/// [`Builder::help_when_blocked`].
///
/// A blocked producer waits for the worker to free a buffer. With more
/// runnable threads than CPUs the worker waits for a CPU too, behind the
/// producers that wait for it; a producer that handles the oldest sealed
/// batch itself frees a buffer without that wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Help {
    /// Never: the handler runs on the worker thread only.
    Never,
    /// While at least as many producers are blocked as there are CPUs
    /// ([`std::thread::available_parallelism`]): the producers alone can
    /// then occupy every CPU, and the worker cannot count on one. With
    /// fewer producers than CPUs this is [`Never`](Self::Never).
    #[default]
    WhenOversubscribed,
    /// Whenever a producer is blocked and watching for a buffer (the first
    /// few blocked, after a short spin; sleepers do not help), a sealed batch
    /// waits, and no other thread is running the handler.
    Always,
}

/// State shared by the producers, the worker and the owner.
pub(crate) struct Shared<T> {
    pub(crate) core: Core<T>,
    /// `None`: partial batches wait for `flush` or close.
    pub(crate) linger: Option<Duration>,
    pub(crate) start: Instant,
    /// Per shard: when its partial batch got its first item, in nanoseconds
    /// since `start`, plus one; 0 when it has none (or the worker already
    /// sealed it). May be stale (older) after a batch sealed full, which
    /// only makes the worker look at that shard early.
    pub(crate) opened: Box<[AtomicU64]>,
    /// `shards - 1`; the shard count is a power of two.
    pub(crate) mask: usize,
    /// This, for routes that other threads keep to it.
    pub(crate) me: Weak<dyn Any + Send + Sync>,
    /// The worker is about to park or parked: unpark it after sealing.
    pub(crate) worker_idle: AtomicBool,
    pub(crate) worker: OnceLock<Thread>,
    /// Set after `core.close()` returned: every accepted item is sealed.
    pub(crate) closing: AtomicBool,
    /// Set when the batcher was dropped inside its own handler: nobody joins
    /// the worker, so it reports a handler panic on stderr itself.
    pub(crate) orphaned: AtomicBool,
    /// Where producers blocked for a buffer wait.
    pub(crate) watch: Watch,
    /// A producer blocked for a buffer handles a batch itself while at
    /// least this many producers are blocked
    /// ([`Builder::help_when_blocked`]).
    help_from: usize,
    /// What the thread running the handler writes for every batch.
    pub(crate) handler: CachePadded<HandlerSide<T>>,
}

/// What the thread running the handler writes for every batch, on lines of
/// its own: a producer that seals a batch reads the fields of [`Shared`]
/// around it (`worker_idle`, `linger`, `start`), and with these among them
/// it would miss on those lines after every batch the worker handled, and
/// the worker on them again for the next batch.
pub(crate) struct HandlerSide<T> {
    /// The handler, locked by whoever runs it on a batch.
    consumer: Mutex<Consumer<T>>,
    /// The number (`bias::thread_number`) of the thread running the handler
    /// or dropping it, or 0: see `worker::in_handler`.
    pub(crate) handling: AtomicUsize,
    pub(crate) delivered_items: AtomicU64,
    pub(crate) delivered_batches: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) lingered: AtomicU64,
}

impl<T> Shared<T> {
    pub(crate) fn now_nanos(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Seals `shard`'s partial batch, if any, and wakes the worker for it.
    pub(crate) fn flush_shard(&self, shard: usize) {
        if self.core.producer(shard).flush() {
            self.wake_worker();
        }
    }

    /// What the handler was handed so far (the worker's report as last
    /// published).
    pub(crate) fn delivered(&self) -> Report {
        let h = &*self.handler;
        Report {
            items: h.delivered_items.load(Relaxed),
            batches: h.delivered_batches.load(Relaxed),
            handler_errors: h.handler_errors.load(Relaxed),
        }
    }

    /// `true` while enough producers are blocked that they may run the
    /// handler themselves ([`Builder::help_when_blocked`]).
    #[inline]
    pub(crate) fn may_help(&self) -> bool {
        self.watch.blocked() >= self.help_from
    }

    /// Wakes the worker if it is parked or about to park.
    #[inline]
    pub(crate) fn wake_worker(&self) {
        if self.worker_idle.load(SeqCst) {
            if let Some(worker) = self.worker.get() {
                worker.unpark();
            }
        }
    }

    /// Locks the handler (a handler panic never poisons it: it is caught
    /// inside).
    pub(crate) fn lock_consumer(&self) -> std::sync::MutexGuard<'_, Consumer<T>> {
        self.handler
            .consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// [`lock_consumer`](Self::lock_consumer) if no other thread holds it.
    pub(crate) fn try_lock_consumer(&self) -> Option<std::sync::MutexGuard<'_, Consumer<T>>> {
        match self.handler.consumer.try_lock() {
            Ok(consumer) => Some(consumer),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Closes the core, lets the worker drain and stop, and wakes blocked
    /// producers (they get `Closed`).
    fn begin_close(&self) {
        self.core.close();
        self.closing.store(true, SeqCst);
        self.watch.notify_closed();
        if let Some(thread) = self.worker.get() {
            thread.unpark();
        }
    }
}

/// Configures and starts a [`Batcher`]; from [`Batcher::builder`].
pub struct Builder<T> {
    batch_size: usize,
    queue_size: usize,
    linger: Duration,
    shards: Option<usize>,
    help: Help,
    name: Option<String>,
    on_error: Option<ErrorHook>,
    _items: PhantomData<fn(T)>,
}

pub(crate) type ErrorHook = Box<dyn FnMut(&dyn fmt::Display) + Send>;

impl<T> fmt::Debug for Builder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("batch_size", &self.batch_size)
            .field("queue_size", &self.queue_size)
            .field("linger", &self.linger)
            .field("shards", &self.shards)
            .field("help_when_blocked", &self.help)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Builder<T> {
    /// Items per batch (default 1000). A batch sealed because it is full
    /// holds exactly this many.
    pub fn batch_size(mut self, items: usize) -> Self {
        self.batch_size = items;
        self
    }

    /// Room for sealed batches waiting for the worker (default 2000), beyond
    /// the batches being filled, one per shard: `buffers = shards +
    /// ceil(queue_size / batch_size)` (as in Go snail, which has one shard).
    /// 0 means one buffer per shard: producers may wait whenever the worker
    /// holds one (the buffers are shared by all shards).
    pub fn queue_size(mut self, items: usize) -> Self {
        self.queue_size = items;
        self
    }

    /// How long a partial batch may wait for more items, counted from its
    /// first item (default 10 ms). The worker seals it then, or after the
    /// handler call under way then returns, and it queues behind the batches
    /// sealed before it. `Duration::ZERO` hands a partial batch to the
    /// worker as soon as it is free; `Duration::MAX` disables linger
    /// (partial batches wait for [`Batcher::flush`] or close).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Producer shards, each with its own lock and buffer being filled. On
    /// Linux a thread adds through the shard of the CPU it runs on, so that
    /// producers running at the same moment do not share a lock. A thread
    /// moves only after one of its adds sealed a batch, when none of its
    /// items is left unsealed on the shard it leaves (after an `add_many`
    /// that went on into a new batch, it seals that one first), so its
    /// order holds. Elsewhere each thread keeps one shard. Each shard has a
    /// buffer of its own (see [`queue_size`](Self::queue_size)). Default:
    /// the number of CPUs, at most 64. Values above 1024 are lowered to
    /// 1024; the count is then rounded down to a power of two.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// When a producer that is blocked because every buffer is in use may
    /// run the handler itself on the oldest sealed batch (if no other thread
    /// is running it) instead of waiting for the worker. Default:
    /// [`Help::WhenOversubscribed`].
    ///
    /// Batches still reach the handler one at a time and in order, and
    /// [`Report`], [`on_error`](Self::on_error) and handler panics work as
    /// on the worker; but the handler may then run on producer threads, and
    /// an `add` may take as long as a handler call (`add_timeout` never
    /// helps). Choose [`Help::Never`] for a handler that must stay on the
    /// worker thread (thread-locals, thread affinity).
    pub fn help_when_blocked(mut self, help: Help) -> Self {
        self.help = help;
        self
    }

    /// The worker thread's name (default `snail-worker`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Called with each error the handler returns, on the thread that ran
    /// the handler (the worker, or a helping producer: see
    /// [`help_when_blocked`](Self::help_when_blocked)); the error is also
    /// counted in [`Report::handler_errors`].
    pub fn on_error(mut self, hook: impl FnMut(&dyn fmt::Display) + Send + 'static) -> Self {
        self.on_error = Some(Box::new(hook));
        self
    }

    /// Allocates the buffers and starts the worker thread, which calls
    /// `handler` once per batch, in order.
    ///
    /// Batches reach the handler one at a time: on the worker thread, or on
    /// a producer that is blocked for a buffer (see
    /// [`help_when_blocked`](Self::help_when_blocked)). The handler must not
    /// wait on its own batcher: only the handler frees buffers, so an
    /// [`add`](Batcher::add) from inside it waits forever once every buffer
    /// is in use (use [`try_add`](Batcher::try_add), which hands the item
    /// back). [`close`](Batcher::close) and dropping the batcher from
    /// inside it close without waiting, and the rest is delivered after it
    /// returns.
    ///
    /// # Errors
    ///
    /// [`BuildError`] for a zero batch size or shard count, buffers that do
    /// not fit in memory, a thread name with a NUL byte, or a thread that
    /// cannot be started.
    pub fn spawn<F, E>(self, handler: F) -> Result<Batcher<T>, BuildError>
    where
        F: FnMut(&mut Batch<'_, T>) -> Result<(), E> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        if self.batch_size == 0 {
            return Err(BuildError::ZeroBatchSize);
        }
        // `thread::Builder::spawn` panics on such a name.
        if self.name.as_ref().is_some_and(|n| n.contains('\0')) {
            return Err(BuildError::NameWithNul);
        }
        crate::bias::init();
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let shards = match self.shards {
            Some(0) => return Err(BuildError::ZeroShards),
            Some(n) => n.min(MAX_SHARDS),
            None => cpus.min(MAX_DEFAULT_SHARDS),
        };
        // Round down to a power of two, so a thread's shard is a mask away.
        let shards = 1 << shards.ilog2();
        let buffers = self
            .queue_size
            .div_ceil(self.batch_size)
            .checked_add(shards)
            .ok_or(BuildError::TooLarge)?;
        let storage = Storage::new(self.batch_size, buffers, shards).map_err(|e| match e {
            SizeError::ZeroBatch => BuildError::ZeroBatchSize,
            SizeError::Shards => BuildError::ZeroShards,
            SizeError::ZeroBuffers | SizeError::TooLarge => BuildError::TooLarge,
        })?;
        let shared = Arc::new_cyclic(|me: &Weak<Shared<T>>| Shared {
            me: me.clone(),
            core: Core::with_storage(storage),
            linger: (self.linger != Duration::MAX).then_some(self.linger),
            start: Instant::now(),
            opened: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            mask: shards - 1,
            worker_idle: AtomicBool::new(false),
            worker: OnceLock::new(),
            closing: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
            watch: Watch::new(WATCH),
            help_from: match self.help {
                Help::Never => usize::MAX,
                Help::WhenOversubscribed => cpus,
                Help::Always => 1,
            },
            handler: CachePadded::new(HandlerSide {
                consumer: Mutex::new(Consumer::new(handler, self.on_error)),
                handling: AtomicUsize::new(0),
                delivered_items: AtomicU64::new(0),
                delivered_batches: AtomicU64::new(0),
                handler_errors: AtomicU64::new(0),
                lingered: AtomicU64::new(0),
            }),
        });
        let worker_shared = Arc::clone(&shared);
        let worker = thread::Builder::new()
            .name(self.name.unwrap_or_else(|| "snail-worker".into()))
            .spawn(move || crate::worker::run(&worker_shared))
            .map_err(BuildError::Spawn)?;
        // Set before the batcher is returned, so every producer finds it.
        let _ = shared.worker.set(worker.thread().clone());
        Ok(Batcher {
            shared,
            worker: Mutex::new(Some(worker)),
            outcome: OnceLock::new(),
        })
    }
}

/// Dropped only if an `add_many`'s iterator panics, after it added items
/// to shard `.1` that [`Batcher::added`] never hears of: wakes the worker
/// for the batches they may have sealed and starts the shard's linger
/// clock, unless one runs (an older stamp only seals the partial batch
/// sooner).
struct Unwinding<'a, T>(&'a Shared<T>, usize);

impl<T> Drop for Unwinding<'_, T> {
    fn drop(&mut self) {
        let Unwinding(shared, shard) = *self;
        if shared.linger.is_some() {
            let now = shared.now_nanos() + 1;
            let _ = shared.opened[shard].compare_exchange(0, now, SeqCst, Relaxed);
        }
        shared.wake_worker();
    }
}

/// How a blocked add waits.
#[derive(Clone, Copy)]
enum Wait {
    /// Until a buffer is free, helping as [`Help`] allows (`add`).
    Helping,
    /// Until the deadline, if any, never running the handler: a handler call
    /// could outlast the deadline (`add_timeout`).
    Until(Option<Instant>),
}

/// Many producers add items; a worker thread receives them in batches.
///
/// `Send + Sync` for `T: Send`: share it by reference (scoped threads) or in
/// an `Arc`. See the [crate docs](crate) for the guarantees.
pub struct Batcher<T> {
    shared: Arc<Shared<T>>,
    worker: Mutex<Option<JoinHandle<Result<Report, HandlerPanicked>>>>,
    outcome: OnceLock<Result<Report, HandlerPanicked>>,
}

impl<T> fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("batch_size", &self.shared.core.batch_size())
            .field("buffers", &self.shared.core.buffers())
            .field("shards", &self.shared.core.shards())
            .field("linger", &self.shared.linger)
            .field("closed", &self.shared.core.is_closed())
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts configuring a batcher.
    pub fn builder() -> Builder<T> {
        Builder {
            batch_size: 1000,
            queue_size: 2000,
            linger: Duration::from_millis(10),
            shards: None,
            help: Help::default(),
            name: None,
            on_error: None,
            _items: PhantomData,
        }
    }
}

impl<T> Batcher<T> {
    /// The shard for this thread's next add (see [`route`]: it follows the
    /// thread's CPU while keeping its items in order), and a producer for it.
    #[inline]
    fn producer(&self) -> (usize, snail::Producer<'_, T, Storage<T>, Lock, Yield>) {
        let shard = route::pick(&self.shared);
        (shard, self.shared.core.producer(shard))
    }

    /// After an accepted add: start the shard's linger clock, wake the
    /// worker.
    #[inline(always)]
    fn added(&self, shard: usize, done: Added) {
        // `|`, not `||`: one test of both flags.
        if done.opened | done.sealed {
            self.opened_or_sealed(shard, done.opened, done.sealed);
        }
    }

    /// [`added`](Self::added) for an add that opened or sealed a batch (once
    /// per batch), out of the add path's straight line.
    #[cold]
    #[inline(never)]
    fn opened_or_sealed(&self, shard: usize, opened: bool, sealed: bool) {
        if opened && self.shared.linger.is_some() {
            self.note_open(shard);
        }
        if sealed {
            self.shared.wake_worker();
            route::after_seal(&self.shared, opened);
        }
    }

    #[cold]
    fn note_open(&self, shard: usize) {
        let shared = &*self.shared;
        let now = shared.now_nanos() + 1;
        // A worker with no clock to watch may be parked without a deadline.
        if shared.opened[shard].swap(now, SeqCst) == 0 {
            shared.wake_worker();
        }
    }

    /// Adds `item` if a buffer has room, without waiting.
    ///
    /// # Errors
    ///
    /// [`TryAddError::Full`] when every buffer is in use,
    /// [`TryAddError::Closed`] once the batcher is closed; both hand the
    /// item back.
    #[inline]
    pub fn try_add(&self, item: T) -> Result<(), TryAddError<T>> {
        let (shard, producer) = self.producer();
        match producer.try_add(item) {
            Ok(done) => {
                self.added(shard, done);
                Ok(())
            }
            Err(Full(item)) => Err(self.refusal(item)),
        }
    }

    /// Adds `item`, blocking while every buffer is in use: it spins
    /// briefly, yields, then sleeps until the worker frees a buffer. While
    /// it yields it may run the handler on the oldest sealed batch itself:
    /// by default only while at least as many producers are blocked as
    /// there are CPUs (see [`Builder::help_when_blocked`]).
    ///
    /// # Errors
    ///
    /// [`Closed`] with the item once the batcher is closed (also while it
    /// waits), or after the handler panicked.
    #[inline]
    pub fn add(&self, item: T) -> Result<(), Closed<T>> {
        self.add_until(item, Wait::Helping)
            .map_err(|e| Closed(e.into_inner()))
    }

    /// Like [`add`](Self::add), but waits at most `timeout`. It never runs
    /// the handler, whatever [`Builder::help_when_blocked`] says.
    ///
    /// # Errors
    ///
    /// [`TryAddError::Full`] when the wait ran out, [`TryAddError::Closed`]
    /// when the batcher is closed; both hand the item back.
    pub fn add_timeout(&self, item: T, timeout: Duration) -> Result<(), TryAddError<T>> {
        // A deadline past what `Instant` can hold means no deadline.
        self.add_until(item, Wait::Until(Instant::now().checked_add(timeout)))
    }

    /// Adds every item of `items`, blocking like [`add`](Self::add) while
    /// every buffer is in use. Items are moved in under one lock while they
    /// fit, so the iterator runs with a shard lock held: keep it cheap, and
    /// never add to this batcher from inside it. If it panics, the items it
    /// yielded before are kept and delivered like any others.
    ///
    /// # Errors
    ///
    /// [`Closed`] with the first item that was refused because the batcher
    /// closed; the items after it are left in the iterator, which is dropped.
    pub fn add_many<I: IntoIterator<Item = T>>(&self, items: I) -> Result<(), Closed<T>> {
        let mut iter = items.into_iter();
        loop {
            // Picked again after each refused item: `add` may have moved
            // this thread to another shard, and the rest must follow it.
            let (shard, producer) = self.producer();
            let unwinding = Unwinding(&self.shared, shard);
            let (done, refused) = producer.try_extend(&mut iter);
            mem::forget(unwinding);
            self.added(shard, done);
            match refused {
                None => return Ok(()),
                Some(item) => self.add(item)?,
            }
        }
    }

    fn refusal(&self, item: T) -> TryAddError<T> {
        if self.shared.core.is_closed() {
            TryAddError::Closed(item)
        } else {
            TryAddError::Full(item)
        }
    }

    #[inline]
    fn add_until(&self, item: T, wait: Wait) -> Result<(), TryAddError<T>> {
        let (shard, producer) = self.producer();
        match producer.add_with(item, || false) {
            Ok(done) => {
                self.added(shard, done);
                Ok(())
            }
            Err(Full(item)) if self.shared.core.is_closed() => Err(TryAddError::Closed(item)),
            Err(Full(item)) => self.wait_and_add(item, wait),
        }
    }

    /// The slow path of a blocked add: on the watch (spin, then yield),
    /// or asleep on the condvar when the watch is full or nothing was freed
    /// for a while, until a buffer is free, the batcher closes or the
    /// deadline passes.
    #[cold]
    fn wait_and_add(&self, item: T, wait: Wait) -> Result<(), TryAddError<T>> {
        let shared = &*self.shared;
        let (deadline, may_help) = match wait {
            Wait::Helping => (None, true),
            Wait::Until(deadline) => (deadline, false),
        };
        let (shard, producer) = self.producer();
        let mut attempts = 0u32;
        // Join the watch if it has room, else register as a sleeper; then
        // retry (add_with's first attempt) before any sleep: see `watch`.
        let mut me = Blocked::join(&shared.watch);
        let result = producer.add_with(item, || loop {
            if let Some(deadline) = deadline {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            if me.is_asleep() {
                me.sleep(match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()).min(SLEEP_SLICE),
                    None => SLEEP_SLICE,
                });
                attempts = 0;
                return true;
            }
            attempts += 1;
            if attempts <= SPINS {
                std::hint::spin_loop();
            } else if attempts <= SPINS + YIELDS || stays_on_watch() {
                // Retry at once after handling a batch: that freed a buffer.
                if may_help
                    && shared.may_help()
                    && shared.core.has_sealed()
                    && crate::worker::help(shared)
                {
                    return true;
                }
                thread::yield_now();
            } else {
                // Nothing freed for a while: sleep (as on entry).
                me.fall_asleep();
                return true;
            }
            // Retrying takes the shard lock, and with it the shard's bias
            // from the producer that fills it: retry while spinning or
            // yielding only once a buffer is free, and now and then in case
            // another producer opened one on this shard.
            if shared.core.has_free() || attempts % RECHECK == 0 || shared.core.is_closed() {
                return true;
            }
        });
        drop(me);
        match result {
            Ok(done) => {
                self.added(shard, done);
                Ok(())
            }
            Err(Full(item)) => Err(self.refusal(item)),
        }
    }

    /// Hands the partial batches to the worker now. Returns `true` if there
    /// was one.
    pub fn flush(&self) -> bool {
        let sealed = self.shared.core.flush();
        if sealed {
            self.shared.wake_worker();
        }
        sealed
    }

    /// Items per batch.
    pub fn batch_size(&self) -> usize {
        self.shared.core.batch_size()
    }

    /// Number of producer shards.
    pub fn shards(&self) -> usize {
        self.shared.core.shards()
    }

    /// Number of buffers (`shards + ceil(queue_size / batch_size)`).
    pub fn buffers(&self) -> usize {
        self.shared.core.buffers()
    }

    /// Most items ever held: `batch_size × buffers`.
    pub fn capacity(&self) -> usize {
        self.shared.core.capacity()
    }

    /// `true` once closed (by `close`, drop, or a handler panic).
    pub fn is_closed(&self) -> bool {
        self.shared.core.is_closed()
    }

    /// A snapshot of the counters. It takes each shard's lock to count the
    /// items held, so a thread that owns a shard's biased lock loses it:
    /// polled often, it slows the producers down.
    pub fn stats(&self) -> Stats {
        let core = self.shared.core.stats();
        let s = &*self.shared;
        Stats {
            added: core.added as u64,
            refused: core.refused as u64,
            sealed_full: core.sealed_full as u64,
            sealed_partial: core.sealed_flush.wrapping_add(core.sealed_tick) as u64,
            lingered: s.handler.lingered.load(Relaxed),
            held: s.core.len() as u64,
            delivered: s.delivered(),
        }
    }

    /// Seals the partial batches, refuses further items, waits until the
    /// worker has handled every batch, joins it and returns what it
    /// delivered. Calling it again returns the same outcome.
    ///
    /// Producers blocked in `add` get [`Closed`] with their item back.
    ///
    /// Called from inside the handler, it cannot wait for the handler: it
    /// closes the batcher and returns at once with what was delivered
    /// before this batch. The batches still queued are delivered after the
    /// handler returns; a later call from outside the handler waits for
    /// them and returns the final outcome.
    ///
    /// # Errors
    ///
    /// [`HandlerPanicked`] if the handler panicked: it says with what
    /// message and how many items were dropped because of it.
    pub fn close(&self) -> Result<Report, HandlerPanicked> {
        let shared = &*self.shared;
        if crate::worker::in_handler(shared) {
            shared.begin_close();
            return Ok(shared.delivered());
        }
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = self.outcome.get_or_init(|| {
            let handle = worker.take();
            shared.begin_close();
            match handle.map(JoinHandle::join) {
                Some(Ok(outcome)) => outcome,
                // The worker catches handler panics; this is a panic in the
                // worker itself (an item's destructor, say).
                Some(Err(payload)) => Err(HandlerPanicked {
                    message: crate::worker::panic_message(&*payload),
                    batch_items: 0,
                    dropped_items: shared.core.len() as u64,
                    report: shared.delivered(),
                }),
                None => Ok(Report::default()),
            }
        });
        let outcome = outcome.clone();
        drop(worker);
        outcome
    }
}

impl<T> Drop for Batcher<T> {
    /// Closes the batcher: every accepted item is delivered first. A handler
    /// panic is reported on stderr, as nobody is left to receive the error.
    ///
    /// Dropped inside its own handler (the handler held the last `Arc`), or
    /// with the handler, it does not wait: the worker delivers what is
    /// queued once the handler returns, and then ends on its own (a process
    /// that exits before then loses those items, as with any detached
    /// thread).
    fn drop(&mut self) {
        let shared = &*self.shared;
        if crate::worker::in_handler(shared) {
            shared.orphaned.store(true, SeqCst);
            shared.begin_close();
            return; // the worker's handle is dropped: it runs on, detached
        }
        let first = self.outcome.get().is_none();
        if let Err(e) = self.close() {
            if first {
                eprintln!("snail-std: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Blocked producers of every kind (`add`, `add_many`, `add_timeout`
    /// that gives up and retries, helping or not) on a batcher with one
    /// spare buffer, with the sleep slice at an hour (`cfg(test)`). A
    /// coarse check: it hangs (and fails at the 120 s limit) when the worker
    /// wakes no sleeper at all; the call of a producer leaving the watch
    /// empty has a test of its own.
    #[test]
    fn blocked_producers_are_woken_without_the_sleep_slice() {
        const PRODUCERS: u64 = 24;
        const PER: u64 = 4000;
        for help in [Help::Never, Help::Always] {
            let batcher = Arc::new(
                Batcher::<u64>::builder()
                    .batch_size(4)
                    .queue_size(4)
                    .shards(2)
                    .help_when_blocked(help)
                    .spawn(|batch| {
                        // Now and then slow, so that producers sleep.
                        if batch[0] % 64 == 0 {
                            thread::sleep(Duration::from_micros(200));
                        }
                        Ok::<(), String>(())
                    })
                    .unwrap(),
            );
            let (done_tx, done_rx) = mpsc::channel();
            for p in 0..PRODUCERS {
                let (batcher, done_tx) = (Arc::clone(&batcher), done_tx.clone());
                thread::spawn(move || {
                    let items = (p * PER..(p + 1) * PER).collect::<Vec<_>>();
                    match p % 3 {
                        0 => items.iter().for_each(|&i| batcher.add(i).unwrap()),
                        1 => items.chunks(7).for_each(|c| {
                            batcher.add_many(c.iter().copied()).unwrap();
                        }),
                        _ => {
                            for &i in &items {
                                let mut item = i;
                                while let Err(e) =
                                    batcher.add_timeout(item, Duration::from_micros(50))
                                {
                                    match e {
                                        TryAddError::Full(back) => item = back,
                                        TryAddError::Closed(_) => panic!("closed"),
                                    }
                                }
                            }
                        }
                    }
                    done_tx.send(()).unwrap();
                });
            }
            for p in 0..PRODUCERS {
                done_rx
                    .recv_timeout(Duration::from_secs(120))
                    .unwrap_or_else(|_| panic!("{help:?}: {p} of {PRODUCERS} producers finished"));
            }
            let report = batcher.close().unwrap();
            assert_eq!(report.items, PRODUCERS * PER, "{help:?}");
        }
    }

    /// While blocked producers may help, the worker's `handle_sealed`
    /// hands one batch to the handler and lets go of it, instead of going
    /// on to the next batch: holding the handler across batches shut
    /// helpers out for as long as batches kept coming (under
    /// qemu-aarch64, a test timed out on it). With nobody blocked it goes
    /// on. The test holds the handler's lock and acts as the worker.
    #[test]
    fn the_worker_lets_go_of_the_handler_between_batches_while_producers_may_help() {
        let (tx, rx) = mpsc::channel();
        let b = Batcher::<u64>::builder()
            .batch_size(1)
            .queue_size(8)
            .linger(Duration::MAX)
            .shards(1)
            .help_when_blocked(Help::Always)
            .spawn(move |batch| {
                tx.send(batch[0]).unwrap();
                Ok::<(), String>(())
            })
            .unwrap();
        let shared = &*b.shared;
        let mut consumer = shared.lock_consumer(); // the worker waits for it
        (0..3).for_each(|i| b.try_add(i).unwrap()); // three sealed batches
        let blocked = Blocked::join(&shared.watch);
        assert!(shared.may_help());
        assert!(consumer.handle_sealed(shared, u64::MAX));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0], "one batch only");
        drop(blocked);
        assert!(!shared.may_help());
        assert!(consumer.handle_sealed(shared, u64::MAX));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2], "the rest");
        assert!(!consumer.handle_sealed(shared, u64::MAX), "none left");
        drop(consumer);
        assert_eq!(b.close().unwrap().items, 3);
    }

    /// The fields that a producer reads when it seals a batch share no
    /// 128-byte block (a line and its pair, which Intel's adjacent-line
    /// prefetcher fetches together) with what the handler's thread writes
    /// for every batch.
    ///
    /// Only where `CachePadded` pads to 128 bytes.
    #[test]
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "powerpc64"
    ))]
    fn what_the_handler_writes_shares_no_line_with_what_sealing_reads() {
        use std::mem::{offset_of, size_of};
        type S = Shared<u64>;
        let handler = offset_of!(S, handler);
        let written =
            handler / 128..(handler + size_of::<CachePadded<HandlerSide<u64>>>()).div_ceil(128);
        let read = [
            (
                "worker_idle",
                offset_of!(S, worker_idle),
                size_of::<AtomicBool>(),
            ),
            (
                "worker",
                offset_of!(S, worker),
                size_of::<OnceLock<Thread>>(),
            ),
            (
                "linger",
                offset_of!(S, linger),
                size_of::<Option<Duration>>(),
            ),
            ("start", offset_of!(S, start), size_of::<Instant>()),
            (
                "opened",
                offset_of!(S, opened),
                size_of::<Box<[AtomicU64]>>(),
            ),
            ("mask", offset_of!(S, mask), size_of::<usize>()),
            ("core", offset_of!(S, core), size_of::<Core<u64>>()),
        ];
        for (name, offset, size) in read {
            let blocks = offset / 128..(offset + size).div_ceil(128);
            assert!(
                blocks.end <= written.start || written.end <= blocks.start,
                "{name} (bytes {offset}..{}) shares a block with the handler's fields {written:?}",
                offset + size
            );
        }
    }

    /// Waits (at most 60 s) until `cond` holds.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(60), "never: {what}");
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// A producer that leaves the watch empty calls a sleeper to it, so
    /// that the worker need not wake one for the next freed buffer. Five
    /// producers sleep on shard A, W watches on shard B, and every buffer is
    /// in use. The worker frees one buffer while W watches (so it wakes
    /// nobody) and then waits in the handler; W takes the buffer and leaves.
    /// Only W's call can now wake a sleeper: nothing is freed, nothing
    /// opened on A, and the sleep slice is an hour here. W stays on the
    /// watch however long it waits (`STAYS_ON_WATCH`), and the test counts
    /// the sleepers woken rather than looking for one on the watch, whose
    /// turn there is short (looking for it, a loaded CI machine missed it).
    #[test]
    fn a_producer_leaving_the_watch_empty_calls_a_sleeper_to_it() {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let handled = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&handled);
        let batcher = Arc::new(
            Batcher::<u64>::builder()
                .batch_size(2)
                .queue_size(2)
                .shards(2)
                .linger(Duration::MAX)
                .help_when_blocked(Help::Never)
                .spawn(move |_batch| {
                    // Each of the first two batches waits for a gate.
                    h.fetch_add(1, SeqCst);
                    let _ = gate_rx.recv();
                    Ok::<(), String>(())
                })
                .unwrap(),
        );
        assert_eq!(batcher.buffers(), 3);
        let (done_tx, done_rx) = mpsc::channel();
        let spawn_adder = |shard: usize, item: u64, stays_on_watch: bool| {
            let (b, tx) = (Arc::clone(&batcher), done_tx.clone());
            spawn_on_shard(shard, move || {
                STAYS_ON_WATCH.with(|s| s.set(stays_on_watch));
                b.add(item).unwrap();
                tx.send(item).unwrap();
            });
        };
        let (a, b) = (0, 1);
        // The worker holds one batch of A, a second of A and one of B wait.
        for (shard, item) in [(a, 1), (a, 2), (a, 3), (a, 4), (b, 5), (b, 6)] {
            spawn_adder(shard, item, false);
            assert_eq!(done_rx.recv_timeout(Duration::from_secs(60)), Ok(item));
        }
        eventually("the first batch in the handler", || {
            handled.load(SeqCst) == 1
        });
        let watch = &batcher.shared.watch;
        (10..15).for_each(|item| spawn_adder(a, item, false));
        eventually("five asleep", || matches!(watch.counts(), (0, 5, _)));
        // Nothing has signalled them: each sleeps until woken.
        assert_eq!(watch.woken(), 0);
        spawn_adder(b, 20, true);
        eventually("W on the watch", || watch.counts() == (1, 5, 6));
        assert_eq!(watch.woken(), 0);
        gate_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(60)), Ok(20));
        eventually("the worker in the second batch", || {
            handled.load(SeqCst) == 2
        });
        eventually("a sleeper woken", || watch.woken() == 1);
        // Its turn on the watch runs out (nothing is freed), and it sleeps
        // again: no other sleeper was woken meanwhile.
        eventually("all five asleep again", || watch.counts() == (0, 5, 5));
        assert_eq!(watch.woken(), 1);
        drop(gate_tx);
        for _ in 0..5 {
            assert!(done_rx.recv_timeout(Duration::from_secs(60)).is_ok());
        }
        assert_eq!(batcher.close().unwrap().items, 12);
    }

    /// A partial batch is sealed when its linger runs out even while full
    /// batches keep the worker busy: a producer keeps the queue full on one
    /// shard (a handler call takes 2 ms), a lone item waits on another.
    /// (Before 2026-11-28 the worker looked at the linger clocks only when
    /// it found no sealed batch, and the lone item waited for the busy
    /// producer to stop.) With 64 shards the lone item's thread keeps shard
    /// 63, which the busy producer takes only on a CPU numbered 63 or more.
    #[test]
    fn linger_seals_a_partial_batch_while_full_batches_keep_coming() {
        const LONE: u64 = u64::MAX;
        let (tx, rx) = mpsc::channel();
        let b = Arc::new(
            Batcher::<u64>::builder()
                .batch_size(100)
                .queue_size(400)
                .linger(Duration::from_millis(20))
                .shards(64)
                .help_when_blocked(Help::Never)
                .spawn(move |batch| {
                    thread::sleep(Duration::from_millis(2));
                    if batch.contains(&LONE) {
                        let _ = tx.send(Instant::now());
                    }
                    Ok::<(), String>(())
                })
                .unwrap(),
        );
        assert_eq!(b.shards(), 64);
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let (b, stop) = (Arc::clone(&b), Arc::clone(&stop));
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Relaxed) {
                    b.add(n).unwrap();
                    n += 1;
                }
            })
        };
        // The queue is full and stays so.
        while b.stats().held < 300 {
            thread::yield_now();
        }
        let added = loop {
            let (b, (at_tx, at_rx)) = (Arc::clone(&b), mpsc::channel());
            thread::spawn(move || {
                if crate::bias::thread_number() & 63 == 63 {
                    b.add(LONE).unwrap();
                    at_tx.send(Instant::now()).unwrap();
                }
            })
            .join()
            .unwrap();
            if let Ok(at) = at_rx.try_recv() {
                break at;
            }
        };
        let arrived = rx.recv_timeout(Duration::from_secs(10));
        stop.store(true, Relaxed);
        busy.join().unwrap();
        let waited =
            arrived.expect("the lone item came only after the busy producer stopped") - added;
        assert!(
            waited < Duration::from_secs(2),
            "the lone item waited {waited:?}"
        );
        b.close().unwrap();
    }

    /// Spawns threads until one has fixed shard `shard` (of 2: a thread
    /// keeps the shard its number picks until one of its adds seals a
    /// batch), which then runs `f`.
    fn spawn_on_shard(shard: usize, f: impl FnOnce() + Send + Clone + 'static) {
        loop {
            let (tx, rx) = mpsc::channel();
            let f = f.clone();
            thread::spawn(move || {
                let mine = crate::bias::thread_number() & 1 == shard;
                tx.send(mine).unwrap();
                if mine {
                    f();
                }
            });
            if rx.recv().unwrap() {
                return;
            }
        }
    }

    /// A handler panic on a helping producer, and then a panicking item
    /// destructor as the queued batches are dropped after it: the producer
    /// does not unwind out of its add, every blocked producer gets
    /// `Closed`, `close` reports the handler's panic, and the blocked path's
    /// counts end at zero.
    #[test]
    fn an_item_destructor_panicking_after_a_handler_panic_on_a_helper() {
        use std::cell::Cell;
        thread_local!(static ARMED: Cell<bool> = const { Cell::new(false) });
        static BLEW: AtomicBool = AtomicBool::new(false);
        struct Bomb(#[allow(dead_code)] u64);
        impl Drop for Bomb {
            fn drop(&mut self) {
                if ARMED.get() && !thread::panicking() {
                    ARMED.set(false);
                    BLEW.store(true, SeqCst);
                    panic!("an item's destructor");
                }
            }
        }
        let batcher = Arc::new(
            Batcher::<Bomb>::builder()
                .batch_size(2)
                .queue_size(8)
                .shards(1)
                .help_when_blocked(Help::Always)
                .name("snail-bomb-worker")
                .spawn(|batch| {
                    if thread::current().name() == Some("snail-bomb-worker") {
                        thread::sleep(Duration::from_micros(300));
                        return Ok::<(), String>(());
                    }
                    batch.drain().for_each(mem::forget);
                    ARMED.set(true);
                    panic!("the handler, on a helping producer");
                })
                .unwrap(),
        );
        let (tx, rx) = mpsc::channel();
        let producers: Vec<_> = (0..8)
            .map(|p| {
                let (b, tx) = (Arc::clone(&batcher), tx.clone());
                thread::spawn(move || {
                    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        for i in 0..1_000_000u64 {
                            if let Err(refused) = b.add(Bomb(p * 10_000_000 + i)) {
                                // Only the batches that `fail` drops.
                                ARMED.set(false);
                                drop(refused);
                                break;
                            }
                        }
                    }));
                    let _ = tx.send(unwound.is_err());
                })
            })
            .collect();
        for _ in 0..8 {
            let unwound = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a producer");
            assert!(!unwound, "a producer unwound out of add");
        }
        assert!(
            BLEW.load(SeqCst),
            "no destructor panicked in the drop after the handler's panic"
        );
        let failed = batcher.close().expect_err("the handler panicked");
        assert_eq!(failed.message, "the handler, on a helping producer");
        producers.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(batcher.shared.watch.counts(), (0, 0, 0));
    }
}
