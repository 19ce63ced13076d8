//! Counters a batcher keeps about itself.

/// A snapshot of a batcher's counters, from [`RawBatcher::stats`](crate::RawBatcher::stats).
///
/// Counters are `usize` and wrap on overflow (after 2³² items on 32-bit
/// targets); differences between two snapshots taken with `wrapping_sub`
/// stay exact across one wrap. Taken while producers run, the fields are each
/// exact but not from one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Items accepted.
    pub added: usize,
    /// Calls of `try_add`, `try_add_many` or `try_extend` that refused an item
    /// because every buffer was in use or the batcher was closed. Waiting
    /// inside `add` is not counted.
    pub refused: usize,
    /// Batches sealed because they reached the batch size.
    pub sealed_full: usize,
    /// Partial batches sealed by `flush` or `close`.
    pub sealed_flush: usize,
    /// Partial batches sealed by `tick`.
    pub sealed_tick: usize,
    /// Batches handed out by `try_take`.
    pub taken: usize,
}

impl Stats {
    /// All sealed batches, whatever the reason.
    pub fn sealed(&self) -> usize {
        self.sealed_full
            .wrapping_add(self.sealed_flush)
            .wrapping_add(self.sealed_tick)
    }
}

/// Why a batch was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Full,
    Flush,
    Tick,
}
