//! Asking the cache for a slot's line before the producer writes it.
//!
//! The consumer reads every batch, so when a producer refills a recycled
//! buffer each cache line it writes is usually shared with (or owned by) the
//! consumer's core, and each first store to a line waits for the other core
//! to give it up. Writes to a batch are sequential, so the producer asks for
//! the line a few lines ahead with a prefetch-for-write while it fills the
//! current one. It is a hint: it never faults and changes no memory.
//! Only x86_64 (`prefetchw`) and aarch64 (`prfm pstl1keep`) do anything;
//! elsewhere (MCUs with one core, no cache to share) it compiles to nothing.

/// Bytes in a cache line, for deciding when a write starts a new line.
const LINE: usize = 64;
/// How far ahead of the write position to prefetch, in lines.
pub(crate) const AHEAD: usize = 8;

/// Call after writing the item at byte offset `offset` of a buffer of
/// `bytes` bytes starting at `base`: when that item starts a new line,
/// prefetches the line [`AHEAD`] lines on, if it is still in the buffer
/// (never the next buffer, which the consumer may be reading).
#[inline(always)]
pub(crate) fn after_write(base: *const u8, offset: usize, size: usize, bytes: usize) {
    if size == 0 || offset % LINE >= size {
        return;
    }
    let ahead = offset + AHEAD * LINE;
    if ahead < bytes {
        line(base.wrapping_add(ahead));
    }
}

/// Prefetches the first [`AHEAD`] lines of a buffer that is about to be
/// filled from its start.
#[inline(always)]
pub(crate) fn opening(base: *const u8, bytes: usize) {
    let mut offset = 0;
    while offset < bytes && offset < AHEAD * LINE {
        line(base.wrapping_add(offset));
        offset += LINE;
    }
}

#[inline(always)]
fn line(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: `prefetchw` is a hint: it never faults, whatever the address,
    // and neither reads nor writes memory as far as the program can tell.
    // (CPUs without it, before Broadwell, execute it as a no-op.)
    unsafe {
        core::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    // SAFETY: `prfm` is a hint: it never faults and changes no memory.
    unsafe {
        core::arch::asm!("prfm pstl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(all(any(target_arch = "x86_64", target_arch = "aarch64"), not(miri))))]
    let _ = p;
}
