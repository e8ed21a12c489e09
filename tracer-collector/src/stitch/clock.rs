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
use std::collections::{HashMap, HashSet, VecDeque};

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

/// Whether a pair shows skew at all: its server span starts before its client span or ends
/// after it, beyond what one clock can show (the slacks above).
fn shows_skew(client: &SpanRecord, server: &SpanRecord) -> bool {
    let (c_start, s_start) = (client.start_unix_nano as i64, server.start_unix_nano as i64);
    s_start < c_start - START_SLACK_NS || end(server) > end(client) + END_SLACK_NS
}

/// The correction (ns) that puts `b`'s times in `a`'s clock, from intervals of allowed values
/// (`skewed`: some pair shows skew; otherwise nothing moves).
fn estimate(intervals: &[(i64, i64)], skewed: bool) -> i64 {
    if !skewed || intervals.iter().all(|&(lo, hi)| lo <= 0 && 0 <= hi) {
        return 0;
    }
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
    let mut between: HashMap<(&str, &str), Vec<(i64, i64)>> = HashMap::new();
    let mut skewed: HashSet<(&str, &str)> = HashSet::new();
    for &(c, s) in pairs {
        let (client, server) = (&spans[c], &spans[s]);
        let (Some(a), Some(b)) = (host_of(client), host_of(server)) else {
            continue;
        };
        if a == b {
            continue;
        }
        let lo = client.start_unix_nano as i64 - server.start_unix_nano as i64;
        let hi = end(client) - end(server);
        if shows_skew(client, server) {
            skewed.insert(if a < b { (a, b) } else { (b, a) });
        }
        if a < b {
            between.entry((a, b)).or_default().push((lo, hi));
        } else {
            between.entry((b, a)).or_default().push((-hi, -lo));
        }
    }
    let mut shift_of: HashMap<&str, i64> = HashMap::new();
    if let Some(root_host) = host_of(&spans[root]) {
        shift_of.insert(root_host, 0);
        let mut queue = VecDeque::from([root_host]);
        // Hosts in a fixed order, so the walk (and so the result) does not depend on hashing.
        let mut keys: Vec<&(&str, &str)> = between.keys().collect();
        keys.sort();
        while let Some(h) = queue.pop_front() {
            let base = shift_of[h];
            for &&(a, b) in &keys {
                let (next, sign) = if a == h {
                    (b, 1)
                } else if b == h {
                    (a, -1)
                } else {
                    continue;
                };
                if shift_of.contains_key(next) {
                    continue;
                }
                let rel = sign * estimate(&between[&(a, b)], skewed.contains(&(a, b)));
                shift_of.insert(next, base + rel);
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

    #[test]
    fn zero_inside_every_interval_moves_nothing() {
        assert_eq!(estimate(&[(-5, 5), (-1, 100)], true), 0);
        // Without a pair that shows skew, an end that overhangs moves nothing either.
        assert_eq!(estimate(&[(-5, -2)], false), 0);
    }

    #[test]
    fn the_midpoint_of_the_intersection_is_chosen() {
        // B 50 ms ahead: its server spans start 50 ms after the client's in stored times.
        assert_eq!(estimate(&[(-52, -48)], true), -50);
        assert_eq!(estimate(&[(-60, -40), (-56, -45), (-58, -50)], true), -53);
    }

    #[test]
    fn inconsistent_pairs_take_the_median_of_midpoints() {
        assert_eq!(estimate(&[(-10, -8), (20, 22), (1, 3)], true), 2);
        assert_eq!(estimate(&[(-10, -8), (20, 22)], true), 6);
    }
}
