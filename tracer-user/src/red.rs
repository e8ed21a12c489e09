//! Rate, errors and duration of every request the agent sees, as Prometheus histograms with the
//! OpenTelemetry names (`http.server.request.duration` and `http.client.request.duration`, in
//! seconds, as `http_server_request_duration_seconds` ...): counted from every span, whatever
//! happens to the span afterwards (exported, dropped on a full queue), so dashboards and alerts
//! see all traffic.
//!
//! A series is a service, a side, a method, a route (the span name's path template, already
//! low-cardinality) and a status code. They are capped at `MAX_SERIES`: past it, requests of a
//! new series are counted in `tracer_red_series_overflow_total` instead.
use std::{
    collections::HashMap,
    fmt::Write as _,
    hash::{BuildHasherDefault, Hash as _, Hasher as _},
    sync::{Arc, Mutex},
};

use crate::{
    export::ExportResource,
    hashing::{FxHasher, IdentityHasher},
    spans::Span,
};

/// OpenTelemetry's advised boundaries for HTTP durations, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
pub const MAX_SERIES: usize = 2000;

struct Series {
    service: String,
    server: bool,
    method: String,
    route: String,
    status: u16,
    counts: [u64; BUCKETS.len() + 1],
    sum_seconds: f64,
}

#[derive(Default)]
struct Table {
    /// By an FxHash of the labels (SipHash was most of the cost a span; a collision, which
    /// only chosen paths could aim for, merges two series' counts, nothing worse).
    series: HashMap<u64, Series, BuildHasherDefault<IdentityHasher>>,
    overflow: u64,
}

#[derive(Default)]
pub struct RedMetrics {
    table: Mutex<Table>,
}

impl RedMetrics {
    /// Counts `span` of `resource`; `name` is its span name (`METHOD /route`).
    pub fn record(&self, resource: &Arc<ExportResource>, span: &Span, name: &str) {
        // The histograms are HTTP's (http.server.request.duration...).
        let status = match &span.exchange.detail {
            crate::protocol::Detail::Http(http) => http.status.unwrap_or(0),
            crate::protocol::Detail::Http2(h2) if h2.grpc.is_none() => h2.http.status.unwrap_or(0),
            _ => return,
        };
        let ns = span.end_unix_nano.saturating_sub(span.start_unix_nano);
        self.add(resource, span.server_side(), name, status, 1, |series| {
            series.counts[bucket_of(ns)] += 1;
            series.sum_seconds += ns as f64 / 1e9;
        });
    }

    /// Adds exchanges counted in the kernel (`--metrics-only`): `buckets` by
    /// `tracer_common::red::BOUNDS_NS`, which are this module's `BUCKETS` in ns.
    pub fn record_counts(
        &self,
        resource: &Arc<ExportResource>,
        server: bool,
        name: &str,
        status: u16,
        buckets: &[u64; BUCKETS.len() + 1],
        sum_ns: u64,
    ) {
        self.add(
            resource,
            server,
            name,
            status,
            buckets.iter().sum(),
            |series| {
                for (to, n) in series.counts.iter_mut().zip(buckets) {
                    *to += n;
                }
                series.sum_seconds += sum_ns as f64 / 1e9;
            },
        );
    }

    /// Applies `count` to the series of these labels, or counts its `requests` as overflow
    /// when a new series would be one too many.
    fn add(
        &self,
        resource: &Arc<ExportResource>,
        server: bool,
        name: &str,
        status: u16,
        requests: u64,
        count: impl FnOnce(&mut Series),
    ) {
        let mut h = FxHasher::default();
        // By service name, not process: each curl is a process of its own, and one label set
        // must be one series.
        resource.service_name().hash(&mut h);
        server.hash(&mut h);
        name.hash(&mut h);
        status.hash(&mut h);
        let key = h.finish();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let full = table.series.len() >= MAX_SERIES;
        let series = match table.series.get_mut(&key) {
            Some(s) => s,
            None if full => {
                table.overflow += requests;
                return;
            }
            None => {
                let (method, route) = name.split_once(' ').unwrap_or((name, ""));
                table.series.entry(key).or_insert(Series {
                    service: resource.service_name().to_owned(),
                    server,
                    method: method.to_owned(),
                    route: route.to_owned(),
                    status,
                    counts: [0; BUCKETS.len() + 1],
                    sum_seconds: 0.0,
                })
            }
        };
        count(series);
    }

    /// The histograms in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for (server, name, help) in [
            (
                true,
                "http_server_request_duration_seconds",
                "Duration of HTTP requests served (http.server.request.duration), every request seen",
            ),
            (
                false,
                "http_client_request_duration_seconds",
                "Duration of HTTP requests made (http.client.request.duration), every request seen",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut rows: Vec<&Series> = table.series.values().filter(|s| s.server == server).collect();
            rows.sort_by(|a, b| {
                (&a.service, &a.route, &a.method, a.status).cmp(&(&b.service, &b.route, &b.method, b.status))
            });
            for s in rows {
                let labels = format!(
                    "service_name=\"{}\",http_request_method=\"{}\",http_route=\"{}\",http_response_status_code=\"{}\"",
                    escape(&s.service),
                    escape(&s.method),
                    escape(&s.route),
                    s.status
                );
                let mut cumulative = 0;
                for (i, le) in BUCKETS.iter().enumerate() {
                    cumulative += s.counts[i];
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                }
                cumulative += s.counts[BUCKETS.len()];
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.sum_seconds);
                let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP tracer_red_series_overflow_total Requests not in the duration histograms: over {MAX_SERIES} series\n\
             # TYPE tracer_red_series_overflow_total counter\ntracer_red_series_overflow_total {}",
            table.overflow
        );
    }
}

/// The bucket a duration of `ns` falls in: the first bound it does not exceed.
pub(crate) fn bucket_of(ns: u64) -> usize {
    let seconds = ns as f64 / 1e9;
    BUCKETS
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(BUCKETS.len())
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes bucket by `red::BOUNDS_NS`: they must be these boundaries, in ns.
    #[test]
    fn kernel_bounds_are_the_histograms() {
        let ns: Vec<u64> = BUCKETS.iter().map(|b| (b * 1e9).round() as u64).collect();
        assert_eq!(ns, tracer_common::red::BOUNDS_NS);
        for (i, bound) in tracer_common::red::BOUNDS_NS.iter().enumerate() {
            assert_eq!(bucket_of(*bound), i);
            assert_eq!(bucket_of(*bound + 1), i + 1);
        }
    }
}
