//! The worker thread: takes sealed batches, runs the handler, seals partial
//! batches when their linger runs out, and sleeps when there is nothing to do.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::*;
use std::thread;
use std::time::{Duration, Instant};

use crate::batcher::{Batch, ErrorHook, Report, Shared};
use crate::bias::thread_number;
use crate::error::HandlerPanicked;

/// The longest the worker parks without a deadline (a safety net: producers
/// unpark it when there is work).
const IDLE_PARK: Duration = Duration::from_secs(1);

/// How long the worker yields, looking for a sealed batch after each yield,
/// before it parks.
const POLL_BEFORE_PARK: Duration = Duration::from_micros(50);

/// The handler with what it delivered: the worker runs it, and so may a
/// producer blocked for a buffer (see [`help`]), one batch at a time under
/// the lock of [`Shared::lock_consumer`].
pub(crate) struct Consumer<T> {
    /// `None` once the worker has finished: the handler is dropped then, on
    /// the worker thread, as `close` returns.
    handle: Option<Box<dyn HandleBatch<T>>>,
    report: Report,
    /// Set by whoever caught a handler panic; the worker returns it.
    failed: Option<HandlerPanicked>,
}

/// The handler and the error hook, behind one object-safe call.
trait HandleBatch<T>: Send {
    /// Runs the handler on `batch` and drops the items it left there;
    /// `Ok(false)` if the handler returned an error (the hook has seen
    /// it), `Err` with the payload if it (or an item's destructor)
    /// panicked.
    fn handle(&mut self, batch: &mut Batch<'_, T>) -> Result<bool, Box<dyn Any + Send>>;
}

struct Handler<F> {
    handler: F,
    on_error: Option<ErrorHook>,
}

impl<T, F, E> HandleBatch<T> for Handler<F>
where
    F: FnMut(&mut Batch<'_, T>) -> Result<(), E> + Send,
    E: fmt::Display,
{
    fn handle(&mut self, batch: &mut Batch<'_, T>) -> Result<bool, Box<dyn Any + Send>> {
        catch_unwind(AssertUnwindSafe(|| {
            let result = (self.handler)(batch);
            drop(batch.drain()); // what the handler left
            if let Err(e) = &result {
                if let Some(hook) = self.on_error.as_mut() {
                    hook(e);
                }
            }
            result.is_ok()
        }))
    }
}

impl<T> Consumer<T> {
    pub(crate) fn new<F, E>(handler: F, on_error: Option<ErrorHook>) -> Self
    where
        F: FnMut(&mut Batch<'_, T>) -> Result<(), E> + Send + 'static,
        E: fmt::Display + 'static,
        T: 'static,
    {
        Self {
            handle: Some(Box::new(Handler { handler, on_error })),
            report: Report::default(),
            failed: None,
        }
    }

    /// Hands the sealed batches to the handler, oldest first, until none is
    /// left, or after the first once [`Shared::now_nanos`] reaches `until`
    /// (0: one batch; `u64::MAX`: never) or while blocked producers may
    /// help ([`Shared::may_help`]). Each batch after the first is taken as
    /// the one before hands its buffer back, under one hold of the queue
    /// lock ([`Batch::take_next`](snail::Batch::take_next)). `false` if
    /// there was none, or a handler panicked (now or before).
    pub(crate) fn handle_sealed(&mut self, shared: &Shared<T>, until: u64) -> bool {
        let Some(handle) = self.handle.as_mut().filter(|_| self.failed.is_none()) else {
            return false;
        };
        let mut next = shared.core.try_take();
        let handled = next.is_some();
        while let Some(mut batch) = next {
            let items = batch.len() as u64;
            let ok = match as_handler(shared, || handle.handle(&mut batch)) {
                Ok(ok) => ok,
                Err(payload) => {
                    // Drops what the panic left in the batch (an item's
                    // destructor may panic too: the handler's panic is the
                    // one reported) and hands the buffer back, still marked
                    // as the handler's, so a destructor that calls `close`
                    // gets an error instead of waiting for this thread.
                    let _ = as_handler(shared, || catch_unwind(AssertUnwindSafe(|| drop(batch))));
                    shared.watch.notify_freed();
                    self.failed = Some(fail(shared, &*payload, items, self.report));
                    return false;
                }
            };
            // The worker lets go of the handler between batches while
            // producers may help: holding it across batches would keep
            // them out for as long as batches keep coming. It stops when a
            // linger clock may have run out, too.
            next = if shared.may_help() || is_due(shared, until) {
                drop(batch);
                None
            } else {
                batch.take_next()
            };
            shared.watch.notify_freed();
            let report = &mut self.report;
            report.items += items;
            report.batches += 1;
            report.handler_errors += u64::from(!ok);
            let h = &*shared.handler;
            h.delivered_items.store(report.items, Relaxed);
            h.delivered_batches.store(report.batches, Relaxed);
            h.handler_errors.store(report.handler_errors, Relaxed);
        }
        handled
    }
}

/// Runs `f`, which runs or drops `shared`'s handler and does not unwind,
/// marked as this thread's (see [`in_handler`]).
fn as_handler<T, R>(shared: &Shared<T>, f: impl FnOnce() -> R) -> R {
    shared.handler.handling.store(thread_number(), Relaxed);
    let result = f();
    shared.handler.handling.store(0, Relaxed);
    result
}

/// `true` if this thread is running `shared`'s handler, or dropping it (so
/// it must not wait for the handler or join the worker). Also from a
/// handler of another batcher that this one's handler called into.
pub(crate) fn in_handler<T>(shared: &Shared<T>) -> bool {
    // Only this thread stores its own number there, and clears it before
    // it stops handling: a stale read is never this thread's number.
    shared.handler.handling.load(Relaxed) == thread_number()
}

/// Called by a producer blocked for a buffer, with helping on: handles the
/// oldest sealed batch on this thread if no one else is handling one, so
/// that a buffer is freed without waiting for the worker to get a CPU.
/// Returns `true` if it handled one.
pub(crate) fn help<T>(shared: &Shared<T>) -> bool {
    let Some(mut consumer) = shared.try_lock_consumer() else {
        return false;
    };
    let handled = consumer.handle_sealed(shared, 0);
    if consumer.failed.is_some() {
        // The worker returns the error; wake it to do so (`fail` has set
        // `closing`, which a worker about to park sees).
        shared.wake_worker();
    }
    handled
}

/// The worker thread: runs [`work`], then drops the handler.
pub(crate) fn run<T>(shared: &Shared<T>) -> Result<Report, HandlerPanicked> {
    let outcome = work(shared);
    let handle = shared.lock_consumer().handle.take();
    // Outside the lock: its destructor may take long, and may drop the
    // last handle to the batcher, which must then not join this thread. A
    // panic there is the handler's too, reported with what was delivered
    // (nothing is dropped: every batch was handled).
    let dropped = as_handler(shared, || catch_unwind(AssertUnwindSafe(|| drop(handle))));
    let outcome = match dropped {
        Ok(()) => outcome,
        Err(payload) => Err(outcome.err().unwrap_or_else(|| HandlerPanicked {
            message: panic_message(&*payload),
            batch_items: 0,
            dropped_items: 0,
            report: shared.delivered(),
        })),
    };
    // Dropped inside its handler: nobody joins this thread.
    if let (true, Err(e)) = (shared.orphaned.load(SeqCst), &outcome) {
        eprintln!("snail-std: {e}");
    }
    outcome
}

/// The worker's loop; returns when the batcher is closed and drained, or
/// right after a handler panicked.
fn work<T>(shared: &Shared<T>) -> Result<Report, HandlerPanicked> {
    // The linger stamps as last read, one per shard (allocated once).
    let mut seen = vec![0u64; shared.opened.len()];
    // When a partial batch's linger may run out next (`now_nanos`): the
    // worker looks at the clocks then even while batches keep coming.
    let mut linger_due = if shared.linger.is_some() { 0 } else { u64::MAX };
    loop {
        // Read before draining: once `closing` is set every accepted item
        // is in a sealed batch, so the drain below finds them all. A batch
        // a producer is handling is finished when the worker gets the lock,
        // so the last look (with the lock held) sees the queue empty only
        // once everything taken was handled.
        let closing = shared.closing.load(SeqCst);
        loop {
            let mut consumer = shared.lock_consumer();
            let handled = consumer.handle_sealed(shared, linger_due);
            if let Some(failed) = &consumer.failed {
                return Err(failed.clone());
            }
            if handled {
                if is_due(shared, linger_due) {
                    break;
                }
                continue;
            }
            if closing {
                return Ok(consumer.report);
            }
            break;
        }

        // Linger: seal each shard's partial batch once its first item is
        // `linger` old.
        let mut park = IDLE_PARK;
        let mut lingered = false;
        if let Some(linger) = shared.linger {
            let linger = u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX);
            let now = shared.now_nanos();
            // A batch opened after its shard is read below runs out
            // `linger` from about now, or later.
            let mut next_due = now.saturating_add(linger);
            for (shard, opened) in shared.opened.iter().enumerate() {
                let stamp = opened.load(SeqCst);
                seen[shard] = stamp;
                if stamp == 0 {
                    continue;
                }
                let due = (stamp - 1).saturating_add(linger);
                if now < due {
                    park = park.min(Duration::from_nanos(due - now));
                    next_due = next_due.min(due);
                    continue;
                }
                // Clear, then seal: a batch opened after the flush sets a
                // new stamp; one opened before it is sealed by it. If the
                // stamp changed, its batch was sealed full already and a
                // newer one is timing.
                if opened.compare_exchange(stamp, 0, SeqCst, Relaxed).is_ok()
                    && shared.core.producer(shard).flush()
                {
                    shared.handler.lingered.fetch_add(1, Relaxed);
                }
                lingered = true;
            }
            linger_due = next_due;
        }
        if lingered {
            continue;
        }

        // Under load the next batch is often a few microseconds away, and a
        // park/unpark pair costs the sealing producer a syscall: yield a few
        // times first.
        if poll_for_batch(shared) {
            continue;
        }

        // Announce the park, then look again: a producer that sealed a batch
        // or started a linger clock before this store is seen here; one that
        // did after sees `worker_idle` and unparks us.
        shared.worker_idle.store(true, SeqCst);
        if shared.core.has_sealed()
            || shared.closing.load(SeqCst)
            || shared
                .opened
                .iter()
                .zip(&seen)
                .any(|(o, &s)| o.load(SeqCst) != s)
        {
            shared.worker_idle.store(false, Relaxed);
            continue;
        }
        thread::park_timeout(park);
        shared.worker_idle.store(false, Relaxed);
    }
}

/// `true` if `until` has come (see [`Consumer::handle_sealed`]).
#[inline]
fn is_due<T>(shared: &Shared<T>, until: u64) -> bool {
    until == 0 || (until != u64::MAX && shared.now_nanos() >= until)
}

/// Yields until a sealed batch shows up (`true`) or [`POLL_BEFORE_PARK`]
/// has passed (`false`).
fn poll_for_batch<T>(shared: &Shared<T>) -> bool {
    let start = Instant::now();
    loop {
        thread::yield_now();
        if shared.core.has_sealed() {
            return true;
        }
        if start.elapsed() >= POLL_BEFORE_PARK {
            return false;
        }
    }
}

/// After a handler panic: close, drop everything still held (counting it),
/// wake blocked producers so they get `Closed`, and build the error. An
/// item whose destructor panics here does not stop it: the rest are
/// dropped, and the handler's panic is the one reported (the destructor's
/// goes to the panic hook only).
fn fail<T>(
    shared: &Shared<T>,
    payload: &(dyn Any + Send),
    batch_items: u64,
    report: Report,
) -> HandlerPanicked {
    shared.core.close();
    let mut dropped_items = 0;
    while let Some(batch) = shared.core.try_take() {
        dropped_items += batch.len() as u64;
        // A batch recycles its buffer and drops its other items even when
        // one item's destructor panics.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(batch)));
    }
    shared.closing.store(true, SeqCst);
    shared.watch.notify_closed();
    HandlerPanicked {
        message: panic_message(payload),
        batch_items,
        dropped_items,
        report,
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}
