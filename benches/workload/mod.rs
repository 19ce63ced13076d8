//! The standard workload (see `BENCHMARK.md`), shared by `benches/throughput.rs`
//! and `examples/throughput.rs`.
//!
//! P producer threads push N `u64` items in total (item = producer id << 40 |
//! sequence number) into one batching pipeline with batch size 1000 and room
//! for two more batches (queue 2000). One consumer sums every item of every
//! batch. The figure is the time from the release of the producers (a
//! barrier) to the moment the consumer has seen the last item. Every run
//! checks the consumer's item count and sum, so a broken pipeline panics
//! instead of posting a number.
//!
//! Each implementation is written the way a user of that library would.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use snail_std::Help;

/// Items per batch.
pub const BATCH: usize = 1000;
/// Room beyond the batch being filled: two more batches.
pub const QUEUE: usize = 2000;
/// Items per `add_many` call.
pub const CHUNK: usize = 64;
/// How long a consumer waits for the last item before declaring items lost.
const LOST: Duration = Duration::from_secs(120);

/// One way of running the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// `snail_std::Batcher::add`, one call per item, default settings: a
    /// blocked producer runs the handler itself while at least as many
    /// producers are blocked as there are CPUs (`Help::WhenOversubscribed`).
    SnailStdAdd,
    /// `add` with `Help::Always`: any blocked producer runs the handler on a
    /// sealed batch itself.
    SnailStdHelp,
    /// `add` with `Help::Never`: the handler runs on the worker only.
    SnailStdNever,
    /// `snail_std::Batcher::add_many` with 64-item chunks.
    SnailStdAddMany,
    /// The `snail` core (`RawBatcher` + `HeapStorage`) from plain threads:
    /// `producer(i).add`, a consumer thread polling `try_take`.
    SnailCore,
    /// crossbeam-channel `bounded(2000)`, one `send` per item.
    Crossbeam,
    /// `std::sync::mpsc::sync_channel(2000)`, one `send` per item.
    StdMpsc,
    /// `std::sync::Mutex<Vec<u64>>` back buffer, recycled full buffers.
    StdMutex,
    /// `spin::mutex::SpinMutex<Vec<u64>, spin::relax::Yield>` back buffer.
    NaiveSpin,
    /// One thread storing into a warm pre-allocated 1000-slot array and
    /// summing it when full: the workload without any synchronisation.
    Array,
}

impl Impl {
    /// Every implementation, in table order.
    pub const ALL: [Impl; 10] = [
        Impl::SnailStdAdd,
        Impl::SnailStdHelp,
        Impl::SnailStdNever,
        Impl::SnailStdAddMany,
        Impl::SnailCore,
        Impl::Crossbeam,
        Impl::StdMpsc,
        Impl::StdMutex,
        Impl::NaiveSpin,
        Impl::Array,
    ];

    /// Short name (bench ids, command-line selection).
    pub fn name(self) -> &'static str {
        match self {
            Impl::SnailStdAdd => "snail-std-add",
            Impl::SnailStdHelp => "snail-std-add-help",
            Impl::SnailStdNever => "snail-std-add-never",
            Impl::SnailStdAddMany => "snail-std-add_many",
            Impl::SnailCore => "snail-core",
            Impl::Crossbeam => "crossbeam",
            Impl::StdMpsc => "std-mpsc",
            Impl::StdMutex => "std-mutex",
            Impl::NaiveSpin => "naive-spin",
            Impl::Array => "array-1thread",
        }
    }

    /// Looks an implementation up by [`name`](Self::name).
    #[allow(dead_code)] // used by the example, not by the bench
    pub fn from_name(name: &str) -> Option<Impl> {
        Impl::ALL.into_iter().find(|i| i.name() == name)
    }

    /// `false` for the single-producer baseline.
    pub fn supports(self, producers: usize) -> bool {
        self != Impl::Array || producers == 1
    }

    /// Runs the workload once and returns the time from the producers'
    /// release to the consumer seeing the last item.
    ///
    /// # Panics
    ///
    /// If the consumer's count or sum is wrong, or items went missing.
    pub fn run(self, producers: usize, items: u64) -> Duration {
        assert!(producers >= 1 && items >= 1);
        assert!(
            self.supports(producers),
            "{} runs with one producer only",
            self.name()
        );
        match self {
            Impl::SnailStdAdd
            | Impl::SnailStdHelp
            | Impl::SnailStdNever
            | Impl::SnailStdAddMany => snail_std_run(self, producers, items),
            Impl::SnailCore => snail_core(producers, items),
            Impl::Crossbeam => crossbeam(producers, items),
            Impl::StdMpsc => std_mpsc(producers, items),
            Impl::StdMutex => back_buffer::<StdBack>(producers, items),
            Impl::NaiveSpin => back_buffer::<SpinBack>(producers, items),
            Impl::Array => array(items),
        }
    }
}

