//! Feeds arbitrary bytes to the pgoutput decoder, in and out of a streamed
//! block, and through a stream decoder that splits the input into messages.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walrelay::pgoutput::{StreamDecoder, decode};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let _ = decode(&bytes, false);
    let _ = decode(&bytes, true);
    // Also as a sequence: the first byte of each chunk is its length.
    let mut decoder = StreamDecoder::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = (rest[0] as usize).min(rest.len() - 1);
        let chunk = rest.slice(1..1 + len);
        let _ = decoder.decode(&chunk);
        rest = rest.slice(1 + len..);
    }
});
