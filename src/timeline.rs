//! A server's timeline and its ancestors (`TIMELINE_HISTORY`): which
//! commits belong to the history the server has now, after promotions.

use std::collections::BTreeMap;

use crate::lsn::Lsn;

/// The current timeline and where each of its ancestors ended
/// (`TIMELINE_HISTORY`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineHistory {
    pub current: u32,
    /// Ancestor timeline -> the LSN at which the history switched away
    /// from it.
    pub switch_points: BTreeMap<u32, Lsn>,
}

impl TimelineHistory {
    pub fn new(current: u32) -> Self {
        TimelineHistory {
            current,
            switch_points: BTreeMap::new(),
        }
    }

    /// Parses a timeline history file: `TLI<TAB>LSN<TAB>reason` lines.
    pub fn parse(current: u32, content: &str) -> TimelineHistory {
        let mut history = TimelineHistory::new(current);
        for line in content.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(tli), Some(lsn)) = (fields.next(), fields.next())
                && let (Ok(tli), Ok(lsn)) = (tli.parse::<u32>(), lsn.parse::<Lsn>())
            {
                history.switch_points.insert(tli, lsn);
            }
        }
        history
    }

    /// The timeline of the current history that `lsn` was written on: the
    /// first ancestor that ended past it, else the current one.
    pub fn timeline_of(&self, lsn: Lsn) -> u32 {
        self.switch_points
            .iter()
            .find(|(_, end)| lsn < **end)
            .map_or(self.current, |(timeline, _)| *timeline)
    }

    /// Whether a commit at `commit` written on `timeline` is part of the
    /// current history.
    pub fn contains(&self, timeline: u32, commit: Lsn) -> bool {
        if timeline == self.current {
            return true;
        }
        match self.switch_points.get(&timeline) {
            Some(end) => commit < *end,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_past_the_fork_of_an_ancestor_timeline_is_not_in_the_history() {
        let h = TimelineHistory::parse(
            3,
            "1\t0/3000000\tno recovery target specified\n2\t0/5000000\tno recovery target specified\n",
        );
        assert!(h.contains(3, Lsn(0x9000000)));
        assert!(h.contains(1, Lsn(0x2FFFFFF)));
        assert!(
            !h.contains(1, Lsn(0x3000000)),
            "written after timeline 1 ended"
        );
        assert!(h.contains(2, Lsn(0x4000000)));
        assert!(!h.contains(2, Lsn(0x5000000)));
        assert!(!h.contains(4, Lsn(0x10)), "not an ancestor");
    }

    #[test]
    fn each_position_belongs_to_the_timeline_that_wrote_it() {
        let h = TimelineHistory::parse(
            3,
            "1\t0/3000000\tno recovery target specified\n2\t0/5000000\tno recovery target specified\n",
        );
        assert_eq!(h.timeline_of(Lsn(0x2FFFFFF)), 1);
        assert_eq!(
            h.timeline_of(Lsn(0x3000000)),
            2,
            "the fork starts timeline 2"
        );
        assert_eq!(h.timeline_of(Lsn(0x4FFFFFF)), 2);
        assert_eq!(h.timeline_of(Lsn(0x5000000)), 3);
        assert_eq!(TimelineHistory::new(1).timeline_of(Lsn(0x9000000)), 1);
    }
}
