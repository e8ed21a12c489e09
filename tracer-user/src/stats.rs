//! The agent's counters: its own (records, spans, links...), the exporter's, the kernel's, and
//! the RED histograms; what the metrics endpoint serves and the exit summary prints.
use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};

use crate::{export::ExportStats, probes};

/// Counters of the agent's own work (the probes and the exporter keep theirs). Written by the
/// pipeline's thread alone (see [`count`]).
#[derive(Default, Debug)]
pub struct AgentStats {
    pub records: AtomicU64,
    pub undecodable_records: AtomicU64,
    /// Records of a connection whose `ConnRecord` was lost and whose probe state is gone.
    pub unknown_connection_records: AtomicU64,
    pub exchanges: AtomicU64,
    pub spans: AtomicU64,
    /// Spans built but not exported: their trace was not sampled (`--sample`).
    pub spans_unsampled: AtomicU64,
    pub connections_muted: AtomicU64,
    pub parse_failures: AtomicU64,
    /// HTTP heads not parsed again: the connection's other end, on this host, had parsed the
    /// same bytes (`protocol::http::memo`).
    pub heads_reused: AtomicU64,
    /// Switches of the agent from idle-only to normal priority (see priority.rs).
    pub priority_boosts: AtomicU64,
    /// Parent links the agent made, by `link::Source::index`.
    pub links: [AtomicU64; 8],
    /// Calls left without a parent while their process served requests (`Linker::unattributed`).
    pub calls_unattributed: AtomicU64,
    /// Injected calls the linker put in another trace than the header's
    /// (`Linker::injected_mismatch`).
    pub injected_mismatch: AtomicU64,
    /// Gauges: connections the pairer follows, processes whose facts are cached.
    pub connections: AtomicU64,
    pub processes: AtomicU64,
}

/// Adds one to a counter of [`AgentStats`]. Only the pipeline's thread writes them (the metrics
/// endpoint reads), so a plain load and store do. A locked add, on x86, first waits for all the
/// thread's earlier stores to reach the cache; perf put 4% of the agent on the one done for
/// every record, though swapping it made no difference beyond the noise of an A/B (4 rounds).
pub(crate) fn count(counter: &AtomicU64) {
    counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
}

/// Everything the metrics endpoint and the exit summary report.
#[derive(Default)]
pub struct Stats {
    pub agent: AgentStats,
    pub export: Arc<ExportStats>,
    pub kernel: std::sync::Mutex<probes::KernelCounters>,
    /// Every request's duration by service, route and status (`red.rs`).
    pub red: crate::red::RedMetrics,
    /// The `--also-export` endpoints' exporters: (metrics label, counters).
    pub also_exports: Vec<(String, Arc<ExportStats>)>,
}

/// One line with every counter: what was seen, sent, and lost where.
pub fn summary(stats: &Stats) -> String {
    use tracer_common::counter as c;
    let k = *stats.kernel.lock().unwrap_or_else(|e| e.into_inner());
    let a = &stats.agent;
    let e = &stats.export;
    let injected = k.get(c::CONTEXT_INJECTED);
    // Only with --inject-context (every counter of it is 0 otherwise).
    let injection = if injected + k.get(c::INJECT_HEADER_PRESENT) + k.get(c::INJECT_NOT_HTTP) > 0 {
        format!(
            " context_injected={injected} context_present={} context_not_http={} context_mismatch={}",
            k.get(c::INJECT_HEADER_PRESENT),
            k.get(c::INJECT_NOT_HTTP),
            a.injected_mismatch.load(Relaxed),
        )
    } else {
        String::new()
    };
    // Only with --sample-in-kernel's decisions carried across hosts.
    let (sent, received) = (k.get(c::DECISIONS_SENT), k.get(c::DECISIONS_RECEIVED));
    let carried = if sent + received > 0 {
        format!(" decisions_sent={sent} decisions_received={received}")
    } else {
        String::new()
    };
    format!(
        "counters: syscalls={} records={} ringbuf_drops={} conn_table_drops={} entry_time_missed={} \
         exchanges={} spans={} unsampled={} spans_sent={} export_dropped={} (queue_full={} rejected={} shutdown={}) \
         parse_failures={} heads_reused={} muted_connections={}{injection}{carried}",
        k.get(c::DATA_SYSCALLS),
        a.records.load(Relaxed),
        k.get(c::RINGBUF_FULL),
        k.get(c::CONN_TABLE_FULL),
        k.get(c::ENTRY_TIME_MISSED),
        a.exchanges.load(Relaxed),
        a.spans.load(Relaxed),
        a.spans_unsampled.load(Relaxed),
        e.spans_sent.load(Relaxed),
        e.dropped(),
        e.dropped_queue_full.load(Relaxed),
        e.dropped_rejected.load(Relaxed),
        e.dropped_shutdown.load(Relaxed),
        a.parse_failures.load(Relaxed),
        a.heads_reused.load(Relaxed),
        a.connections_muted.load(Relaxed),
    ) + &stats
        .also_exports
        .iter()
        .map(|(url, e)| {
            format!(
                " also_export[{url}]: sent={} dropped={}",
                e.spans_sent.load(Relaxed),
                e.dropped()
            )
        })
        .collect::<String>()
}
