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
//! copy would be pure cost. Nor are those of an end whose kept heads go untaken (its peer is on
//! this host but not traced: see `GIVE_UP`).
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
    /// and, on a connection whose peer is on this host, kept for it unless `keeper` says
    /// nobody takes this end's heads.
    fn parse(
        &mut self,
        seq: Option<u32>,
        on_host: bool,
        keeper: &mut Keeper,
        buf: &[u8],
        parse: fn(&[u8]) -> Parse<T>,
    ) -> Parse<T> {
        let Some(seq) = seq.filter(|_| on_host) else {
            return parse(buf);
        };
        // Was the head this end kept last taken? (A slot reused since does not tell: counted
        // as taken.) The other end's record of it comes before this end's next head, but for
        // a pipelined batch.
        if let Some(last) = keeper.last.take() {
            let slot = &self.slots[last as usize % SLOTS];
            keeper.untaken = if slot.seq == last && slot.head.is_some() {
                keeper.untaken.saturating_add(1)
            } else {
                0
            };
        }
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
            if len > MAX_KEPT_HEAD || keeper.untaken >= GIVE_UP {
                return result;
            }
            slot.seq = seq;
            slot.bytes.clear();
            slot.bytes.extend_from_slice(&buf[..len]);
            slot.head = Some(head.clone());
            keeper.last = Some(seq);
        }
        result
    }
}

/// Heads one end of a connection kept in a row that nobody took before this end needed the
/// slot's answer: past it the other end is not traced here (a filter left it out, it runs in a
/// network namespace the agent does not watch) and this end stops keeping heads, which would
/// only cost a copy each.
const GIVE_UP: u8 = 16;

/// One end of a connection, for one kind of head: the last head it kept, and how many it kept
/// in a row that were not taken.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Keeper {
    last: Option<u32>,
    untaken: u8,
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
    /// connection whose other end is on this host when `peer_on_host`; `keeper`: this end's
    /// record of its kept requests.
    pub(crate) fn request(
        &mut self,
        seq: Option<u32>,
        peer_on_host: bool,
        keeper: &mut Keeper,
        buf: &[u8],
    ) -> Parse<RequestHead> {
        self.requests
            .parse(seq, peer_on_host, keeper, buf, head::parse_request)
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
        keeper: &mut Keeper,
        buf: &[u8],
    ) -> Parse<ResponseHead> {
        self.responses
            .parse(seq, peer_on_host, keeper, buf, head::parse_response)
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
        let first = complete(memo.request(Some(7), true, &mut Keeper::default(), REQ));
        assert!(memo.requests.slots[7].head.is_some());
        let second = complete(memo.request(Some(7), true, &mut Keeper::default(), REQ));
        assert_eq!(first, second);
        assert_eq!(second, complete(head::parse_request(REQ)));
        assert!(memo.requests.slots[7].head.is_none(), "taken, not copied");
    }

    /// Different bytes at the same sequence number (an inserted `traceparent`) are parsed.
    #[test]
    fn different_bytes_are_parsed() {
        let mut memo = HeadMemo::default();
        complete(memo.request(Some(7), true, &mut Keeper::default(), REQ));
        let injected = b"GET /a/1 HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nHost: x\r\n\r\n";
        let head = complete(memo.request(Some(7), true, &mut Keeper::default(), injected));
        assert!(head.context.is_some(), "parsed from its own bytes");
        // A head cut short on this end cannot match either.
        complete(memo.request(Some(9), true, &mut Keeper::default(), REQ));
        assert_eq!(
            memo.request(Some(9), true, &mut Keeper::default(), &REQ[..20]),
            head::parse_request(&REQ[..20])
        );
    }

    /// A connection whose peer is elsewhere keeps nothing; without a sequence number, or for a
    /// long head, neither.
    #[test]
    fn nothing_kept_off_host_or_without_seq() {
        let mut memo = HeadMemo::default();
        complete(memo.request(Some(7), false, &mut Keeper::default(), REQ));
        complete(memo.request(None, true, &mut Keeper::default(), REQ));
        assert!(memo.requests.slots.iter().all(|s| s.head.is_none()));
        let long = format!(
            "GET / HTTP/1.1\r\nCookie: {}\r\n\r\n",
            "c".repeat(MAX_KEPT_HEAD)
        );
        complete(memo.request(Some(8), true, &mut Keeper::default(), long.as_bytes()));
        assert!(
            memo.requests.slots.iter().all(|s| s.head.is_none()),
            "too long to keep"
        );
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let r = complete(memo.response(Some(3), true, &mut Keeper::default(), resp));
        assert_eq!(
            complete(memo.response(Some(3), true, &mut Keeper::default(), resp)),
            r
        );
    }

    /// An end whose kept heads nobody takes stops keeping them after `GIVE_UP` in a row; one
    /// whose heads are taken never stops.
    #[test]
    fn an_end_nobody_answers_stops_keeping() {
        let mut memo = HeadMemo::default();
        let (mut alone, mut paired, mut other) =
            (Keeper::default(), Keeper::default(), Keeper::default());
        for i in 0..40u32 {
            complete(memo.request(Some(1000 + i), true, &mut alone, REQ));
            complete(memo.request(Some(5000 + i), true, &mut paired, REQ));
            complete(memo.request(Some(5000 + i), true, &mut other, REQ));
        }
        let kept = |memo: &HeadMemo, base: u32| {
            (0..40u32)
                .filter(|i| {
                    memo.requests.slots[(base + i) as usize % SLOTS]
                        .head
                        .is_some()
                })
                .count()
        };
        assert_eq!(
            kept(&memo, 1000),
            usize::from(GIVE_UP),
            "kept until it gave up"
        );
        assert_eq!(memo.requests.hits, 40, "every paired head taken");
        assert_eq!(paired.untaken, 0);
    }
}
