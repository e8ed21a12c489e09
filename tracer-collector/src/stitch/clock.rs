//! Clock skew between the hosts of one stitched trace, from its matched CLIENT/SERVER pairs.
//!
//! A SERVER span lies inside its CLIENT span in real time, so for a pair on hosts A (client)
//! and B (server) the correction to add to B's times relative to A's lies in
//! `[C.start - S.start, C.end - S.end]`. Per pair of hosts: if 0 is in every pair's interval the
//! clocks agree well enough and nothing moves; else the midpoint of the intersection (the
//! network's delays on the way there and back are taken as equal, as NTP does); if the
//! intervals do not intersect (one host's clock stepped, say), the median of their midpoints.
//! Corrections add up along a breadth-first walk from the root span's host, which never moves;
//! a host with no matched pair, or not connected to the root's host by pairs, is never moved.
use std::collections::{HashMap, VecDeque};

use tracer_store::{AttrValue, SpanRecord};

/// A host's identity in its spans' resource: `host.id`, else `host.name`.
pub(crate) fn host_of(s: &SpanRecord) -> Option<&str> {
    let get = |k: &str| {
        s.resource.iter().find_map(|kv| match &kv.value {
            AttrValue::Str(v) if kv.key == k && !v.is_empty() => Some(v.as_str()),
            _ => None,
        })
    };
    get("host.id").or_else(|| get("host.name"))
}

/// What a host is called in a warning: `host.name`, else `host.id`.
pub(crate) fn host_label(s: &SpanRecord) -> Option<&str> {
    s.resource
        .iter()
        .find_map(|kv| match &kv.value {
            AttrValue::Str(v) if kv.key == "host.name" && !v.is_empty() => Some(v.as_str()),
            _ => None,
        })
        .or_else(|| host_of(s))
}

/// How far a SERVER span may start before its CLIENT span on one clock: a client span starts
/// at its write's entry, or at its exit when the thread changed CPU during the call (the
/// entry's per-CPU stamp is lost), up to ~150 µs later in `cargo xtask traces` on one machine.
const START_SLACK_NS: i64 = 500_000;

/// How far a SERVER span may end after its CLIENT span on one clock: it ends when its write
/// returns, and the client's read can return first (the server thread preempted after
/// queueing the bytes); `cargo xtask traces` saw up to 2.5 ms of that between namespace hosts
/// sharing one clock, which a test without slack corrected as skew.
const END_SLACK_NS: i64 = 5_000_000;

/// The values of `shift(b) - shift(a)` that put one pair's SERVER span inside its CLIENT span
/// exactly (`lo..=hi`), and how far past each end one clock can still show it (the slacks:
/// `lo - lo_slack ..= hi + hi_slack` is "no sign of skew").
#[derive(Clone, Copy, Debug, PartialEq)]
struct Allowed {
    lo: i64,
    hi: i64,
    lo_slack: i64,
    hi_slack: i64,
}

impl Allowed {
    /// For `shift(server's host) - shift(client's host)`.
    fn of(client: &SpanRecord, server: &SpanRecord) -> Allowed {
        Allowed {
            lo: client.start_unix_nano as i64 - server.start_unix_nano as i64,
            hi: end(client) - end(server),
            lo_slack: START_SLACK_NS,
            hi_slack: END_SLACK_NS,
        }
    }

    /// The same pair, for `shift(client's host) - shift(server's host)`.
    fn reversed(self) -> Allowed {
        Allowed {
            lo: -self.hi,
            hi: -self.lo,
            lo_slack: self.hi_slack,
            hi_slack: self.lo_slack,
        }
    }

    fn tolerates(self, v: i64) -> bool {
        self.lo - self.lo_slack <= v && v <= self.hi + self.hi_slack
    }

    /// Moved by `by` (the other host's own shift, for an absolute shift of this one).
    fn offset(self, by: i64) -> Allowed {
        Allowed {
            lo: self.lo + by,
            hi: self.hi + by,
            ..self
        }
    }
}

/// A host's absolute correction (ns). `upstream`: what its pairs with hosts already corrected
/// allow; `downstream`: what its pairs with hosts not yet corrected allow if those stay as they
/// are. No correction while every upstream pair tolerates none (a host is only moved when it
/// must be: a midpoint estimate moves correct hosts by up to half a request's slack). When it
/// must move, the pairs on both sides narrow the estimate: upstream alone placed a host between
/// its callers' spans well enough, but its callees' spans (on a correct clock) then poked out
/// of its own by the estimate's error.
fn estimate_host(upstream: &[Allowed], downstream: &[Allowed]) -> i64 {
    if upstream.iter().all(|p| p.tolerates(0)) {
        return 0;
    }
    let both: Vec<Allowed> = upstream.iter().chain(downstream).copied().collect();
    let narrow = |pairs: &[Allowed]| {
        let lo = pairs.iter().map(|p| p.lo).max()?;
        let hi = pairs.iter().map(|p| p.hi).min()?;
        (lo <= hi).then_some(lo + (hi - lo) / 2)
    };
    narrow(&both).unwrap_or_else(|| estimate(upstream, i64::MIN))
}

