//! Walking length-prefixed messages (PostgreSQL's, MySQL's packets, HTTP/2 frames) in a byte stream of which
//! only a prefix of each message was captured: headers must have been captured, bodies are
//! skipped by length, and the first bytes of a body are kept when the protocol asks for them.

/// How a protocol frames its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A type byte, then a big-endian length that counts itself.
    Typed,
    /// PostgreSQL's startup and SSL request: the length alone.
    Untyped,
    /// MySQL: a 3-byte little-endian length of the payload, then a sequence number.
    MysqlPacket,
    /// HTTP/2: a 3-byte big-endian length of the payload, a type, flags and a stream id.
    H2,
}

/// A message longer than this is not one of the protocol's (PostgreSQL's own limit is 1 GiB;
/// a MySQL packet is at most 16 MiB).
const MAX_MESSAGE: u64 = 1 << 30;

impl Frame {
    fn header_len(self) -> usize {
        match self {
            Frame::H2 => 9,
            Frame::Typed => 5,
            Frame::Untyped | Frame::MysqlPacket => 4,
        }
    }

    /// The message's kind (its type byte; a packet's sequence number; 0 for an untyped
    /// message) and its body's length.
    fn parse(self, h: &[u8]) -> Option<(u8, u64)> {
        let (kind, body) = match self {
            Frame::Typed => (
                h[0],
                u64::from(u32::from_be_bytes([h[1], h[2], h[3], h[4]])),
            ),
            Frame::Untyped => (0, u64::from(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))),
            Frame::MysqlPacket => {
                let len = u64::from(u32::from_le_bytes([h[0], h[1], h[2], 0]));
                return Some((h[3], len));
            }
            Frame::H2 => {
                let len = u64::from(u32::from_be_bytes([0, h[0], h[1], h[2]]));
                return Some((h[3], len));
            }
        };
        // PostgreSQL's length counts its own four bytes.
        (4..MAX_MESSAGE).contains(&body).then_some((kind, body - 4))
    }
}

/// What happened in a record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A message begins `at` bytes into the record.
    Start { at: u64 },
    /// A whole message: its kind, the kept prefix of its body, its size with the header, and
    /// its header (HTTP/2's flags and stream id are there).
    Done {
        kind: u8,
        body: Vec<u8>,
        bytes: u64,
        head: [u8; 9],
    },
    /// A header was not captured, or is not the protocol's: where messages are is lost.
    /// `rest`: the record's bytes from there on.
    Lost { rest: u64 },
}

/// The message being walked in one direction.
pub(crate) struct Framer {
    frame: Frame,
    /// The next message is untyped (PostgreSQL's first, and the startup after a refused SSL
    /// request).
    untyped_next: bool,
    header: [u8; 9],
    have: usize,
    in_body: bool,
    kind: u8,
    left: u64,
    keep: usize,
    body: Vec<u8>,
    bytes: u64,
}

impl Framer {
    /// Messages framed as `frame` (`Typed` or `MysqlPacket`).
    pub(crate) fn new(frame: Frame) -> Self {
        Framer {
            frame,
            untyped_next: false,
            header: [0; 9],
            have: 0,
            in_body: false,
            kind: 0,
            left: 0,
            keep: 0,
            body: Vec::new(),
            bytes: 0,
        }
    }

    /// The next message has no type byte.
    pub(crate) fn expect_untyped(&mut self) {
        self.untyped_next = true;
    }

    /// Walks the next `total` bytes, of which `captured` is a prefix; `keep(kind)` says how
    /// many bytes of a message's body to keep.
    pub(crate) fn advance(
        &mut self,
        captured: &[u8],
        total: u64,
        keep: impl Fn(u8) -> usize,
        events: &mut Vec<Event>,
    ) {
        let mut i = 0u64;
        while i < total {
            if !self.in_body {
                if self.have == 0 {
                    events.push(Event::Start { at: i });
                }
                let frame = if self.untyped_next {
                    Frame::Untyped
                } else {
                    self.frame
                };
                let need = frame.header_len();
                while self.have < need && i < total {
                    let Some(&b) = usize::try_from(i).ok().and_then(|p| captured.get(p)) else {
                        events.push(Event::Lost { rest: total - i });
                        return;
                    };
                    self.header[self.have] = b;
                    self.have += 1;
                    i += 1;
                }
                if self.have < need {
                    return;
                }
                let Some((kind, body)) = frame.parse(&self.header[..need]) else {
                    events.push(Event::Lost { rest: total - i });
                    return;
                };
                self.have = 0;
                self.in_body = true;
                self.kind = kind;
                self.left = body;
                self.keep = keep(kind);
                self.body.clear();
                self.bytes = need as u64;
                self.untyped_next = false;
            }
            let take = self.left.min(total - i);
            if self.body.len() < self.keep {
                let here = usize::try_from(i)
                    .ok()
                    .and_then(|p| captured.get(p..))
                    .unwrap_or_default();
                let want = (take as usize).min(self.keep - self.body.len());
                self.body.extend_from_slice(&here[..here.len().min(want)]);
            }
            self.left -= take;
            self.bytes += take;
            i += take;
            if self.left == 0 {
                self.in_body = false;
                events.push(Event::Done {
                    kind: self.kind,
                    body: std::mem::take(&mut self.body),
                    bytes: self.bytes,
                    head: self.header,
                });
            }
        }
    }
}
