//! Age frontiers: the members of a set (a cell, or one of its groups) that no older member of
//! the set matches or beats on processing-time key. Every member is no older than, and has no
//! better key than, some point, so the points bound what the members can score for their wait
//! and processing time together.
//!
//! A cell's frontier is the frontier of its groups' frontiers: a member that an older member of
//! its own group matches is matched in the cell too. So when a cell loses a point, the members
//! that point alone covered are found among its groups' few points, without reading the
//! groups' members.

/// A member of an age frontier: its age and processing-time key, and what its set keeps of it.
pub trait Point: Copy {
    /// Its sequence number (age order).
    fn seq(&self) -> u64;
    /// Its processing-time key (`cells::time_key`).
    fn time(&self) -> u64;
}

/// A point of a cell's frontier, with the enqueue instant the search bounds its wait from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgePoint {
    /// Its sequence number (age order).
    pub seq: u64,
    /// Its processing-time key (`cells::time_key`).
    pub time: u64,
    /// Its enqueue instant.
    pub enqueued_at: f64,
}

/// A point of a group's frontier: its slot, so that finding one needs no read of the message
/// (its enqueue instant is read only if it becomes a point of the cell's frontier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPoint {
    /// Its sequence number (age order).
    pub seq: u64,
    /// Its processing-time key (`cells::time_key`).
    pub time: u64,
    /// Its slot.
    pub slot: u32,
}

impl Point for AgePoint {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn time(&self) -> u64 {
        self.time
    }
}

impl Point for SlotPoint {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn time(&self) -> u64 {
        self.time
    }
}

/// The points of one set, oldest first (so their keys strictly decrease).
#[derive(Debug, Clone, PartialEq)]
pub struct Frontier<P>(Vec<P>);

impl<P> Default for Frontier<P> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

/// Where a point was taken out of a frontier, and which members it alone covered: those with a
/// key from its own up to (not including) its older neighbour's, younger than it and older than
/// its younger neighbour. Any other member is covered by a point that is still there.
#[derive(Debug, Clone, Copy)]
pub struct Gap<P> {
    at: usize,
    /// The point taken out.
    pub removed: P,
    /// The older neighbour's key (None when the removed point was the oldest).
    pub older_time: Option<u64>,
    /// The younger neighbour's sequence number (`u64::MAX` when it was the youngest).
    pub younger_seq: u64,
}

impl<P: Point> Gap<P> {
    /// Whether a key is below the older neighbour's (the upper end of the keys to look at).
    pub fn below_older(&self, time: u64) -> bool {
        self.older_time.is_none_or(|limit| time < limit)
    }

    /// Whether a member with this key and sequence number was covered by the removed point
    /// alone.
    pub fn covers(&self, time: u64, seq: u64) -> bool {
        time >= self.removed.time()
            && self.below_older(time)
            && seq > self.removed.seq()
            && seq < self.younger_seq
    }
}

/// Keeps the points of `points` that no other point matches or beats on both age and key,
/// oldest first.
pub fn staircase<P: Point>(points: &mut Vec<P>) {
    points.sort_unstable_by_key(P::seq);
    let mut best: Option<u64> = None;
    points.retain(|p| {
        let keep = best.is_none_or(|b| p.time() < b);
        if keep {
            best = Some(p.time());
        }
        keep
    });
}

impl<P: Point> Frontier<P> {
    /// The points, oldest first.
    pub fn points(&self) -> &[P] {
        &self.0
    }

    /// Adds a new member, if no older member is as good, dropping the younger points it
    /// matches or beats; returns whether it became a point. The youngest member costs O(1).
    pub fn add(&mut self, point: P) -> bool {
        let points = &mut self.0;
        let i = points.partition_point(|p| p.seq() < point.seq());
        if i > 0 && points[i - 1].time() <= point.time() {
            return false;
        }
        let beaten = points[i..].iter().take_while(|p| p.time() >= point.time()).count();
        points.splice(i..i + beaten, [point]);
        true
    }

    /// Adds members (any order, any of them matched or beaten by others).
    pub fn merge(&mut self, members: impl IntoIterator<Item = P>) {
        self.0.extend(members);
        staircase(&mut self.0);
    }

    /// Takes out the point of sequence number `seq`, if it is one.
    pub fn take(&mut self, seq: u64) -> Option<Gap<P>> {
        let at = self.0.binary_search_by_key(&seq, P::seq).ok()?;
        let removed = self.0.remove(at);
        let older_time = at.checked_sub(1).map(|j| self.0[j].time());
        let younger_seq = self.0.get(at).map_or(u64::MAX, P::seq);
        Some(Gap { at, removed, older_time, younger_seq })
    }

    /// Fills `gap` with the points of `found`, already a staircase of the members it covered
    /// (every one in the gap, as `Gap::covers` says, or at least every one that is a point of
    /// their set).
    pub fn fill<Q: Point>(&mut self, gap: &Gap<Q>, found: impl IntoIterator<Item = P>) {
        self.0.splice(gap.at..gap.at, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time: u64) -> AgePoint {
        AgePoint { seq, time, enqueued_at: seq as f64 }
    }

    fn keys(frontier: &Frontier<AgePoint>) -> Vec<(u64, u64)> {
        frontier.points().iter().map(|p| (p.seq, p.time)).collect()
    }

    #[test]
    fn a_member_joins_only_when_no_older_one_is_as_fast() {
        let mut frontier = Frontier::default();
        assert!(frontier.add(point(1, 50)));
        assert!(!frontier.add(point(2, 50)));
        assert!(frontier.add(point(3, 40)));
        // An older member (given back) drops the younger points it matches.
        assert!(frontier.add(point(0, 40)));
        assert_eq!(keys(&frontier), vec![(0, 40)]);
    }

    #[test]
    fn a_gap_covers_the_keys_between_its_neighbours() {
        let mut frontier = Frontier::default();
        frontier.merge([point(1, 50), point(4, 30), point(9, 10), point(5, 40)]);
        assert_eq!(keys(&frontier), vec![(1, 50), (4, 30), (9, 10)]);
        let gap = frontier.take(4).expect("a point");
        assert!(gap.covers(30, 5));
        assert!(gap.covers(49, 8));
        assert!(!gap.covers(50, 5));
        assert!(!gap.covers(29, 5));
        assert!(!gap.covers(35, 9));
        let mut found = vec![point(7, 45), point(6, 35), point(8, 40)];
        staircase(&mut found);
        frontier.fill(&gap, found);
        assert_eq!(keys(&frontier), vec![(1, 50), (6, 35), (9, 10)]);
        assert!(frontier.take(3).is_none());
    }
}
