//! The pgoutput decoder: bytes of one logical replication message in, a typed
//! [`LogicalMessage`] out.
//!
//! This is a pure function over bytes. It does no I/O, never panics, and
//! returns a [`DecodeError`] for every malformed input (a truncated body, an
//! unknown tag, a length past the end of the buffer, a name that is not
//! UTF-8). Column values are `Bytes` slices of the input, so decoding an
//! Insert copies no column data.
//!
//! The formats are those of "Logical Replication Message Formats" in the
//! PostgreSQL documentation, protocol versions 1 to 4.

mod decode;
mod message;

pub use decode::{DecodeError, StreamDecoder, decode};
pub use message::*;

#[cfg(test)]
mod tests;
