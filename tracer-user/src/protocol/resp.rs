//! Walking RESP (the Redis serialization protocol, versions 2 and 3) values in a byte stream of
//! which only a prefix of each message was captured.
//!
//! Values are found by their framing alone: type lines (`*3`, `$5`, `+OK`...) must have been
//! captured, bulk data is skipped by length. Of each top-level value the walker keeps what a
//! span needs: its type, and the text of its first two elements (a command and its key; a
//! reply's error code or a pub/sub message kind), each cut to [`KEEP_BYTES`].

/// Longest type line buffered across records (lengths and counts are a few bytes; simple
/// strings and errors are short).
const MAX_LINE: usize = 1024;

/// Deepest nesting followed; deeper values are given up (real replies nest a few levels).
const MAX_DEPTH: usize = 16;

/// Bytes kept of an element's text.
pub const KEEP_BYTES: usize = 128;

/// What is kept of one top-level value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Value {
    /// The type byte: `*` array, `+` simple string, `-` error, `$` bulk string, `>` push...
    pub kind: u8,
    /// Elements of an aggregate (for `%` maps, keys and values both count); -1 for null.
    pub count: i64,
    /// Text of the first two elements of an aggregate (bulk or simple strings), or of the
    /// value itself when it is a string or an error; cut to [`KEEP_BYTES`].
    pub texts: [Vec<u8>; 2],
    /// An element's text was not captured whole.
    pub cut: bool,
    /// Bytes the value took in the stream.
    pub bytes: u64,
}

/// What happened in a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A top-level value begins `at` bytes into the record.
    Start { at: u64 },
    /// A top-level value ended.
    Done(Value),
    /// Framing that was not captured, or is not RESP: where values are is lost.
    Lost,
}

/// A walker for one direction of a connection.
#[derive(Debug, Default)]
pub struct Walker {
    /// Elements still to come in each open aggregate, outermost first.
    open: Vec<u64>,
    /// Bytes of bulk data (and its CRLF) still to skip.
    bulk_left: u64,
    /// The bulk data being skipped is kept in `texts[slot]`.
    bulk_slot: Option<usize>,
    /// A type line begun in an earlier record.
    line: Vec<u8>,
    /// The top-level value in progress.
    value: Value,
    /// Inside a top-level value.
    in_value: bool,
}

impl Walker {
    /// Forgets everything (after losing track).
    pub fn reset(&mut self) {
        *self = Walker::default();
    }

    /// Walks the next `total` bytes of the stream, of which `captured` is a prefix, pushing
    /// what happened to `events`. Stops at the first `Lost`.
    pub fn advance(&mut self, captured: &[u8], total: u64, events: &mut Vec<Event>) {
        let mut i = 0u64;
        while i < total {
            if self.bulk_left > 0 {
                let take = self.bulk_left.min(total - i);
                if let Some(slot) = self.bulk_slot {
                    // Only the data is text, not its CRLF.
                    let data_left = self.bulk_left.saturating_sub(2);
                    let want = take.min(data_left) as usize;
                    let here = usize::try_from(i)
                        .ok()
                        .and_then(|p| captured.get(p..))
                        .unwrap_or_default();
                    let have = &here[..here.len().min(want)];
                    let text = &mut self.value.texts[slot];
                    let room = KEEP_BYTES.saturating_sub(text.len());
                    text.extend_from_slice(&have[..have.len().min(room)]);
                    if have.len() < want.min(room) {
                        self.value.cut = true;
                    }
                }
                self.bulk_left -= take;
                self.value.bytes += take;
                i += take;
                if self.bulk_left == 0 {
                    self.bulk_slot = None;
                    self.element_done(events);
                }
                continue;
            }
            if !self.in_value {
                self.in_value = true;
                self.value = Value::default();
                events.push(Event::Start { at: i });
            }
            // A type line: its bytes must have been captured.
            let Some(rest) = usize::try_from(i).ok().and_then(|p| captured.get(p..)) else {
                events.push(Event::Lost);
                return;
            };
            let avail = &rest[..rest.len().min((total - i) as usize)];
            if avail.is_empty() {
                events.push(Event::Lost);
                return;
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let consumed = end + 1;
                    self.value.bytes += consumed as u64;
                    i += consumed as u64;
                    let ok = if self.line.is_empty() {
                        self.on_line(&avail[..consumed], events)
                    } else {
                        if self.line.len() + consumed > MAX_LINE {
                            events.push(Event::Lost);
                            return;
                        }
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&avail[..consumed]);
                        let ok = self.on_line(&line, events);
                        line.clear();
                        self.line = line;
                        ok
                    };
                    if !ok {
                        events.push(Event::Lost);
                        return;
                    }
                }
                None => {
                    if self.line.len() + avail.len() > MAX_LINE || (avail.len() as u64) < total - i
                    {
                        // Too long, or the line goes on in bytes nobody captured.
                        events.push(Event::Lost);
                        return;
                    }
                    self.line.extend_from_slice(avail);
                    self.value.bytes += avail.len() as u64;
                    i += avail.len() as u64;
                }
            }
        }
    }

    /// A whole type line, CRLF included. False if it is not RESP.
    fn on_line(&mut self, line: &[u8], events: &mut Vec<Event>) -> bool {
        let Some(body) = line.strip_suffix(b"\r\n") else {
            return false;
        };
        let Some((&kind, text)) = body.split_first() else {
            return false;
        };
        let top = self.open.is_empty();
        if top {
            self.value.kind = kind;
        }
        // Which text slot this element fills: the value itself, or its first two elements.
        let slot = if top {
            Some(0)
        } else if self.open.len() == 1 {
            let index = self.value.count.unsigned_abs() - self.open[0];
            (index < 2).then_some(index as usize)
        } else {
            None
        };
        match kind {
            b'+' | b'-' => {
                if let Some(s) = slot {
                    let keep = text.len().min(KEEP_BYTES);
                    self.value.texts[s].extend_from_slice(&text[..keep]);
                }
                self.element_done(events);
            }
            b':' | b',' | b'(' | b'#' | b'_' => self.element_done(events),
            b'$' | b'!' | b'=' => match parse_len(text) {
                Some(-1) if kind == b'$' => self.element_done(events),
                Some(n) if n >= 0 => {
                    self.bulk_left = n as u64 + 2;
                    self.bulk_slot = slot;
                }
                _ => return false,
            },
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let Some(n) = parse_len(text) else {
                    return false;
                };
                let n = if matches!(kind, b'%' | b'|') {
                    n.saturating_mul(2)
                } else {
                    n
                };
                if top {
                    self.value.count = n;
                }
                if n <= 0 {
                    // Empty, or null (RESP2's `*-1`).
                    self.element_done(events);
                } else if self.open.len() >= MAX_DEPTH {
                    return false;
                } else {
                    self.open.push(n as u64);
                }
            }
            _ => return false,
        }
        true
    }

    /// An element (or the top-level value) ended.
    fn element_done(&mut self, events: &mut Vec<Event>) {
        loop {
            match self.open.last_mut() {
                None => {
                    let value = std::mem::take(&mut self.value);
                    self.in_value = false;
                    // An attribute (`|`) only annotates the value that follows it.
                    if value.kind == b'|' {
                        self.in_value = true;
                        self.value.bytes = value.bytes;
                        return;
                    }
                    events.push(Event::Done(value));
                    return;
                }
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        return;
                    }
                    self.open.pop();
                }
            }
        }
    }
}

