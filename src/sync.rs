//! Every atomic and cell the algorithm touches, in one place.
//!
//! Under `--cfg snail_loom` the types come from loom so that the models in
//! `tests/loom.rs` explore every interleaving; otherwise they come from
//! portable-atomic (native atomics where the target has them, a
//! critical-section fallback where it does not) and `core::cell`.

#[cfg(not(snail_loom))]
pub(crate) use portable_atomic::{AtomicBool, AtomicPtr, AtomicUsize};

#[cfg(snail_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize};

pub(crate) use core::sync::atomic::Ordering;

/// An `UnsafeCell` with loom's closure-based access API, so the same code
/// compiles against both.
#[cfg(not(snail_loom))]
#[derive(Debug)]
#[repr(transparent)]
pub struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(snail_loom))]
impl<T> UnsafeCell<T> {
    pub const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    #[inline(always)]
    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    #[inline(always)]
    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(snail_loom)]
pub(crate) use loom::cell::UnsafeCell;

/// Emits `const fn` normally and a plain `fn` under loom, whose types have no
/// `const` constructors.
macro_rules! maybe_const_fn {
    ($(#[$m:meta])* $vis:vis fn $($rest:tt)*) => {
        #[cfg(not(snail_loom))]
        $(#[$m])* $vis const fn $($rest)*
        #[cfg(snail_loom)]
        $(#[$m])* $vis fn $($rest)*
    };
}
pub(crate) use maybe_const_fn;

/// One step of waiting: the relax hook, or a loom yield so that models make
/// progress.
#[inline(always)]
pub(crate) fn relax<R: crate::relax::Relax>() {
    #[cfg(snail_loom)]
    {
        let _hook = core::marker::PhantomData::<R>;
        loom::thread::yield_now();
    }
    #[cfg(not(snail_loom))]
    R::relax();
}