/// The item producer `p` adds as its `seq`th.
#[inline(always)]
fn item(p: usize, seq: u64) -> u64 {
    ((p as u64) << 40) | seq
}

/// How many of the `items` producer `p` of `producers` adds.
fn share(items: u64, producers: usize, p: usize) -> u64 {
    let n = producers as u64;
    items / n + u64::from((p as u64) < items % n)
}

/// What a consumer saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    count: u64,
    sum: u64,
}

impl Tally {
    /// The consumer's work: sum a batch.
    #[inline]
    fn add(&mut self, batch: &[u64]) {
        self.count += batch.len() as u64;
        self.sum = batch.iter().fold(self.sum, |s, &x| s.wrapping_add(x));
    }

    fn expected(items: u64, producers: usize) -> Tally {
        let mut t = Tally::default();
        for p in 0..producers {
            let n = share(items, producers, p);
            t.count += n;
            t.sum = t
                .sum
                .wrapping_add(item(p, 0).wrapping_mul(n))
                .wrapping_add(n * n.saturating_sub(1) / 2);
        }
        t
    }

    fn check(self, what: &str, items: u64, producers: usize) {
        let want = Tally::expected(items, producers);
        assert_eq!(
            self, want,
            "{what} with {producers} producers: wrong count or sum"
        );
    }
}

