//! Heads parsed once for both ends of a connection on this host.
//!
//! When client and server run on the same host (loopback, a local proxy, the bench), the agent
//! sees every head twice: written at one end, read at the other, each end with its own session.
//! Parsing is a pure function of the head's bytes, so the first end's parse is kept here, keyed
//! by the TCP sequence number of the head's first byte (both ends see the same number), and the
//! other end takes it if its bytes are the same. The bytes are compared in full: a head that
//! differs (a `traceparent` the probes inserted, a sequence number shared by chance) is parsed
//! again, so a match can only return what parsing would have.
//!
//! Heads of connections whose peer is elsewhere are not kept: nobody would take them, and the
//! copy would be pure cost.
use super::head::{self, RequestHead, ResponseHead};
use crate::pairing::{Head, Parse};

/// Slots per kind of head, indexed by the sequence number's low bits (initial sequence numbers
/// are random, so they spread). Between one end's record and the other's come the records of the
/// other connections in flight (50 in the bench's saturation); a slot lost to a collision only
/// costs a parse.
const SLOTS: usize = 512;

/// Longer heads (cookies, long URLs) are parsed at both ends: the slots then hold at most
/// ~2 MiB in all, where typical heads of 100-400 bytes take ~0.5 MiB.
const MAX_KEPT_HEAD: usize = 1024;

/// One kept head: its first byte's sequence number, its bytes, the parse.
struct Slot<T> {
    seq: u32,
    bytes: Vec<u8>,
    head: Option<T>,
}

struct Table<T> {
    slots: Vec<Slot<T>>,
    /// Heads taken from the other end's parse.
    hits: u64,
}

impl<T: Clone + Head> Table<T> {
    fn new() -> Self {
        Table {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    seq: 0,
                    bytes: Vec::new(),
                    head: None,
                })
                .collect(),
            hits: 0,
        }
    }

    /// `parse(buf)` where `buf` is a head starting at sequence number `seq`: taken from the
    /// other end's parse if its bytes (the `head_len` the parse took) are the same, else parsed
    /// and, if `keep`, kept for it.
    fn parse(
        &mut self,
        seq: Option<u32>,
        keep: bool,
        buf: &[u8],
        parse: fn(&[u8]) -> Parse<T>,
    ) -> Parse<T> {
        let Some(seq) = seq.filter(|_| keep) else {
            return parse(buf);
        };
        let slot = &mut self.slots[seq as usize % SLOTS];
        if slot.seq == seq && slot.head.is_some() && buf.starts_with(&slot.bytes) {
            if let Some(head) = slot.head.take() {
                self.hits += 1;
                return Parse::Complete(head);
            }
        }
        let result = parse(buf);
        if let Parse::Complete(head) = &result {
            let len = head.head_len().min(buf.len());
            if len > MAX_KEPT_HEAD {
                return result;
            }
            slot.seq = seq;
            slot.bytes.clear();
            slot.bytes.extend_from_slice(&buf[..len]);
            slot.head = Some(head.clone());
        }
        result
    }
}

/// Request and response heads kept for the other end (see the module's comment).
pub(crate) struct HeadMemo {
    requests: Table<RequestHead>,
    responses: Table<ResponseHead>,
}

impl Default for HeadMemo {
    fn default() -> Self {
        HeadMemo {
            requests: Table::new(),
            responses: Table::new(),
        }
    }
}

impl HeadMemo {
    /// `head::parse_request(buf)`, for a head whose first byte has sequence number `seq`, on a
    /// connection whose other end is on this host when `peer_on_host`.
    pub(crate) fn request(
        &mut self,
        seq: Option<u32>,
        peer_on_host: bool,
        buf: &[u8],
    ) -> Parse<RequestHead> {
        self.requests
            .parse(seq, peer_on_host, buf, head::parse_request)
    }

    /// Heads taken from the other end's parse, requests and responses.
    pub(crate) fn hits(&self) -> u64 {
        self.requests.hits + self.responses.hits
    }

    /// As `request`, for a response head.
    pub(crate) fn response(
        &mut self,
        seq: Option<u32>,
        peer_on_host: bool,
        buf: &[u8],
    ) -> Parse<ResponseHead> {
        self.responses
            .parse(seq, peer_on_host, buf, head::parse_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"GET /a/1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\nbody";

    fn complete<T>(p: Parse<T>) -> T {
        match p {
            Parse::Complete(h) => h,
            _ => panic!("not a complete head"),
        }
    }

    /// The other end takes the first end's parse, once; it equals a fresh parse.
    #[test]
    fn the_other_end_takes_the_parse() {
        let mut memo = HeadMemo::default();
        let first = complete(memo.request(Some(7), true, REQ));
        assert!(memo.requests.slots[7].head.is_some());
        let second = complete(memo.request(Some(7), true, REQ));
        assert_eq!(first, second);
        assert_eq!(second, complete(head::parse_request(REQ)));
        assert!(memo.requests.slots[7].head.is_none(), "taken, not copied");
    }

    /// Different bytes at the same sequence number (an inserted `traceparent`) are parsed.
    #[test]
    fn different_bytes_are_parsed() {
        let mut memo = HeadMemo::default();
        complete(memo.request(Some(7), true, REQ));
        let injected = b"GET /a/1 HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nHost: x\r\n\r\n";
        let head = complete(memo.request(Some(7), true, injected));
        assert!(head.context.is_some(), "parsed from its own bytes");
        // A head cut short on this end cannot match either.
        complete(memo.request(Some(9), true, REQ));
        assert_eq!(
            memo.request(Some(9), true, &REQ[..20]),
            head::parse_request(&REQ[..20])
        );
    }

    /// A connection whose peer is elsewhere keeps nothing; without a sequence number, or for a
    /// long head, neither.
    #[test]
    fn nothing_kept_off_host_or_without_seq() {
        let mut memo = HeadMemo::default();
        complete(memo.request(Some(7), false, REQ));
        complete(memo.request(None, true, REQ));
        assert!(memo.requests.slots.iter().all(|s| s.head.is_none()));
        let long = format!(
            "GET / HTTP/1.1\r\nCookie: {}\r\n\r\n",
            "c".repeat(MAX_KEPT_HEAD)
        );
        complete(memo.request(Some(8), true, long.as_bytes()));
        assert!(
            memo.requests.slots.iter().all(|s| s.head.is_none()),
            "too long to keep"
        );
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let r = complete(memo.response(Some(3), true, resp));
        assert_eq!(complete(memo.response(Some(3), true, resp)), r);
    }
}
