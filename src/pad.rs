//! Keeping hot data that different cores write on its own cache line.

use core::ops::Deref;

/// Aligns `T` to the cache line (prefetch pair) on multi-core architectures
/// and does nothing elsewhere.
///
/// 128 bytes on x86_64, aarch64 and powerpc64 (the adjacent-line prefetcher
/// pulls lines in pairs), 64 on other common multi-core architectures, and no
/// padding on 32-bit Arm, RISC-V 32, AVR, MSP430 and Xtensa, where a batcher
/// typically lives on one core and padding would only waste RAM.
///
/// ```
/// use core::sync::atomic::{AtomicUsize, Ordering};
/// use snail::CachePadded;
///
/// // Two counters that different threads bump, kept off each other's line.
/// static HITS: [CachePadded<AtomicUsize>; 2] =
///     [CachePadded::new(AtomicUsize::new(0)), CachePadded::new(AtomicUsize::new(0))];
/// HITS[1].fetch_add(1, Ordering::Relaxed);
/// assert_eq!(HITS[1].load(Ordering::Relaxed), 1);
/// ```
#[cfg_attr(
    any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "powerpc64"
    ),
    repr(align(128))
)]
#[cfg_attr(
    any(
        target_arch = "x86",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "mips64",
        target_arch = "sparc64",
        target_arch = "s390x",
    ),
    repr(align(64))
)]
#[derive(Debug, Default)]
pub struct CachePadded<T>(T);

impl<T> CachePadded<T> {
    /// Pads `value`.
    pub const fn new(value: T) -> Self {
        Self(value)
    }
}

impl<T> Deref for CachePadded<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}
