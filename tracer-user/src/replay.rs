//! `tracer agent --record FILE` and `tracer replay FILE`: the agent's own work (decoding,
//! pairing, spans, OTLP encoding) on recorded ring-buffer records, without probes or network.
//! Deterministic enough to compare builds, and to run under `valgrind --tool=callgrind` for
//! instruction counts; `cargo xtask bench` prints it next to the live agent's CPU.
use std::sync::{atomic::Ordering::Relaxed, Arc};

use anyhow::Context as _;

use crate::{
    pipeline::{Filters, Pipeline, Sink},
    recording::body_of,
    records::{self, Record},
    stats::{summary, Stats},
};

/// The records of a recording, each copied to an 8-byte aligned place (as the ring buffer
/// hands them out) in one buffer, and where each is in it. A record cut short (the agent was
/// killed mid-write) ends the recording.
fn read_records(data: &[u8]) -> (Vec<u64>, Vec<std::ops::Range<usize>>) {
    let mut words: Vec<u64> = Vec::with_capacity(data.len() / 8 + 1);
    let mut places = Vec::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        let Some(record) = tail.get(..len) else {
            log::warn!("the recording ends inside a record; replaying what precedes it");
            break;
        };
        let at = words.len() * 8;
        // Whole words without a copy call each (the general `chunks` copy was ~110 M
        // instructions of a 200k-record replay under callgrind, before any record was handled).
        let whole = record.chunks_exact(8);
        let last = whole.remainder();
        words.extend(whole.map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default())));
        if !last.is_empty() {
            let mut w = [0u8; 8];
            w[..last.len()].copy_from_slice(last);
            words.push(u64::from_ne_bytes(w));
        }
        places.push(at..at + len);
        rest = &tail[len..];
    }
    (words, places)
}

/// Records a live agent drains at a time in a replay: what a 50 ms drain finds at ~10k
/// requests/s.
const REPLAY_DRAIN: usize = 2048;

/// `tracer replay`: runs recorded ring-buffer records through the agent's own work (decoding,
/// pairing, spans, OTLP encoding; no probes, no network) `repeat` times, and reports the CPU it
/// took per record and per span. Deterministic enough to compare builds, and to run under
/// `valgrind --tool=callgrind` for instruction counts.
///
/// `print_spans`: the spans are printed as JSON lines (as `tracer agent --stdout` does) instead
/// of encoded and dropped, and the figures go to stderr.
pub fn replay(
    file: &std::path::Path,
    repeat: usize,
    ports: Vec<u16>,
    print_spans: bool,
) -> anyhow::Result<()> {
    let data =
        std::fs::read(file).with_context(|| format!("reading the recording {}", file.display()))?;
    let body = body_of(&data).with_context(|| format!("replaying {}", file.display()))?;
    let (mut words, places) = read_records(body);
    drop(data);
    if places.is_empty() {
        anyhow::bail!(
            "{} holds no records: record some traffic first with `tracer agent --record FILE`",
            file.display()
        );
    }
    let stats = Arc::new(Stats::default());
    let filters = Filters::only_ports(ports);
    let sink = if print_spans {
        Sink::Stdout
    } else {
        Sink::discard()
    };
    let mut pipeline = Pipeline::new(Vec::new(), filters, sink, stats.clone()).replaying();
    let cpu = || {
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        us(ru.ru_utime) + us(ru.ru_stime)
    };
    // Each pass runs later than the one before, as live traffic would: the timestamps of every
    // record move on by the recording's length (word offsets: records are 8-byte aligned).
    let (enter, exit) = (
        std::mem::offset_of!(tracer_common::RecordHeader, ts_enter) / 8,
        std::mem::offset_of!(tracer_common::RecordHeader, ts_exit) / 8,
    );
    let stamps: Vec<u64> = places.iter().map(|p| words[p.start / 8 + exit]).collect();
    let first = stamps.iter().min().copied().unwrap_or(0);
    let last = stamps.iter().max().copied().unwrap_or(0);
    // Passes an hour apart, each ending with its connections expired: a connection whose
    // close the recording missed would otherwise carry its state into the next pass.
    let shift = last - first + 3_600_000_000_000;
    let mut cpu_ns = 0.0;
    for pass in 0..repeat.max(1) {
        if pass > 0 {
            for p in &places {
                words[p.start / 8 + enter] += shift;
                words[p.start / 8 + exit] += shift;
            }
        }
        // SAFETY: u64s are plain bytes; the slice covers the vector's initialised words.
        let arena: &[u8] =
            unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) };
        let records: Vec<&[u8]> = places.iter().map(|r| &arena[r.clone()]).collect();
        let start = cpu();
        for drain in records.chunks(REPLAY_DRAIN) {
            for record in drain {
                pipeline.handle(record);
            }
            if let Some(Record::Data { record, .. }) = drain.last().and_then(|r| records::decode(r))
            {
                pipeline.tick_at(record.header.ts_exit);
            }
            pipeline.flush_outbox();
        }
        if pass + 1 == repeat.max(1) {
            pipeline.flush_outbox();
        }
        cpu_ns += (cpu() - start) as f64 * 1000.0;
        pipeline.tick_at(last + pass as u64 * shift + 1_800_000_000_000);
        pipeline.flush_outbox();
    }
    let a = &stats.agent;
    let (n_records, n_spans) = (a.records.load(Relaxed), a.spans.load(Relaxed));
    log::info!("{}", summary(&stats));
    let figures = format!(
        "replayed {} records x {}: {} records, {} spans, {} exchanges; CPU {:.0} ns per record, \
         {:.0} ns per span ({:.2} s in all)",
        places.len(),
        repeat.max(1),
        n_records,
        n_spans,
        a.exchanges.load(Relaxed),
        cpu_ns / n_records.max(1) as f64,
        cpu_ns / n_spans.max(1) as f64,
        cpu_ns / 1e9
    );
    if print_spans {
        eprintln!("{figures}");
    } else {
        println!("{figures}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::{write_header, write_record, MAGIC};

    /// A recording gives back each record whole and 8-byte aligned (records are read in place
    /// as `DataRecord`s), and a record cut short ends it without failing the replay.
    #[test]
    fn recordings_give_back_aligned_records() {
        let records: [&[u8]; 3] = [b"first record", b"", b"third, longer than eight"];
        let mut file = Vec::new();
        for r in records {
            write_record(&mut file, r).unwrap();
        }
        file.extend_from_slice(&100u32.to_le_bytes());
        file.extend_from_slice(b"cut short");
        let mut recording = Vec::new();
        write_header(&mut recording).unwrap();
        recording.extend_from_slice(&file);
        let (words, places) = read_records(body_of(&recording).unwrap());
        let arena: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let got: Vec<&[u8]> = places.iter().map(|p| &arena[p.clone()]).collect();
        assert_eq!(got, records);
        assert!(places.iter().all(|p| p.start % 8 == 0));
    }

    /// A file without the header, or from another record layout, is refused with the reason.
    #[test]
    fn recordings_of_another_layout_are_refused() {
        let err = body_of(b"\x10\0\0\0some record").unwrap_err().to_string();
        assert!(err.contains("no header"), "{err}");
        let mut old = MAGIC.to_vec();
        old.extend_from_slice(&1u32.to_le_bytes());
        let err = body_of(&old).unwrap_err().to_string();
        assert!(
            err.contains("layout 1") && err.contains("record again"),
            "{err}"
        );
    }
}
