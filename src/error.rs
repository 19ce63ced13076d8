//! Errors that hand the refused item back.

use core::fmt;

/// Every buffer was in use (or the batcher is closed), so the item was not
/// accepted. The item is inside: `err.0` or [`Full::into_inner`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Full<T>(pub T);

/// The batcher was closed, so the item was not accepted and never will be.
/// The item is inside: `err.0` or [`Closed::into_inner`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Closed<T>(pub T);

macro_rules! item_error {
    ($name:ident, $msg:literal) => {
        impl<T> $name<T> {
            /// Returns the item that was not accepted.
            pub fn into_inner(self) -> T {
                self.0
            }
        }

        impl<T> fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }

        impl<T> fmt::Display for $name<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($msg)
            }
        }

        impl<T> core::error::Error for $name<T> {}
    };
}

item_error!(Full, "every batch buffer is in use");
item_error!(Closed, "the batcher is closed");