/// The relative correction (ns, `shift(b) - shift(a)`) from the pairs between two hosts.
/// `preferred` is the value that leaves `b` uncorrected (given `a`'s own correction): kept
/// whenever no pair shows skew beyond the slacks, so a host is only moved when it must be
/// (a midpoint estimate otherwise moves correct hosts by up to half a request's slack).
fn estimate(pairs: &[Allowed], preferred: i64) -> i64 {
    if pairs.iter().all(|p| p.tolerates(preferred)) {
        return preferred;
    }
    let intervals: Vec<(i64, i64)> = pairs.iter().map(|p| (p.lo, p.hi)).collect();
    let lo = intervals.iter().map(|i| i.0).max().unwrap_or(0);
    let hi = intervals.iter().map(|i| i.1).min().unwrap_or(0);
    if lo <= hi {
        return lo + (hi - lo) / 2;
    }
    let mut mids: Vec<i64> = intervals.iter().map(|&(l, h)| l + (h - l) / 2).collect();
    mids.sort_unstable();
    let n = mids.len();
    if n % 2 == 1 {
        mids[n / 2]
    } else {
        mids[n / 2 - 1] + (mids[n / 2] - mids[n / 2 - 1]) / 2
    }
}

fn end(s: &SpanRecord) -> i64 {
    s.start_unix_nano.saturating_add(s.duration_nano) as i64
}

