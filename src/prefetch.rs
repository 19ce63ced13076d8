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

/// Whether [`line`] does anything on this target.
const ENABLED: bool = cfg!(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    not(miri)
));

/// Call as the item at byte offset `offset` of a buffer of `bytes` bytes
/// starting at `base` is written: when that item starts a new line,
/// prefetches the line [`AHEAD`] lines on, if it is still in the buffer
/// (never the next buffer, which the consumer may be reading).
#[inline(always)]
pub(crate) fn ahead_of(base: *const u8, offset: usize, size: usize, bytes: usize) {
    if size == 0 || offset % LINE >= size {
        return;
    }
    let ahead = offset + AHEAD * LINE;
    if ahead < bytes {
        line(base.wrapping_add(ahead));
    }
}

/// The index of the first item after item `index` (of `size` bytes each)
/// that starts a new line, where a loop writing items one by one calls
/// [`ahead_of`] next; `usize::MAX` where prefetching does nothing or the
/// items take no room, so that the loop never stops for it.
#[inline(always)]
pub(crate) fn next_line_item(index: usize, size: usize) -> usize {
    if !ENABLED || size == 0 {
        return usize::MAX;
    }
    first_in_next_line(index, size)
}

/// The first item after item `index` that starts a new line (`size > 0`):
/// the next line starts at byte `next`, and the item that starts in it is
/// the first whose offset is `next` or more.
#[inline(always)]
fn first_in_next_line(index: usize, size: usize) -> usize {
    let next = (index * size / LINE + 1) * LINE;
    next.div_ceil(size)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Item `i` starts a line exactly when [`ahead_of`] prefetches for it.
    fn starts_line(i: usize, size: usize) -> bool {
        (i * size) % LINE < size
    }

    #[test]
    fn the_next_line_item_is_the_first_later_item_that_starts_a_line() {
        for size in 1..=3 * LINE {
            for index in 0..4 * LINE {
                let expected = (index + 1..).find(|&j| starts_line(j, size)).unwrap();
                assert_eq!(
                    first_in_next_line(index, size),
                    expected,
                    "size {size}, index {index}"
                );
            }
        }
    }
}