/// Spawns the consumer and `producers` producer threads, releases the
/// producers together, runs `after` once they all returned (to hand over
/// the last partial batch), and returns the time from the release to the
/// consumer's end (`consumer` returns its tally and when it saw the last
/// item), after checking the tally.
fn harness<C, P, A>(
    what: &str,
    producers: usize,
    items: u64,
    consumer: C,
    producer: P,
    after: A,
) -> Duration
where
    C: FnOnce() -> (Tally, Instant) + Send,
    P: Fn(usize, u64) + Sync,
    A: FnOnce(),
{
    let barrier = Barrier::new(producers + 1);
    let (tally, start, end) = thread::scope(|s| {
        let consumer = s.spawn(consumer);
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let (barrier, producer) = (&barrier, &producer);
                s.spawn(move || {
                    barrier.wait();
                    producer(p, share(items, producers, p));
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().expect("producer panicked");
        }
        after();
        let (tally, end) = consumer.join().expect("consumer panicked");
        (tally, start, end)
    });
    tally.check(what, items, producers);
    end - start
}

/// snail-std: producers `add` (or `add_many` 64-item chunks); the handler
/// sums each batch on the worker thread (or, with helping, on a producer
/// blocked for a buffer).
fn snail_std_run(imp: Impl, producers: usize, items: u64) -> Duration {
    let many = imp == Impl::SnailStdAddMany;
    let (done_tx, done_rx) = mpsc::channel();
    let mut tally = Tally::default();
    let batcher = snail_std::Batcher::<u64>::builder()
        .batch_size(BATCH)
        .queue_size(QUEUE)
        .help_when_blocked(match imp {
            Impl::SnailStdHelp => Help::Always,
            Impl::SnailStdNever => Help::Never,
            _ => Help::default(),
        })
        .spawn(move |batch| {
            tally.add(batch);
            if tally.count == items {
                let _ = done_tx.send((tally, Instant::now()));
            }
            Ok::<(), Infallible>(())
        })
        .expect("spawn snail-std batcher");
    harness(
        imp.name(),
        producers,
        items,
        // After `close`, the handler (and `done_tx`) is dropped: a batcher
        // that lost items ends this wait with an error instead of a hang.
        move || done_rx.recv().expect("snail-std lost items"),
        |p, n| {
            if many {
                let mut seq = 0;
                while seq < n {
                    let mut chunk = [0u64; CHUNK];
                    let len = (n - seq).min(CHUNK as u64) as usize;
                    for (i, slot) in chunk[..len].iter_mut().enumerate() {
                        *slot = item(p, seq + i as u64);
                    }
                    batcher
                        .add_many(chunk[..len].iter().copied())
                        .expect("batcher closed");
                    seq += len as u64;
                }
            } else {
                for seq in 0..n {
                    batcher.add(item(p, seq)).expect("batcher closed");
                }
            }
        },
        || {
            // Seals the partial batches, delivers them and joins the worker.
            batcher.close().expect("handler panicked");
        },
    )
}

type CoreLock = snail::SpinLock<snail::relax::Yield>;
type Core =
    snail::RawBatcher<u64, snail::HeapStorage<u64, CoreLock>, CoreLock, snail::relax::Yield>;

/// The snail core from plain threads: heap buffers, one shard per core (at
/// most buffers - 1), producers on `producer(p)`, a consumer thread polling
/// `try_take` and yielding when there is nothing.
fn snail_core(producers: usize, items: u64) -> Duration {
    let buffers = 1 + QUEUE.div_ceil(BATCH);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let shards = cpus.min(buffers - 1).max(1);
    let storage = snail::HeapStorage::new(BATCH, buffers, shards).expect("storage");
    let core = Core::with_storage(storage);
    let done = AtomicBool::new(false);
    let (core, done) = (&core, &done);
    harness(
        "snail core",
        producers,
        items,
        move || {
            let mut tally = Tally::default();
            let deadline = Instant::now() + LOST;
            loop {
                if let Some(batch) = core.try_take() {
                    tally.add(&batch);
                    if tally.count == items {
                        return (tally, Instant::now());
                    }
                } else if done.load(Ordering::Acquire) {
                    // Everything was sealed before `done`: take what is left.
                    while let Some(batch) = core.try_take() {
                        tally.add(&batch);
                    }
                    return (tally, Instant::now());
                } else {
                    assert!(Instant::now() < deadline, "snail core: consumer starved");
                    thread::yield_now();
                }
            }
        },
        |p, n| {
            let producer = core.producer(p);
            for seq in 0..n {
                producer.add(item(p, seq)).expect("batcher closed");
            }
        },
        || {
            core.close(); // seals the partial batches
            done.store(true, Ordering::Release);
        },
    )
}

/// crossbeam-channel `bounded(2000)`: one `send` per item, the consumer
/// `recv`s into a local batch of 1000.
fn crossbeam(producers: usize, items: u64) -> Duration {
    let (tx, rx) = crossbeam_channel::bounded::<u64>(QUEUE);
    channel_peer(
        "crossbeam",
        producers,
        items,
        move || rx.recv().expect("senders gone"),
        |x| tx.send(x).expect("receiver gone"),
    )
}

/// `std::sync::mpsc::sync_channel(2000)`, used like crossbeam above.
fn std_mpsc(producers: usize, items: u64) -> Duration {
    let (tx, rx) = mpsc::sync_channel::<u64>(QUEUE);
    channel_peer(
        "std mpsc",
        producers,
        items,
        move || rx.recv().expect("senders gone"),
        |x| tx.send(x).expect("receiver gone"),
    )
}

/// A bounded channel used as a user would: one `send` per item, the
/// consumer `recv`s into a local batch of 1000 and sums each batch.
fn channel_peer(
    what: &str,
    producers: usize,
    items: u64,
    recv: impl FnMut() -> u64 + Send,
    send: impl Fn(u64) + Sync,
) -> Duration {
    let mut recv = recv;
    harness(
        what,
        producers,
        items,
        move || {
            let mut tally = Tally::default();
            let mut batch = Vec::with_capacity(BATCH);
            while tally.count < items {
                batch.push(recv());
                if batch.len() == BATCH || tally.count + batch.len() as u64 == items {
                    tally.add(&batch);
                    batch.clear();
                }
            }
            (tally, Instant::now())
        },
        |p, n| {
            for seq in 0..n {
                send(item(p, seq));
            }
        },
        || {},
    )
}

/// The back-buffer design: producers push into one shared `Vec` under a
/// lock; whoever fills it swaps in a recycled buffer (waiting for one if
/// the consumer holds them all) and sends the full one to the consumer,
/// which sums it and sends it back. Three buffers: the back buffer and room
/// for two full ones (queue 2000).
struct Back {
    buf: Vec<u64>,
    free: mpsc::Receiver<Vec<u64>>,
    full: mpsc::SyncSender<Vec<u64>>,
}

impl Back {
    #[inline]
    fn push(&mut self, x: u64) {
        self.buf.push(x);
        if self.buf.len() == BATCH {
            let spare = self.free.recv().expect("consumer gone");
            let full = std::mem::replace(&mut self.buf, spare);
            self.full.send(full).expect("consumer gone");
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let full = std::mem::take(&mut self.buf);
            self.full.send(full).expect("consumer gone");
        }
    }
}

/// The lock around the back buffer.
trait BackLock: Sync {
    const NAME: &'static str;
    fn new(back: Back) -> Self;
    fn with<R>(&self, f: impl FnOnce(&mut Back) -> R) -> R;
}

struct StdBack(Mutex<Back>);

impl BackLock for StdBack {
    const NAME: &'static str = "std Mutex";
    fn new(back: Back) -> Self {
        StdBack(Mutex::new(back))
    }
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut Back) -> R) -> R {
        f(&mut self.0.lock().expect("poisoned"))
    }
}

