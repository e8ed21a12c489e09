//! The agent's protocol parsers (HTTP/1.x, Redis) behind the connection layer: any sequence of
//! records, in either direction, with any captured prefix, gives exchanges or nothing, never a
//! panic, a hang or unbounded memory.
//!
//! The input is cut into records: a header byte (bit 0: direction; bits 1-3: how many of the
//! record's bytes were not captured, in 100s), then a length byte, then that many bytes. An
//! input whose first byte is odd starts with an HTTP/2 client preface, so that the fuzzer
//! reaches the frame and HPACK parsers without having to find 24 exact bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tracer_common::direction::{EGRESS, INGRESS};
use tracer_user::{
    pairing::{Chunk, Pairer},
    protocol::Protocols,
};

fuzz_target!(|data: &[u8]| {
    let mut pairer = Pairer::new(1_000, Protocols::all());
    let mut out = Vec::new();
    let mut rest = data;
    let mut t = 0u64;
    if data.first().is_some_and(|b| b & 1 == 1) {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let chunk = Chunk {
            direction: EGRESS,
            ts_enter: 1,
            ts_exit: 2,
            len: PREFACE.len() as u64,
            payload: PREFACE,
            tid: 1,
            tcp_seq: None,
            inserted: 0,
        };
        pairer.on_chunk(1, &chunk, &mut out, &mut ());
        rest = &data[1..];
    }
    while let [head, len, tail @ ..] = rest {
        let take = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(take);
        rest = next;
        t += 10;
        let chunk = Chunk {
            direction: if head & 1 == 0 { INGRESS } else { EGRESS },
            ts_enter: t,
            ts_exit: t + 5,
            len: payload.len() as u64 + u64::from((head >> 1) & 7) * 100,
            payload,
            tid: 1,
            tcp_seq: (head & 0x10 != 0).then_some(u32::from(*len) << 20),
            inserted: 0,
        };
        pairer.on_chunk(1, &chunk, &mut out, &mut ());
        if head & 0x20 != 0 {
            pairer.tick(t + 10_000, &mut out);
        }
        out.clear();
    }
    pairer.on_close(1, t + 1, &mut out);
});