/// The shift (ns, whole microseconds) to add to each span's times, by index: spans of the
/// root's host and of hosts with no path of pairs to it get 0.
pub(crate) fn shifts(spans: &[SpanRecord], pairs: &[(usize, usize)], root: usize) -> Vec<i64> {
    // Per host pair (ordered by name): intervals for shift(second) - shift(first).
    let mut between: HashMap<(&str, &str), Vec<Allowed>> = HashMap::new();
    for &(c, s) in pairs {
        let (client, server) = (&spans[c], &spans[s]);
        let (Some(a), Some(b)) = (host_of(client), host_of(server)) else {
            continue;
        };
        if a == b {
            continue;
        }
        let allowed = Allowed::of(client, server);
        if a < b {
            between.entry((a, b)).or_default().push(allowed);
        } else {
            between.entry((b, a)).or_default().push(allowed.reversed());
        }
    }
    // Hosts in a fixed order, so the walk (and so the result) does not depend on hashing.
    let mut keys: Vec<(&str, &str)> = between.keys().copied().collect();
    keys.sort();
    // What `host`'s pairs with `other` allow for shift(host), if `other` is shifted by `by`.
    let allowed_for = |host: &str, other: &str, by: i64| -> Vec<Allowed> {
        if host > other {
            between[&(other, host)]
                .iter()
                .map(|p| p.offset(by))
                .collect()
        } else {
            between[&(host, other)]
                .iter()
                .map(|p| p.reversed().offset(by))
                .collect()
        }
    };
    let mut shift_of: HashMap<&str, i64> = HashMap::new();
    if let Some(root_host) = host_of(&spans[root]) {
        shift_of.insert(root_host, 0);
        let mut queue = VecDeque::from([root_host]);
        while let Some(h) = queue.pop_front() {
            let neighbours = |x: &str| {
                keys.iter()
                    .filter_map(move |&(a, b)| {
                        if a == x {
                            Some(b)
                        } else if b == x {
                            Some(a)
                        } else {
                            None
                        }
                    })
                    .collect::<Vec<&str>>()
            };
            for next in neighbours(h) {
                if shift_of.contains_key(next) {
                    continue;
                }
                let mut upstream = Vec::new();
                let mut downstream = Vec::new();
                for other in neighbours(next) {
                    match shift_of.get(other) {
                        Some(&by) => upstream.extend(allowed_for(next, other, by)),
                        None => downstream.extend(allowed_for(next, other, 0)),
                    }
                }
                shift_of.insert(next, estimate_host(&upstream, &downstream));
                queue.push_back(next);
            }
        }
    }
    spans
        .iter()
        .map(|s| {
            let ns = host_of(s)
                .and_then(|h| shift_of.get(h))
                .copied()
                .unwrap_or(0);
            // Whole microseconds: what the query API shows, so shown times stay consistent.
            (ns as f64 / 1000.0).round() as i64 * 1000
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact intervals with no slack, as the unit tests reason about them.
    fn exact(intervals: &[(i64, i64)]) -> Vec<Allowed> {
        intervals
            .iter()
            .map(|&(lo, hi)| Allowed {
                lo,
                hi,
                lo_slack: 0,
                hi_slack: 0,
            })
            .collect()
    }

    #[test]
    fn zero_inside_every_interval_moves_nothing() {
        assert_eq!(estimate(&exact(&[(-5, 5), (-1, 100)]), 0), 0);
    }

    #[test]
    fn the_midpoint_of_the_intersection_is_chosen() {
        // B 50 ms ahead: its server spans start 50 ms after the client's in stored times.
        assert_eq!(estimate(&exact(&[(-52, -48)]), 0), -50);
        assert_eq!(
            estimate(&exact(&[(-60, -40), (-56, -45), (-58, -50)]), 0),
            -53
        );
    }

    #[test]
    fn inconsistent_pairs_take_the_median_of_midpoints() {
        assert_eq!(estimate(&exact(&[(-10, -8), (20, 22), (1, 3)]), 0), 2);
        assert_eq!(estimate(&exact(&[(-10, -8), (20, 22)]), 0), 6);
    }

    /// What one clock can show is no skew: a server ending a little after its client (its
    /// write returned after the client's read), or starting a little before it (the client's
    /// start fell back to its write's exit).
    #[test]
    fn the_slacks_leave_one_clock_alone() {
        let ms = 1_000_000;
        let overhang = Allowed {
            lo: -10 * ms,
            hi: -2 * ms,
            lo_slack: START_SLACK_NS,
            hi_slack: END_SLACK_NS,
        };
        assert_eq!(estimate(&[overhang], 0), 0);
        let late_start = Allowed {
            lo: ms / 10,
            hi: 20 * ms,
            lo_slack: START_SLACK_NS,
            hi_slack: END_SLACK_NS,
        };
        assert_eq!(estimate(&[late_start], 0), 0);
        // Past the slack it is skew.
        let skewed = Allowed {
            lo: 50 * ms,
            hi: 52 * ms,
            ..late_start
        };
        assert_eq!(estimate(&[skewed], 0), 51 * ms);
        // Reversed, the slacks swap sides.
        assert_eq!(overhang.reversed().lo, 2 * ms);
        assert_eq!(overhang.reversed().lo_slack, END_SLACK_NS);
    }

    /// A skewed host is placed by its pairs on both sides: its callers' (corrected) spans and
    /// its callees' (left as they are), so the callees fit inside it too.
    #[test]
    fn both_sides_narrow_a_corrected_host() {
        let ms = 1_000_000;
        let pair = |lo: i64, hi: i64| Allowed {
            lo,
            hi,
            lo_slack: START_SLACK_NS,
            hi_slack: END_SLACK_NS,
        };
        // Upstream alone: -52..-48 ms, midpoint -50. The callee's pair: -49.5..-47 ms.
        let up = [pair(-52 * ms, -48 * ms)];
        let down = [pair(-49 * ms - ms / 2, -47 * ms)];
        assert_eq!(estimate_host(&up, &[]), -50 * ms);
        assert_eq!(estimate_host(&up, &down), -48 * ms - 3 * ms / 4);
        // Upstream tolerating no shift: nothing moves, whatever downstream says.
        assert_eq!(estimate_host(&[pair(-ms / 10, 3 * ms)], &down), 0);
        // Sides that disagree: upstream decides.
        assert_eq!(estimate_host(&up, &[pair(10 * ms, 11 * ms)]), -50 * ms);
    }

    /// A host behind a corrected one keeps its own clock when its pairs fit it uncorrected:
    /// what the preferred value is for.
    #[test]
    fn a_host_that_fits_uncorrected_is_not_moved() {
        let ms = 1_000_000;
        // b's spans fit a's once a is moved by -200 ms: shift(b) - shift(a) in 199..201 ms.
        let pair = Allowed {
            lo: 199 * ms,
            hi: 201 * ms,
            lo_slack: START_SLACK_NS,
            hi_slack: END_SLACK_NS,
        };
        // a's own shift is -200 ms; b left alone means shift(b) - shift(a) = 200 ms.
        assert_eq!(estimate(&[pair], 200 * ms), 200 * ms);
    }
}
