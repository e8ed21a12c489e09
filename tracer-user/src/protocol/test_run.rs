//! Feeding records through the connection layer, for the protocols' tests.
use crate::pairing::{Chunk, ConnId, Exchange, Pairer};

use super::Protocols;

/// The connection the tests' records belong to.
pub(crate) const C: ConnId = 1;

/// Records fed with a clock that moves 10 ns a record (each syscall takes 5), and what comes
/// out.
pub(crate) struct Run {
    pub p: Pairer,
    pub out: Vec<Exchange>,
    pub t: u64,
}

impl Run {
    /// Every protocol detectable, a 1 ms idle timeout.
    pub(crate) fn new() -> Run {
        Run::with(Protocols::all())
    }

    pub(crate) fn with(protocols: Protocols) -> Run {
        Run {
            p: Pairer::new(1_000_000, protocols),
            out: Vec::new(),
            t: 0,
        }
    }

    /// A record whose payload is all of its bytes.
    pub(crate) fn rec(&mut self, dir: u32, bytes: &[u8]) {
        self.rec_len(dir, bytes.len() as u64, bytes);
    }

    /// A record that moved `len` bytes of which only `payload` was captured.
    pub(crate) fn rec_len(&mut self, dir: u32, len: u64, payload: &[u8]) {
        self.t += 10;
        let chunk = Chunk {
            direction: dir,
            ts_enter: self.t,
            ts_exit: self.t + 5,
            len,
            payload,
            tid: 1,
            tcp_seq: None,
            inserted: 0,
        };
        self.p.on_chunk(C, &chunk, &mut self.out, &mut ());
    }
}
