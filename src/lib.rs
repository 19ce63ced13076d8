//! An allocation-free batching core: many producers add single items, one
//! consumer takes them as whole batches.
//!
//! Batching turns many tiny writes into a few large ones: one syscall, one
//! packet or one transaction per batch instead of per item. A [`Batcher`]
//! owns a fixed number of pre-allocated buffers. Producers fill the current
//! buffer under a short lock; a full buffer is sealed and queued for the
//! consumer; the consumer takes it as a [`Batch`], uses the items in place or
//! moves them out, and the buffer goes back to the producers. Nothing is
//! allocated after construction. When every buffer is in use, [`try_add`]
//! hands the item back and [`add`] waits.
//!
//! ```
//! use snail::{Batcher, Full};
//!
//! // 4 buffers of 64 items: no heap, usable from a static.
//! static EVENTS: Batcher<u32, 64, 4> = Batcher::new();
//!
//! # fn main() -> Result<(), Full<u32>> {
//! EVENTS.try_add(7)?;                  // Err(Full(7)) when every buffer is in use
//! EVENTS.add(8).unwrap();              // waits while full; Err only after close()
//! assert_eq!(EVENTS.try_add_many(&[1, 2, 3]), 3);
//! assert!(EVENTS.flush());             // seal the partial batch now
//!
//! let mut batch = EVENTS.try_take().expect("one sealed batch");
//! assert_eq!(&batch[..], &[7, 8, 1, 2, 3]);
//! let sum: u32 = batch.drain().sum();  // owned items
//! assert_eq!(sum, 21);
//! drop(batch);                         // the buffer goes back to the producers
//! assert!(EVENTS.is_empty());
//! # Ok(()) }
//! ```
//!
//! # Firmware: an interrupt handler produces, the main loop consumes
//!
//! With the `critical-section` feature, [`CsBatcher`] locks by entering a
//! critical section, so an interrupt handler can add while the main loop
//! takes batches on a single-core MCU (here the critical-section
//! implementation is std's, for the doctest):
//!
//! ```
//! # #[cfg(feature = "critical-section")] {
//! use snail::CsBatcher;
//!
//! static SAMPLES: CsBatcher<u16, 32, 3> = CsBatcher::new();
//!
//! fn on_adc_interrupt(sample: u16) {
//!     // Never wait in an interrupt handler: a full batcher drops the sample.
//!     if SAMPLES.try_add(sample).is_err() { /* count an overrun */ }
//! }
//!
//! # for s in 0..40 { on_adc_interrupt(s); }
//! // main loop, once per timer period (10 ms, say)
//! # for _ in 0..2 {
//! SAMPLES.tick();                      // seals a partial batch by its second tick
//! while let Some(batch) = SAMPLES.try_take() {
//!     // one batch of 32 (sealed because full), then the other 8 (sealed
//!     // by the second tick)
//! #   assert!(batch.len() == 32 || batch.len() == 8);
//! }
//! # }
//! # assert_eq!(SAMPLES.stats().taken, 2);
//! # }
//! ```
//!
//! # Threads
//!
//! [`RawBatcher`] is `Sync` for `T: Send`. Producers on several cores should
//! each use their own shard ([`ShardedBatcher`], [`RawBatcher::producer`]) so
//! that they do not contend for one lock. For servers, the `snail-std` crate
//! wraps this core with a worker thread, linger timeouts, sleeping
//! back-pressure and a lossless close.
//!
//! # Memory
//!
//! Exactly the buffers (`BATCH * BUFFERS * size_of::<T>()`), two words per
//! buffer, one shard header per shard and one queue header; the headers are
//! padded to a cache line on multi-core architectures (128 bytes on x86_64
//! and aarch64) and not at all on 32-bit Arm and RISC-V MCUs. On x86_64,
//! `Batcher<u32, 64, 4>` is 1024 bytes of items, 64 of buffer metadata and
//! two 128-byte headers, rounded up to its 128-byte alignment:
//!
//! ```
//! # #[cfg(target_arch = "x86_64")]
//! assert_eq!(core::mem::size_of::<snail::Batcher<u32, 64, 4>>(), 1408);
//! ```
//!
//! # Features
//!
//! - `critical-section`: [`CsLock`] and [`CsBatcher`]; also lets
//!   portable-atomic use critical sections on targets without
//!   compare-and-swap (thumbv6m, riscv32imc).
//! - `alloc`: [`HeapStorage`], buffers sized at run time, allocated once.
//! - `std`: implies `alloc`; adds [`relax::Yield`].
//!
//! [`try_add`]: RawBatcher::try_add
//! [`add`]: RawBatcher::add

#![no_std]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod batch;
mod batcher;
mod error;
mod lock;
mod pad;
mod prefetch;
pub mod relax;
mod stats;
mod storage;
mod sync;

pub use batch::{Batch, Drain};
#[cfg(feature = "critical-section")]
pub use batcher::CsBatcher;
pub use batcher::{Added, Batcher, Producer, RawBatcher, ShardedBatcher};
pub use error::{Closed, Full};
#[cfg(feature = "critical-section")]
pub use lock::CsLock;
pub use lock::{Bias, BiasSlot, BiasedLock, RawLock, SpinLock};
pub use pad::CachePadded;
pub use stats::Stats;
pub use storage::{ArrayStorage, Storage};
#[cfg(feature = "alloc")]
pub use storage::{HeapStorage, SizeError};
