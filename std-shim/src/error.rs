//! The shim's errors. Every error that refuses an item hands it back.

use std::fmt;

pub use snail::Closed;

use crate::batcher::Report;

/// Why [`Batcher::try_add`](crate::Batcher::try_add) or
/// [`add_timeout`](crate::Batcher::add_timeout) did not accept an item.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TryAddError<T> {
    /// Every buffer was in use (for `add_timeout`: for the whole wait).
    Full(T),
    /// The batcher is closed, or its handler panicked.
    Closed(T),
}

impl<T> TryAddError<T> {
    /// Returns the item that was not accepted.
    pub fn into_inner(self) -> T {
        match self {
            TryAddError::Full(item) | TryAddError::Closed(item) => item,
        }
    }

    /// `true` for [`TryAddError::Full`].
    pub fn is_full(&self) -> bool {
        matches!(self, TryAddError::Full(_))
    }
}

impl<T> fmt::Debug for TryAddError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TryAddError::Full(_) => "Full(..)",
            TryAddError::Closed(_) => "Closed(..)",
        })
    }
}

impl<T> fmt::Display for TryAddError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TryAddError::Full(_) => "every batch buffer is in use",
            TryAddError::Closed(_) => "the batcher is closed",
        })
    }
}

impl<T> std::error::Error for TryAddError<T> {}

impl<T> From<Closed<T>> for TryAddError<T> {
    fn from(Closed(item): Closed<T>) -> Self {
        TryAddError::Closed(item)
    }
}

/// Why [`Builder::spawn`](crate::Builder::spawn) failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// `batch_size` was 0.
    ZeroBatchSize,
    /// `shards` was 0.
    ZeroShards,
    /// The buffers do not fit in memory (`batch_size × buffers` items).
    TooLarge,
    /// The worker thread's [`name`](crate::Builder::name) contains a NUL
    /// byte, which no thread name may hold.
    NameWithNul,
    /// The worker thread could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::ZeroBatchSize => f.write_str("batch_size must be at least 1"),
            BuildError::ZeroShards => f.write_str("shards must be at least 1"),
            BuildError::TooLarge => f.write_str("batch_size × buffers items do not fit in memory"),
            BuildError::NameWithNul => f.write_str("the worker thread's name contains a NUL byte"),
            BuildError::Spawn(e) => write!(f, "could not start the worker thread: {e}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// The handler panicked: from [`Batcher::close`](crate::Batcher::close).
///
/// After the panic the worker stopped calling the handler, the batcher was
/// closed (blocked and later adds got [`Closed`] back), and every item still
/// held was dropped and counted here. An item whose destructor panics as
/// the items a handler left in its batch are dropped counts as a panic of
/// that handler call, even if the handler returned `Ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerPanicked {
    /// The panic's message (its payload if that was a string).
    pub message: String,
    /// Items in the batch whose handler panicked.
    pub batch_items: u64,
    /// Items accepted later or still queued, dropped without reaching the
    /// handler.
    pub dropped_items: u64,
    /// What was delivered before the panicking batch (which is not
    /// counted here: its items are in `batch_items`).
    pub report: Report,
}

impl fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the batch handler panicked: {} ({} items in that batch, {} more dropped)",
            self.message, self.batch_items, self.dropped_items
        )
    }
}

impl std::error::Error for HandlerPanicked {}
