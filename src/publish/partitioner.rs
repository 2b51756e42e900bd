//! Where a record goes: Kafka's murmur2 partitioner, as the Java client
//! computes it, so keys land where Java producers put them.

use super::position::Position;

/// Kafka's murmur2, as the Java client computes it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a record: murmur2 of its key as the Java client (and
/// librdkafka's `murmur2_random`) pick it; a record without a key gets one
/// from its position, so a replay lands where the first try did (and
/// partition 0 without either).
pub fn partition_for(key: Option<&[u8]>, position: Option<&Position>, partitions: i32) -> i32 {
    let hash = match (key, position) {
        (Some(key), _) => murmur2(key),
        (None, Some(position)) => murmur2(position.to_string().as_bytes()),
        (None, None) => 0,
    };
    (hash & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values computed by Kafka's Utils.murmur2.
        for (key, hash) in [
            ("1", -1993445489),
            ("12", 126087238),
            ("123", -267702483),
            ("1234", -1614185708),
            ("12345", -1188365604),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
    }
}
