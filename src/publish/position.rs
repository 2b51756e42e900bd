//! What every exactly-once record says about itself: its **position**
//! (`walrelay_position`: the commit LSN of its transaction, the LSN of its
//! own change, and its rank among changes sharing that LSN) and its
//! **origin** (`walrelay_origin`: system identifier, slot and timeline). A
//! replay from the slot yields the same changes with the same positions:
//! they come from the WAL, not from walrelay's configuration.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::lsn::Lsn;

/// Header carrying a record's position.
pub const POSITION_HEADER: &str = "walrelay_position";
/// Header carrying a record's origin.
pub const ORIGIN_HEADER: &str = "walrelay_origin";

/// Where an event comes from in the WAL. Orders as the stream does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The commit record of the event's transaction.
    pub commit: Lsn,
    /// The event's own change.
    pub change: Lsn,
    /// Its rank among the transaction's changes at the same LSN.
    pub rank: u16,
}

impl fmt::Display for Position {
    /// Fixed width, so the text sorts as the position compares.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016X}/{:016X}/{:04X}",
            self.commit.0, self.change.0, self.rank
        )
    }
}

impl Position {
    /// What `Display` prints, as a header's value, without the formatting
    /// machinery: every exactly-once record carries one.
    pub fn to_bytes(&self) -> Bytes {
        let mut text = [b'/'; 38];
        hex_into(&mut text[..16], self.commit.0);
        hex_into(&mut text[17..33], self.change.0);
        hex_into(&mut text[34..], u64::from(self.rank));
        Bytes::copy_from_slice(&text)
    }
}

/// `value` as upper-case hex digits filling `out`, zero-padded.
fn hex_into(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b"0123456789ABCDEF"[(value & 0xF) as usize];
        value >>= 4;
    }
}

impl FromStr for Position {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let mut parts = text.split('/');
        let mut hex64 = || {
            let part = parts.next().ok_or(())?;
            (part.len() == 16)
                .then(|| u64::from_str_radix(part, 16).map_err(|_| ()))
                .ok_or(())?
        };
        let commit = Lsn(hex64()?);
        let change = Lsn(hex64()?);
        let rank = parts.next().ok_or(())?;
        if rank.len() != 4 || parts.next().is_some() {
            return Err(());
        }
        Ok(Position {
            commit,
            change,
            rank: u16::from_str_radix(rank, 16).map_err(|_| ())?,
        })
    }
}

/// Who wrote a record: a cluster (system identifier), a slot, a timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub system_id: String,
    pub slot: String,
    pub timeline: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.system_id, self.slot, self.timeline)
    }
}

impl Origin {
    /// Parses `SYSTEM_ID/SLOT/TIMELINE` (slot names never hold a '/').
    pub fn parse(text: &str) -> Option<Origin> {
        let (rest, timeline) = text.rsplit_once('/')?;
        let (system_id, slot) = rest.split_once('/')?;
        Some(Origin {
            system_id: system_id.to_owned(),
            slot: slot.to_owned(),
            timeline: timeline.parse().ok()?,
        })
    }

    /// The same source: cluster and slot, whatever the timeline.
    pub fn same_source(&self, other: &Origin) -> bool {
        self.system_id == other.system_id && self.slot == other.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(commit: u64, change: u64, rank: u16) -> Position {
        Position {
            commit: Lsn(commit),
            change: Lsn(change),
            rank,
        }
    }

    #[test]
    fn positions_print_fixed_width_sort_as_they_compare_and_parse_back() {
        let a = pos(0x16B3748, 0x16B3700, 0);
        let b = pos(0x16B3748, 0x16B3700, 1);
        let c = pos(0x1_0000_0000, 0x10, 0);
        assert_eq!(a.to_string(), "00000000016B3748/00000000016B3700/0000");
        let mut texts = [c.to_string(), b.to_string(), a.to_string()];
        texts.sort();
        assert_eq!(texts, [a.to_string(), b.to_string(), c.to_string()]);
        assert!(a < b && b < c);
        assert_eq!(a.to_string().parse::<Position>(), Ok(a));
        assert!("16B3748/0/0".parse::<Position>().is_err());
        for p in [a, b, c, pos(u64::MAX, 0xABCDEF, u16::MAX), pos(0, 0, 0)] {
            assert_eq!(p.to_bytes(), p.to_string().as_bytes());
        }
    }

    #[test]
    fn origins_round_trip_and_compare_by_cluster_and_slot() {
        let o = Origin {
            system_id: "7321".into(),
            slot: "walrelay".into(),
            timeline: 3,
        };
        assert_eq!(o.to_string(), "7321/walrelay/3");
        let back = Origin::parse("7321/walrelay/3").unwrap();
        assert_eq!(back, o);
        assert!(o.same_source(&Origin::parse("7321/walrelay/1").unwrap()));
        assert!(!o.same_source(&Origin::parse("7321/other/3").unwrap()));
        assert_eq!(Origin::parse("junk"), None);
    }
}