/// A length or count: `-1` or a non-negative decimal of at most 18 digits.
fn parse_len(text: &[u8]) -> Option<i64> {
    if text == b"-1" {
        return Some(-1);
    }
    if text.is_empty() || text.len() > 18 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(w: &mut Walker, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        w.advance(bytes, bytes.len() as u64, &mut events);
        events
    }

    fn texts(e: &Event) -> (u8, Vec<String>) {
        match e {
            Event::Done(v) => (
                v.kind,
                v.texts
                    .iter()
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .collect(),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_command_and_its_key() {
        let mut w = Walker::default();
        let cmd = b"*3\r\n$3\r\nSET\r\n$7\r\nuser:42\r\n$5\r\nhello\r\n";
        let ev = walk(&mut w, cmd);
        assert_eq!(ev[0], Event::Start { at: 0 });
        assert_eq!(texts(&ev[1]), (b'*', vec!["SET".into(), "user:42".into()]));
        match &ev[1] {
            Event::Done(v) => assert_eq!((v.count, v.bytes), (3, cmd.len() as u64)),
            _ => unreachable!(),
        }
        assert!(!w.in_value && w.line.is_empty() && w.open.is_empty());
    }

    #[test]
    fn pipelined_commands_split_anywhere() {
        let two = b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*1\r\n$4\r\nPING\r\n";
        for cut in 0..=two.len() {
            let mut w = Walker::default();
            let mut ev = walk(&mut w, &two[..cut]);
            ev.extend(walk(&mut w, &two[cut..]));
            let done: Vec<_> = ev
                .iter()
                .filter(|e| matches!(e, Event::Done(_)))
                .map(texts)
                .collect();
            assert_eq!(
                done,
                vec![
                    (b'*', vec!["GET".into(), "a".into()]),
                    (b'*', vec!["PING".into(), String::new()])
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bulk_data_is_skipped_by_length_even_uncaptured() {
        let mut w = Walker::default();
        let mut ev = Vec::new();
        // `$1000000` then a megabyte nobody captured, then the next reply.
        let head = b"$1000000\r\nabc";
        w.advance(head, 10 + 1_000_002, &mut ev);
        ev.extend(walk(&mut w, b"+OK\r\n"));
        let done: Vec<_> = ev
            .iter()
            .filter(|e| matches!(e, Event::Done(_)))
            .map(texts)
            .collect();
        assert_eq!(
            done,
            vec![
                (b'$', vec!["abc".into(), String::new()]),
                (b'+', vec!["OK".into(), String::new()])
            ]
        );
    }

    #[test]
    fn resp3_aggregates_and_errors() {
        let mut w = Walker::default();
        let ev = walk(
            &mut w,
            b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n_\r\n#t\r\n-WRONGTYPE Operation\r\n|1\r\n+k\r\n+v\r\n,1.5\r\n",
        );
        let done: Vec<_> = ev
            .iter()
            .filter(|e| matches!(e, Event::Done(_)))
            .map(texts)
            .collect();
        assert_eq!(
            done,
            vec![
                (b'%', vec!["a".into(), String::new()]),
                (b'-', vec!["WRONGTYPE Operation".into(), String::new()]),
                (b',', vec![String::new(), String::new()]),
            ]
        );
    }

    #[test]
    fn uncaptured_or_foreign_framing_is_lost() {
        let mut w = Walker::default();
        let mut ev = Vec::new();
        w.advance(b"*2\r\n", 4 + 20, &mut ev);
        assert_eq!(ev.last(), Some(&Event::Lost));
        let mut w = Walker::default();
        assert_eq!(
            walk(&mut w, b"GET / HTTP/1.1\r\n").last(),
            Some(&Event::Lost)
        );
        let mut w = Walker::default();
        assert_eq!(
            walk(&mut w, b"*99999999999999999999\r\n").last(),
            Some(&Event::Lost)
        );
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        let mut w = Walker::default();
        assert_eq!(walk(&mut w, deep.as_bytes()).last(), Some(&Event::Lost));
    }
}
