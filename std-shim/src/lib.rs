//! snail for servers: the [`snail`] batching core with a worker thread,
//! linger, sleeping back-pressure and a close that loses nothing.
//!
//! Producers on any number of threads [`add`](Batcher::add) single items; a
//! worker thread receives them as batches and runs your handler once per
//! batch: one `write` + `fsync`, one packet or one transaction per batch
//! instead of per item. While at least as many producers are blocked for a
//! buffer as there are CPUs, a blocked producer runs the handler itself
//! (still one batch at a time, in order) instead of waiting for the worker to
//! get a CPU; [`help_when_blocked`](Builder::help_when_blocked) changes when.
//!
//! ```
//! use std::io::Write;
//! use std::time::Duration;
//! use snail_std::Batcher;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut out = Vec::new(); // a file or a socket in real use
//! let (tx, rx) = std::sync::mpsc::channel();
//! let batcher = Batcher::<String>::builder()
//!     .batch_size(1000)                  // items per batch
//!     .queue_size(2000)                  // room for two sealed batches
//!     .linger(Duration::from_millis(25)) // a partial batch waits at most this long
//!     .spawn(move |batch| {              // on the worker thread, one batch at a time
//!         for line in batch.drain() {    // owned items
//!             out.extend_from_slice(line.as_bytes());
//!         }
//!         tx.send(out.len()).unwrap();
//!         Ok::<(), std::io::Error>(())
//!     })?;
//!
//! std::thread::scope(|s| {
//!     for t in 0..4 {
//!         let batcher = &batcher;
//!         s.spawn(move || {
//!             for i in 0..10_000 {
//!                 batcher.add(format!("{t} {i}\n")).unwrap(); // blocks while every buffer is in use
//!             }
//!         });
//!     }
//! });
//! let report = batcher.close()?;         // delivers everything, joins the worker
//! assert_eq!(report.items, 40_000);
//! assert_eq!(rx.iter().count() as u64, report.batches);
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - Every accepted item reaches the handler exactly once, unless a handler
//!   panicked (then [`close`](Batcher::close) reports how many were dropped).
//!   Items are dropped exactly once, whether the handler drained them or not.
//! - One thread's items reach the handler in the order it added them.
//! - At most `batch_size × buffers` items are held; buffers are allocated
//!   once, at [`spawn`](Builder::spawn), and `add` allocates nothing (but
//!   for a thread's first add to any batcher, which may allocate a small
//!   per-thread record, reused by later threads).
//! - `add` blocks while every buffer is in use (it is not lock-free): it
//!   spins briefly, yields, then sleeps until the worker frees a buffer (or,
//!   see [`Help`], handles a sealed batch itself).
//! - A partial batch is sealed at most `linger` after its first item was
//!   added, plus scheduling delay and the handler call under way then (the
//!   worker looks at the linger clocks between batches); it reaches the
//!   handler after the batches sealed before it.
//! - [`close`](Batcher::close) and drop deliver everything accepted before
//!   them; later adds fail with [`Closed`] and hand the item back.

#![deny(missing_docs)]

mod batcher;
pub mod bias;
mod error;
mod route;
mod watch;
mod worker;

pub use batcher::{Batch, Batcher, Builder, Help, Report, Stats};
pub use error::{BuildError, Closed, HandlerPanicked, TryAddError};
