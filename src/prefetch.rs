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

/// Bytes a fill loop writes between two prefetch steps (see [`run_end`]).
const RUN: usize = 8 * LINE;

/// Where a loop that writes items one by one from item `index` (of `size`
/// bytes each) stops to prefetch again: about [`RUN`] bytes on, or never
/// (`usize::MAX`) where prefetching does nothing or the items take no room.
/// Runs of several lines let the compiler unroll and vectorize the loop.
#[inline(always)]
pub(crate) fn run_end(index: usize, size: usize) -> usize {
    if !ENABLED || size == 0 {
        return usize::MAX;
    }
    index.saturating_add(RUN.div_ceil(size))
}

/// Call as a loop is about to write the bytes `from..to` of a buffer of
/// `bytes` bytes starting at `base`: prefetches [`lines_ahead`].
#[inline(always)]
pub(crate) fn ahead_of_run(base: *const u8, from: usize, to: usize, bytes: usize) {
    if !ENABLED {
        return;
    }
    for offset in lines_ahead(from, to, bytes) {
        line(base.wrapping_add(offset));
    }
}

/// For each line that the bytes `from..to` of a buffer of `bytes` bytes
/// touch, the offset of the line [`AHEAD`] lines on, if it is still in the
/// buffer (never the next buffer, which the consumer may be reading).
#[inline(always)]
fn lines_ahead(
    from: usize,
    to: usize,
    bytes: usize,
) -> core::iter::StepBy<core::ops::Range<usize>> {
    let first = from / LINE * LINE + AHEAD * LINE;
    let last = to.saturating_add(AHEAD * LINE).min(bytes);
    (first..last).step_by(LINE)
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

    #[test]
    fn lines_ahead_are_those_of_the_touched_lines_inside_the_buffer() {
        for bytes in [LINE, 5 * LINE + 8, 20 * LINE, 20 * LINE + 40] {
            for from in 0..bytes {
                for to in (from + 1..=bytes).step_by(7) {
                    let expected = (0..bytes)
                        .step_by(LINE)
                        .filter(|&l| l < to && l + LINE > from)
                        .map(|l| l + AHEAD * LINE)
                        .filter(|&ahead| ahead < bytes);
                    assert!(
                        lines_ahead(from, to, bytes).eq(expected),
                        "bytes {bytes}, {from}..{to}"
                    );
                }
            }
        }
    }

    #[test]
    fn runs_end_about_a_run_on() {
        for size in [1, 3, 8, 24, 64, 100, 4096] {
            let end = run_end(10, size);
            if ENABLED {
                assert_eq!(end, 10 + RUN.div_ceil(size), "size {size}");
            } else {
                assert_eq!(end, usize::MAX);
            }
        }
        assert_eq!(run_end(10, 0), usize::MAX, "zero-sized items never stop");
        assert_eq!(run_end(usize::MAX - 1, 1), usize::MAX);
    }
}
