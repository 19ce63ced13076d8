//! What a thread does while it waits: the relax hook.
//!
//! The hook is [`spin::RelaxStrategy`], re-exported here as [`Relax`], so any
//! strategy written for spin-rs works unchanged. A strategy is a zero-sized
//! type used as a type parameter; it is called once per failed attempt.
//!
//! | strategy | what it does | use it for |
//! |---|---|---|
//! | [`Spin`] | `core::hint::spin_loop()` (`pause`, `yield`, …) | multi-core, short waits |
//! | [`Loop`] | nothing | targets where the hint is wrong or absent |
//! | `Yield` (feature `std`) | `std::thread::yield_now()` | more threads than cores |
//!
//! Your own hook, for example `wfe` on Cortex-M or an RTOS yield:
//!
//! ```
//! struct Wfe;
//! impl snail::relax::Relax for Wfe {
//!     fn relax() {
//!         // cortex_m::asm::wfe();
//!     }
//! }
//! static Q: snail::Batcher<u8, 16, 2, snail::SpinLock<Wfe>> = snail::Batcher::new();
//! # assert!(Q.try_add(1).is_ok());
//! ```

pub use spin::relax::{Loop, RelaxStrategy as Relax, Spin};

#[cfg(feature = "std")]
pub use spin::relax::Yield;