struct SpinBack(spin::mutex::SpinMutex<Back, spin::relax::Yield>);

impl BackLock for SpinBack {
    const NAME: &'static str = "naive spin";
    fn new(back: Back) -> Self {
        SpinBack(spin::mutex::SpinMutex::new(back))
    }
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut Back) -> R) -> R {
        f(&mut self.0.lock())
    }
}

fn back_buffer<L: BackLock>(producers: usize, items: u64) -> Duration {
    let spares = QUEUE.div_ceil(BATCH);
    let (free_tx, free_rx) = mpsc::channel();
    for _ in 0..spares {
        free_tx.send(Vec::with_capacity(BATCH)).expect("send");
    }
    let (full_tx, full_rx) = mpsc::sync_channel(spares);
    let back = L::new(Back {
        buf: Vec::with_capacity(BATCH),
        free: free_rx,
        full: full_tx,
    });
    let back = &back;
    harness(
        L::NAME,
        producers,
        items,
        move || {
            let mut tally = Tally::default();
            while tally.count < items {
                let mut buf = full_rx.recv_timeout(LOST).expect("back buffer lost items");
                tally.add(&buf);
                buf.clear();
                // The producers may have dropped the receiver after the end.
                let _ = free_tx.send(buf);
            }
            (tally, Instant::now())
        },
        |p, n| {
            for seq in 0..n {
                back.with(|b| b.push(item(p, seq)));
            }
        },
        || back.with(Back::flush),
    )
}

/// One thread, no synchronisation: store each item into a warm
/// pre-allocated batch buffer and sum the buffer when it is full.
fn array(items: u64) -> Duration {
    let mut buf = std::hint::black_box(vec![0u64; BATCH]);
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut len = 0;
    for seq in 0..items {
        buf[len] = std::hint::black_box(item(0, seq));
        len += 1;
        if len == BATCH {
            tally.add(std::hint::black_box(&buf));
            len = 0;
        }
    }
    tally.add(std::hint::black_box(&buf[..len]));
    let elapsed = start.elapsed();
    tally.check("array", items, 1);
    elapsed
}
