//! OTLP/HTTP protobuf bodies straight to store spans, without `prost`'s intermediate structs.
//!
//! `prost` decodes an `ExportTraceServiceRequest` into a tree of structs (every attribute key
//! and value its own `String`, every list a growing `Vec`) that `convert` then takes apart; that
//! was a quarter of the collector's CPU per span. This reads the body once into [`Decoded`],
//! whose spans borrow every string from the body, and ingest lends them to the store as they
//! are ([`Decoded::with_spans`], `SpanStore::write_refs`): no string is copied or allocated per
//! attribute. [`spans_from_protobuf`] makes owned records of them, the same as
//! `convert::spans_from_request(ExportTraceServiceRequest::decode(body)?)` (a test compares
//! them on many requests, mutated ones too), with these decisions:
//!
//! - Wire format as `prost` reads it: fields in any order, unknown fields (any wire type,
//!   groups included) skipped, so newer OTLP versions keep working; a repeated singular field
//!   merges the way protobuf says (last scalar wins, sub-messages merge, repeated fields
//!   append). Known fields are checked for their wire type, and strings for UTF-8, even those
//!   the store ignores (`trace_state`, `schema_url`, ...), so that a body is accepted exactly
//!   when `prost` accepts it.
//! - Arrays and key-value lists (rare, and rendered as JSON text anyway) are handed to `prost`
//!   and then to `convert`'s JSON rendering, so they come out byte for byte as before. The
//!   one difference: `prost` limits nesting to 100 levels counted from the request, this
//!   from the array value (~6 levels deeper); both reject deeper input.
//! - Errors: [`Error::Malformed`] for a body that is not protobuf of this shape (with the byte
//!   offset and the message being read), [`Error::Invalid`] for a span that fails
//!   `convert::check_span`, with the same message as the `prost` path. A malformed body wins
//!   over an invalid span anywhere in it, as when the whole body was decoded first; the first
//!   invalid span is the one reported. Nothing ever panics on input: every read is
//!   bounds-checked.
//! - Spans may come before their resource or scope in the wire order; each span gets them
//!   when its `ResourceSpans`/`ScopeSpans` ends. One `Arc` resource per `ResourceSpans`.
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value::Value, ArrayValue, KeyValueList};
use prost::Message as _;
use tracer_store::{
    AttrValue, AttrValueRef, KeyValue, KeyValueRef, SpanEventRef, SpanId, SpanLinkRef, SpanRecord,
    SpanRef, TraceId,
};

use crate::convert::{self, check_span, json_value, UNKNOWN_SERVICE};

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not an `ExportTraceServiceRequest` in protobuf.
    Malformed(String),
    /// Well-formed, but a span fails the checks (`convert::check_span`'s message).
    Invalid(String),
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const I32: u8 = 5;

/// Groups nested deeper than this (only in skipped unknown fields) are refused, as `prost` does.
const MAX_GROUP_DEPTH: u32 = 100;

fn wire_type_name(wt: u8) -> &'static str {
    match wt {
        VARINT => "varint",
        I64 => "64-bit",
        LEN => "length-delimited",
        START_GROUP => "start-group",
        END_GROUP => "end-group",
        I32 => "32-bit",
        _ => "invalid",
    }
}

/// A decoding failure: what went wrong, where, and in which message. Boxed, so that every
/// `Result` of the hot reads fits in two registers.
#[derive(Debug)]
struct Fail(Box<FailAt>);

#[derive(Debug)]
struct FailAt {
    at: usize,
    what: &'static str,
    reason: String,
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at byte {} (in {})",
            self.0.reason, self.0.at, self.0.what
        )
    }
}

type R<T> = Result<T, Fail>;

/// A bounds-checked cursor over the body. `end` is the end of the message being read, so a
/// field that runs past its message is caught where it starts.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
    /// The message being read, for error messages.
    what: &'static str,
}

impl<'a> Reader<'a> {
    #[cold]
    fn fail<T>(&self, at: usize, reason: impl Into<String>) -> R<T> {
        Err(Fail(Box::new(FailAt {
            at,
            what: self.what,
            reason: reason.into(),
        })))
    }

    fn more(&self) -> bool {
        self.pos < self.end
    }

    #[inline(always)]
    fn varint(&mut self) -> R<u64> {
        // Fast path: one byte (tags, small lengths, kinds, codes).
        if let Some(&b) = self.buf[..self.end].get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        self.varint_slow()
    }

    fn varint_slow(&mut self) -> R<u64> {
        let start = self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf[..self.end].get(self.pos) else {
                return self.fail(start, "truncated varint");
            };
            self.pos += 1;
            // The tenth byte holds only the top bit of a u64 (and must end the varint).
            if i == 9 && b > 1 {
                return self.fail(start, "varint longer than 10 bytes or over 64 bits");
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        // Not reached (the tenth byte either ends the varint or fails above); no panic path.
        self.fail(start, "varint longer than 10 bytes")
    }

    /// A field key: (field number, wire type).
    #[inline(always)]
    fn key(&mut self) -> R<(u32, u8)> {
        let at = self.pos;
        let key = self.varint()?;
        let Ok(key) = u32::try_from(key) else {
            return self.fail(at, format!("field key {key} out of range"));
        };
        let wt = (key & 7) as u8;
        if wt > I32 {
            return self.fail(at, format!("invalid wire type {wt}"));
        }
        if key >> 3 == 0 {
            return self.fail(at, "field number 0");
        }
        Ok((key >> 3, wt))
    }

    #[inline(always)]
    fn expect(&self, field: u32, name: &str, wt: u8, want: u8) -> R<()> {
        if wt == want {
            return Ok(());
        }
        self.wrong_wire_type(field, name, wt, want)
    }

    #[cold]
    #[inline(never)]
    fn wrong_wire_type(&self, field: u32, name: &str, wt: u8, want: u8) -> R<()> {
        self.fail(
            self.pos,
            format!(
                "field {field} ({name}) has wire type {wt} ({}), expected {want} ({})",
                wire_type_name(wt),
                wire_type_name(want)
            ),
        )
    }

    #[inline(always)]
    fn take(&mut self, n: u64) -> R<&'a [u8]> {
        let at = self.pos;
        // `pos <= end`, so `end - at` cannot underflow; `n` as u64 compares without overflow.
        if n <= (self.end - at) as u64 {
            self.pos = at + n as usize;
            return Ok(&self.buf[at..self.pos]);
        }
        self.past_end(n)
    }

    #[cold]
    #[inline(never)]
    fn past_end<T>(&self, n: u64) -> R<T> {
        self.fail(
            self.pos,
            format!(
                "{n} bytes announced, {} left in the message",
                self.end - self.pos
            ),
        )
    }

    /// A length-delimited field's payload (the key already read).
    #[inline(always)]
    fn bytes(&mut self) -> R<&'a [u8]> {
        let n = self.varint()?;
        self.take(n)
    }

    #[inline(always)]
    fn str(&mut self) -> R<&'a str> {
        let at = self.pos;
        let b = self.bytes()?;
        // Nearly every string is ASCII, which `is_ascii` checks a word at a time; the full
        // UTF-8 validation is for the rest.
        if b.is_ascii() {
            // SAFETY: ASCII is valid UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(b) });
        }
        self.utf8(at, b)
    }

    #[inline(never)]
    fn utf8(&self, at: usize, b: &'a [u8]) -> R<&'a str> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s),
            Err(_) => self.fail(at, "a string field is not valid UTF-8"),
        }
    }

    fn fixed64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// Reads a nested message with `f`, which must consume it exactly (it reads until `end`).
    #[inline]
    fn message<T>(&mut self, what: &'static str, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        let n = self.varint()?;
        let start = self.pos;
        self.take(n)?;
        let (outer_end, outer_what) = (self.end, self.what);
        self.end = self.pos;
        self.pos = start;
        self.what = what;
        let v = f(self)?;
        debug_assert_eq!(self.pos, self.end);
        self.end = outer_end;
        self.what = outer_what;
        Ok(v)
    }

    /// Skips a field of any wire type (the key already read).
    fn skip(&mut self, field: u32, wt: u8) -> R<()> {
        self.skip_depth(field, wt, 0)
    }

    fn skip_depth(&mut self, field: u32, wt: u8, depth: u32) -> R<()> {
        match wt {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            I32 => self.take(4).map(drop),
            LEN => self.bytes().map(drop),
            START_GROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return self.fail(self.pos, "groups nested too deeply");
                }
                loop {
                    if !self.more() {
                        return self.fail(self.pos, format!("group {field} is not closed"));
                    }
                    let at = self.pos;
                    let (f, w) = self.key()?;
                    if w == END_GROUP {
                        if f != field {
                            return self.fail(
                                at,
                                format!("group {field} closed by an end-group of field {f}"),
                            );
                        }
                        return Ok(());
                    }
                    self.skip_depth(f, w, depth + 1)?;
                }
            }
            _ => self.fail(self.pos, format!("unexpected end-group of field {field}")),
        }
    }

    /// Skips a known scalar field that the store does not keep, after checking its wire type
    /// as `prost` would. (Known strings the store ignores are read with `str`, which checks
    /// their UTF-8 the same way.)
    fn ignore(&mut self, field: u32, name: &str, wt: u8, want: u8) -> R<()> {
        self.expect(field, name, wt, want)?;
        self.skip(field, wt)
    }
}

/// A span's fields as read, borrowing from the body.
#[derive(Default)]
struct RawSpan<'a> {
    trace_id: &'a [u8],
    span_id: &'a [u8],
    parent_span_id: &'a [u8],
    name: &'a str,
    kind: i32,
    start: u64,
    end: u64,
    status_code: i32,
    status_message: &'a str,
}

/// A range of [`Decoded::attrs`] (or of its events and links).
#[derive(Clone, Copy, Default)]
struct Span32 {
    start: u32,
    end: u32,
}

impl Span32 {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// Text that is in the body, or was made while decoding (`Decoded::owned`).
#[derive(Clone, Copy)]
enum Text<'a> {
    Body(&'a str),
    Owned(u32),
}

struct OutSpan<'a> {
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: Option<SpanId>,
    name: &'a str,
    kind: i32,
    start: u64,
    duration: u64,
    status_code: i32,
    status_message: &'a str,
    attrs: Span32,
    events: Span32,
    links: Span32,
    /// Index in `Decoded::resources`, set when its `ResourceSpans` ends.
    resource: u32,
    scope_name: &'a str,
    scope_version: &'a str,
}

struct OutEvent<'a> {
    time: u64,
    name: &'a str,
    attrs: Span32,
}

struct OutLink {
    trace_id: TraceId,
    span_id: SpanId,
    attrs: Span32,
}

struct OutResource<'a> {
    attrs: Span32,
    service: Text<'a>,
}

/// A decoded body: its spans, borrowing their strings from it. [`Decoded::with_spans`] lends
/// them to the store as [`SpanRef`]s (no `String` per attribute, which was a third of the
/// collector's CPU per span with allocating and freeing); [`Decoded::into_records`] makes
/// owned records.
pub struct Decoded<'a> {
    spans: Vec<OutSpan<'a>>,
    /// The attributes of every span, event, link and resource, each list contiguous. A JSON
    /// value (array, map, bytes) is an empty `Json` here, its text in `json`.
    attrs: Vec<KeyValueRef<'a>>,
    /// (index in `attrs`, owned-text index) of each JSON value.
    json: Vec<(u32, u32)>,
    events: Vec<OutEvent<'a>>,
    links: Vec<OutLink>,
    resources: Vec<OutResource<'a>>,
    /// Text made while decoding: JSON renderings, service names that were not strings.
    owned: Vec<String>,
}

impl<'a> Decoded<'a> {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    fn text(&self, t: Text<'a>) -> &str {
        match t {
            Text::Body(s) => s,
            Text::Owned(i) => &self.owned[i as usize],
        }
    }

    /// Calls `f` with the spans (in body order), as the store's `write_refs` takes them.
    pub fn with_spans<T>(&self, f: impl FnOnce(&[SpanRef<'_>]) -> T) -> T {
        let patched: Vec<KeyValueRef<'_>>;
        let attrs: &[KeyValueRef<'_>] = if self.json.is_empty() {
            &self.attrs
        } else {
            let mut a = self.attrs.clone();
            for &(at, text) in &self.json {
                a[at as usize].value = AttrValueRef::Json(&self.owned[text as usize]);
            }
            patched = a;
            &patched
        };
        let events: Vec<SpanEventRef<'_>> = self
            .events
            .iter()
            .map(|e| SpanEventRef {
                time_unix_nano: e.time,
                name: e.name,
                attributes: &attrs[e.attrs.range()],
            })
            .collect();
        let links: Vec<SpanLinkRef<'_>> = self
            .links
            .iter()
            .map(|l| SpanLinkRef {
                trace_id: l.trace_id,
                span_id: l.span_id,
                attributes: &attrs[l.attrs.range()],
            })
            .collect();
        let spans: Vec<SpanRef<'_>> = self
            .spans
            .iter()
            .map(|s| {
                let res = &self.resources[s.resource as usize];
                SpanRef {
                    trace_id: s.trace_id,
                    span_id: s.span_id,
                    parent_span_id: s.parent_span_id,
                    service: self.text(res.service),
                    operation: s.name,
                    kind: s.kind,
                    start_unix_nano: s.start,
                    duration_nano: s.duration,
                    status_code: s.status_code,
                    status_message: s.status_message,
                    attributes: &attrs[s.attrs.range()],
                    resource: &attrs[res.attrs.range()],
                    events: &events[s.events.range()],
                    links: &links[s.links.range()],
                    scope_name: s.scope_name,
                    scope_version: s.scope_version,
                }
            })
            .collect();
        f(&spans)
    }

    /// Owned records, one `Arc` resource per `ResourceSpans`.
    pub fn into_records(self) -> Vec<SpanRecord> {
        self.with_spans(|refs| {
            // Each made from the first span that uses it (every resource has one or more).
            let mut resources: Vec<Option<Arc<Vec<KeyValue>>>> = vec![None; self.resources.len()];
            for (s, r) in self.spans.iter().zip(refs) {
                resources[s.resource as usize].get_or_insert_with(|| {
                    Arc::new(r.resource.iter().map(|kv| kv.into_owned()).collect())
                });
            }
            self.spans
                .iter()
                .zip(refs)
                .map(|(s, r)| {
                    r.to_record(resources[s.resource as usize].clone().unwrap_or_default())
                })
                .collect()
        })
    }
}

struct Decoder<'a> {
    out: Decoded<'a>,
    /// Spans read so far (the `#n` in messages).
    n: usize,
    /// The first span that failed the checks.
    invalid: Option<String>,
    /// When the request arrived (Unix ns), for the spans' checks.
    now: u64,
    /// Attributes of the span being read (its events' and links' go straight to `out.attrs`
    /// while these wait), and the JSON values among them (index in this list, text).
    span_attrs: Vec<KeyValueRef<'a>>,
    span_json: Vec<(u32, u32)>,
}

/// Decodes an OTLP `ExportTraceServiceRequest` in protobuf into store records; all or nothing.
pub fn spans_from_protobuf(body: &[u8]) -> Result<Vec<SpanRecord>, Error> {
    decode(body).map(Decoded::into_records)
}

/// Decodes an OTLP `ExportTraceServiceRequest` in protobuf; all or nothing.
pub fn decode(body: &[u8]) -> Result<Decoded<'_>, Error> {
    let mut r = Reader {
        buf: body,
        pos: 0,
        end: body.len(),
        what: "ExportTraceServiceRequest",
    };
    // Sized from the body, so the lists are not grown (and copied) a few times per request:
    // spans take ~600 bytes on the wire, an attribute ~35.
    let mut d = Decoder {
        out: Decoded {
            spans: Vec::with_capacity(body.len() / 512),
            attrs: Vec::with_capacity(body.len() / 32),
            json: Vec::new(),
            events: Vec::new(),
            links: Vec::new(),
            resources: Vec::new(),
            owned: Vec::new(),
        },
        n: 0,
        invalid: None,
        now: convert::unix_now_nanos(),
        span_attrs: Vec::new(),
        span_json: Vec::new(),
    };
    d.request(&mut r)
        .map_err(|f| Error::Malformed(f.to_string()))?;
    match d.invalid {
        Some(e) => Err(Error::Invalid(e)),
        None => Ok(d.out),
    }
}

/// Appends `list` (with its JSON values, indexed in `list`) to `out.attrs`; returns its range.
fn append_attrs<'a>(
    out: &mut Decoded<'a>,
    list: &mut Vec<KeyValueRef<'a>>,
    json: &mut Vec<(u32, u32)>,
) -> Span32 {
    let start = out.attrs.len() as u32;
    out.json
        .extend(json.drain(..).map(|(at, text)| (start + at, text)));
    out.attrs.append(list);
    Span32 {
        start,
        end: out.attrs.len() as u32,
    }
}

impl<'a> Decoder<'a> {
    fn request(&mut self, r: &mut Reader<'a>) -> R<()> {
        while r.more() {
            match r.key()? {
                (1, wt) => {
                    r.expect(1, "resource_spans", wt, LEN)?;
                    r.message("ResourceSpans", |r| self.resource_spans(r))?;
                }
                (f, wt) => r.skip(f, wt)?,
            }
        }
        Ok(())
    }

    fn resource_spans(&mut self, r: &mut Reader<'a>) -> R<()> {
        let first = self.out.spans.len();
        let mut attrs = Vec::new();
        let mut json = Vec::new();
        while r.more() {
            match r.key()? {
                (1, wt) => {
                    r.expect(1, "resource", wt, LEN)?;
                    r.message("Resource", |r| {
                        resource(r, &mut attrs, &mut json, &mut self.out.owned)
                    })?;
                }
                (2, wt) => {
                    r.expect(2, "scope_spans", wt, LEN)?;
                    r.message("ScopeSpans", |r| self.scope_spans(r))?;
                }
                (3, wt) => {
                    r.expect(3, "schema_url", wt, LEN)?;
                    r.str()?;
                }
                (f, wt) => r.skip(f, wt)?,
            }
        }
        if self.out.spans.len() > first {
            let service = self.service_name(&attrs, &json);
            let attrs = append_attrs(&mut self.out, &mut attrs, &mut json);
            let index = self.out.resources.len() as u32;
            self.out.resources.push(OutResource { attrs, service });
            for s in &mut self.out.spans[first..] {
                s.resource = index;
            }
        }
        Ok(())
    }

    /// `service.name` of a resource, as `convert::service_name` finds it.
    fn service_name(&mut self, attrs: &[KeyValueRef<'a>], json: &[(u32, u32)]) -> Text<'a> {
        let Some((at, kv)) = attrs
            .iter()
            .enumerate()
            .find(|(_, kv)| kv.key == "service.name")
        else {
            return Text::Body(UNKNOWN_SERVICE);
        };
        let text = match kv.value {
            AttrValueRef::Str(s) => Text::Body(s),
            AttrValueRef::Json(_) => json
                .iter()
                .find(|(a, _)| *a as usize == at)
                .map_or(Text::Body(UNKNOWN_SERVICE), |&(_, i)| Text::Owned(i)),
            other => {
                self.out.owned.push(other.as_text().into_owned());
                Text::Owned(self.out.owned.len() as u32 - 1)
            }
        };
        let empty = match text {
            Text::Body(s) => s.is_empty(),
            Text::Owned(i) => self.out.owned[i as usize].is_empty(),
        };
        if empty {
            Text::Body(UNKNOWN_SERVICE)
        } else {
            text
        }
    }

    fn scope_spans(&mut self, r: &mut Reader<'a>) -> R<()> {
        let first = self.out.spans.len();
        let (mut name, mut version) = ("", "");
        while r.more() {
            match r.key()? {
                (1, wt) => {
                    r.expect(1, "scope", wt, LEN)?;
                    let owned = &mut self.out.owned;
                    r.message("InstrumentationScope", |r| {
                        while r.more() {
                            match r.key()? {
                                (1, wt) => {
                                    r.expect(1, "name", wt, LEN)?;
                                    name = r.str()?;
                                }
                                (2, wt) => {
                                    r.expect(2, "version", wt, LEN)?;
                                    version = r.str()?;
                                }
                                (3, wt) => {
                                    // Scope attributes are not stored; read them for the checks.
                                    r.expect(3, "attributes", wt, LEN)?;
                                    let mark = owned.len();
                                    r.message("KeyValue", |r| key_value(r, owned))?;
                                    owned.truncate(mark);
                                }
                                (4, wt) => r.ignore(4, "dropped_attributes_count", wt, VARINT)?,
                                (f, wt) => r.skip(f, wt)?,
                            }
                        }
                        Ok(())
                    })?;
                }
                (2, wt) => {
                    r.expect(2, "spans", wt, LEN)?;
                    r.message("Span", |r| self.span(r))?;
                }
                (3, wt) => {
                    r.expect(3, "schema_url", wt, LEN)?;
                    r.str()?;
                }
                (f, wt) => r.skip(f, wt)?,
            }
        }
        if !name.is_empty() || !version.is_empty() {
            for s in &mut self.out.spans[first..] {
                s.scope_name = name;
                s.scope_version = version;
            }
        }
        Ok(())
    }

    fn span(&mut self, r: &mut Reader<'a>) -> R<()> {
        let mut s = RawSpan::default();
        let events_start = self.out.events.len() as u32;
        let links_start = self.out.links.len() as u32;
        self.span_attrs.clear();
        self.span_json.clear();
        let mut attrs_cut = false;
        while r.more() {
            match r.key()? {
                (1, wt) => {
                    r.expect(1, "trace_id", wt, LEN)?;
                    s.trace_id = r.bytes()?;
                }
                (2, wt) => {
                    r.expect(2, "span_id", wt, LEN)?;
                    s.span_id = r.bytes()?;
                }
                (3, wt) => {
                    r.expect(3, "trace_state", wt, LEN)?;
                    r.str()?;
                }
                (4, wt) => {
                    r.expect(4, "parent_span_id", wt, LEN)?;
                    s.parent_span_id = r.bytes()?;
                }
                (5, wt) => {
                    r.expect(5, "name", wt, LEN)?;
                    s.name = r.str()?;
                }
                (6, wt) => {
                    r.expect(6, "kind", wt, VARINT)?;
                    s.kind = r.varint()? as i32;
                }
                (7, wt) => {
                    r.expect(7, "start_time_unix_nano", wt, I64)?;
                    s.start = r.fixed64()?;
                }
                (8, wt) => {
                    r.expect(8, "end_time_unix_nano", wt, I64)?;
                    s.end = r.fixed64()?;
                }
                (9, wt) => {
                    r.expect(9, "attributes", wt, LEN)?;
                    let owned = &mut self.out.owned;
                    let (kv, json, value_cut) = r.message("KeyValue", |r| key_value(r, owned))?;
                    attrs_cut |= value_cut;
                    // Past the cap the attribute is still read (the wire format is checked
                    // whole) but not kept.
                    if self.span_attrs.len() >= convert::MAX_SPAN_ATTRIBUTES {
                        attrs_cut = true;
                        continue;
                    }
                    if let Some(text) = json {
                        self.span_json.push((self.span_attrs.len() as u32, text));
                    }
                    self.span_attrs.push(kv);
                }
                (10, wt) => r.ignore(10, "dropped_attributes_count", wt, VARINT)?,
                (11, wt) => {
                    r.expect(11, "events", wt, LEN)?;
                    r.message("Span.Event", |r| self.event(r))?;
                }
                (12, wt) => r.ignore(12, "dropped_events_count", wt, VARINT)?,
                (13, wt) => {
                    r.expect(13, "links", wt, LEN)?;
                    r.message("Span.Link", |r| self.link(r))?;
                }
                (14, wt) => r.ignore(14, "dropped_links_count", wt, VARINT)?,
                (15, wt) => {
                    r.expect(15, "status", wt, LEN)?;
                    r.message("Status", |r| {
                        while r.more() {
                            match r.key()? {
                                (2, wt) => {
                                    r.expect(2, "message", wt, LEN)?;
                                    s.status_message = r.str()?;
                                }
                                (3, wt) => {
                                    r.expect(3, "code", wt, VARINT)?;
                                    s.status_code = r.varint()? as i32;
                                }
                                (f, wt) => r.skip(f, wt)?,
                            }
                        }
                        Ok(())
                    })?;
                }
                (16, wt) => r.ignore(16, "flags", wt, I32)?,
                (f, wt) => r.skip(f, wt)?,
            }
        }
        self.n += 1;
        if self.invalid.is_some() {
            return Ok(()); // the batch is refused anyway; only the wire format still matters
        }
        let ids = check_span(
            self.n,
            s.trace_id,
            s.span_id,
            s.parent_span_id,
            (s.start, s.end),
            self.now,
            s.name,
        );
        let (trace_id, span_id, parent_span_id) = match ids {
            Ok(ids) => ids,
            Err(e) => {
                self.invalid = Some(e);
                return Ok(());
            }
        };
        let (name, name_cut) = convert::capped_name(s.name);
        s.name = name;
        if attrs_cut || name_cut {
            self.span_attrs.push(KeyValueRef {
                key: convert::TRUNCATED_KEY,
                value: AttrValueRef::Bool(true),
            });
        }
        let attrs = append_attrs(&mut self.out, &mut self.span_attrs, &mut self.span_json);
        self.out.spans.push(OutSpan {
            trace_id,
            span_id,
            parent_span_id,
            name: s.name,
            kind: s.kind,
            start: s.start,
            duration: s.end - s.start,
            status_code: s.status_code,
            status_message: s.status_message,
            attrs,
            events: Span32 {
                start: events_start,
                end: self.out.events.len() as u32,
            },
            links: Span32 {
                start: links_start,
                end: self.out.links.len() as u32,
            },
            // Filled in when the ScopeSpans and ResourceSpans end.
            resource: 0,
            scope_name: "",
            scope_version: "",
        });
        Ok(())
    }

    /// Reads one attribute into `out.attrs` (events' and links' lists are contiguous there:
    /// nothing else is read while they are).
    fn inner_attr(&mut self, r: &mut Reader<'a>) -> R<()> {
        let owned = &mut self.out.owned;
        let (kv, json, _) = r.message("KeyValue", |r| key_value(r, owned))?;
        if let Some(text) = json {
            self.out.json.push((self.out.attrs.len() as u32, text));
        }
        self.out.attrs.push(kv);
        Ok(())
    }

    fn event(&mut self, r: &mut Reader<'a>) -> R<()> {
        let (mut time, mut name) = (0, "");
        let start = self.out.attrs.len() as u32;
        while r.more() {
            match r.key()? {
                (1, wt) => {
                    r.expect(1, "time_unix_nano", wt, I64)?;
                    time = r.fixed64()?;
                }
                (2, wt) => {
                    r.expect(2, "name", wt, LEN)?;
                    name = r.str()?;
                }
                (3, wt) => {
                    r.expect(3, "attributes", wt, LEN)?;
                    self.inner_attr(r)?;
                }
                (4, wt) => r.ignore(4, "dropped_attributes_count", wt, VARINT)?,
                (f, wt) => r.skip(f, wt)?,
            }
        }
        self.out.events.push(OutEvent {
            time,
            name,
            attrs: Span32 {
                start,
                end: self.out.attrs.len() as u32,
            },
        });
        Ok(())
    }

    /// A link; dropped if its ids are not 16 and 8 bytes, as `convert` does.
    fn link(&mut self, r: &mut Reader<'a>) -> R<()> {
        let (mut trace_id, mut span_id): (&[u8], &[u8]) = (&[], &[]);
        let start = self.out.attrs.len() as u32;
        while r.more() {
            match r.key()? {
                (1, wt) => {
                    r.expect(1, "trace_id", wt, LEN)?;
                    trace_id = r.bytes()?;
                }
                (2, wt) => {
                    r.expect(2, "span_id", wt, LEN)?;
                    span_id = r.bytes()?;
                }
                (3, wt) => {
                    r.expect(3, "trace_state", wt, LEN)?;
                    r.str()?;
                }
                (4, wt) => {
                    r.expect(4, "attributes", wt, LEN)?;
                    self.inner_attr(r)?;
                }
                (5, wt) => r.ignore(5, "dropped_attributes_count", wt, VARINT)?,
                (6, wt) => r.ignore(6, "flags", wt, I32)?,
                (f, wt) => r.skip(f, wt)?,
            }
        }
        let end = self.out.attrs.len() as u32;
        if let (Ok(trace_id), Ok(span_id)) = (trace_id.try_into(), span_id.try_into()) {
            self.out.links.push(OutLink {
                trace_id,
                span_id,
                attrs: Span32 { start, end },
            });
        }
        // A dropped link's attributes stay in `attrs`, referenced by nothing.
        Ok(())
    }
}

fn resource<'a>(
    r: &mut Reader<'a>,
    attrs: &mut Vec<KeyValueRef<'a>>,
    json: &mut Vec<(u32, u32)>,
    owned: &mut Vec<String>,
) -> R<()> {
    while r.more() {
        match r.key()? {
            (1, wt) => {
                r.expect(1, "attributes", wt, LEN)?;
                let (kv, text, _) = r.message("KeyValue", |r| key_value(r, owned))?;
                if let Some(text) = text {
                    json.push((attrs.len() as u32, text));
                }
                attrs.push(kv);
            }
            (2, wt) => r.ignore(2, "dropped_attributes_count", wt, VARINT)?,
            (3, wt) => {
                r.expect(3, "entity_refs", wt, LEN)?;
                r.message("EntityRef", entity_ref)?;
            }
            (f, wt) => r.skip(f, wt)?,
        }
    }
    Ok(())
}

/// `EntityRef` is not stored; its fields (all strings) are checked as `prost` would.
fn entity_ref(r: &mut Reader<'_>) -> R<()> {
    while r.more() {
        match r.key()? {
            (f @ 1..=4, wt) => {
                r.expect(f, "EntityRef string", wt, LEN)?;
                r.str()?;
            }
            (f, wt) => r.skip(f, wt)?,
        }
    }
    Ok(())
}

/// One attribute. A JSON value is rendered into `owned`: the attribute then holds an empty
/// `Json` and the index of its text is returned beside it.
/// One attribute, its value capped (`convert::MAX_VALUE_BYTES`): the attribute, where its
/// JSON text is in `owned` (arrays, maps, bytes), and whether its value was cut.
fn key_value<'a>(
    r: &mut Reader<'a>,
    owned: &mut Vec<String>,
) -> R<(KeyValueRef<'a>, Option<u32>, bool)> {
    let mut key = "";
    let mut value = AnyVal::None;
    while r.more() {
        match r.key()? {
            (1, wt) => {
                r.expect(1, "key", wt, LEN)?;
                key = r.str()?;
            }
            (2, wt) => {
                r.expect(2, "value", wt, LEN)?;
                r.message("AnyValue", |r| any_value(r, &mut value))?;
            }
            (3, wt) => r.ignore(3, "key_strindex", wt, VARINT)?,
            (f, wt) => r.skip(f, wt)?,
        }
    }
    let mut cut = false;
    let (value, json) = match value {
        AnyVal::None => (AttrValueRef::Str(""), None),
        AnyVal::Str(s) => {
            let (s, was_cut) = convert::capped_value(s);
            cut = was_cut;
            (AttrValueRef::Str(s), None)
        }
        AnyVal::Bool(b) => (AttrValueRef::Bool(b), None),
        AnyVal::Int(i) => (AttrValueRef::Int(i), None),
        AnyVal::Double(d) => (AttrValueRef::Float(d), None),
        AnyVal::Other(v) => {
            let mut text = AttrValue::Json(json_value(&v).to_string());
            cut = convert::cap_value(&mut text);
            let AttrValue::Json(text) = text else {
                unreachable!("a JSON value stays one")
            };
            owned.push(text);
            (AttrValueRef::Json(""), Some(owned.len() as u32 - 1))
        }
    };
    Ok((KeyValueRef { key, value }, json, cut))
}

/// An `AnyValue` as read: scalars borrowed from the body, the rare rest as `prost` values
/// (rendered as JSON the way `convert` renders them).
enum AnyVal<'a> {
    None,
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Other(Value),
}

/// Reads an `AnyValue` into `v`, merging as protobuf does: a scalar replaces what was there,
/// an array or key-value list merges into one of the same kind.
fn any_value<'a>(r: &mut Reader<'a>, v: &mut AnyVal<'a>) -> R<()> {
    while r.more() {
        match r.key()? {
            (1, wt) => {
                r.expect(1, "string_value", wt, LEN)?;
                *v = AnyVal::Str(r.str()?);
            }
            (2, wt) => {
                r.expect(2, "bool_value", wt, VARINT)?;
                *v = AnyVal::Bool(r.varint()? != 0);
            }
            (3, wt) => {
                r.expect(3, "int_value", wt, VARINT)?;
                *v = AnyVal::Int(r.varint()? as i64);
            }
            (4, wt) => {
                r.expect(4, "double_value", wt, I64)?;
                *v = AnyVal::Double(f64::from_bits(r.fixed64()?));
            }
            (5, wt) => {
                r.expect(5, "array_value", wt, LEN)?;
                let at = r.pos;
                let b = r.bytes()?;
                let merged = match v {
                    AnyVal::Other(Value::ArrayValue(a)) => a.merge(b),
                    _ => ArrayValue::decode(b).map(|a| *v = AnyVal::Other(Value::ArrayValue(a))),
                };
                if let Err(e) = merged {
                    return r.fail(at, format!("array value: {e}"));
                }
            }
            (6, wt) => {
                r.expect(6, "kvlist_value", wt, LEN)?;
                let at = r.pos;
                let b = r.bytes()?;
                let merged = match v {
                    AnyVal::Other(Value::KvlistValue(l)) => l.merge(b),
                    _ => KeyValueList::decode(b).map(|l| *v = AnyVal::Other(Value::KvlistValue(l))),
                };
                if let Err(e) = merged {
                    return r.fail(at, format!("key-value list value: {e}"));
                }
            }
            (7, wt) => {
                r.expect(7, "bytes_value", wt, LEN)?;
                *v = AnyVal::Other(Value::BytesValue(r.bytes()?.to_vec()));
            }
            (8, wt) => {
                r.expect(8, "string_value_strindex", wt, VARINT)?;
                *v = AnyVal::Other(Value::StringValueStrindex(r.varint()? as i32));
            }
            (f, wt) => r.skip(f, wt)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::spans_from_request;
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, InstrumentationScope, KeyValue as Kv},
        resource::v1::Resource,
        trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status},
    };

    /// The old path: `prost` structs, then `convert`.
    fn via_prost(body: &[u8]) -> Result<Vec<SpanRecord>, Error> {
        let req =
            ExportTraceServiceRequest::decode(body).map_err(|e| Error::Malformed(e.to_string()))?;
        spans_from_request(req).map_err(Error::Invalid)
    }

    /// Both paths agree: the same spans (resources shared the same way), or both malformed, or
    /// the same invalid-span message.
    fn agree(body: &[u8]) -> Result<Vec<SpanRecord>, Error> {
        let direct = spans_from_protobuf(body);
        let old = via_prost(body);
        match (&direct, &old) {
            (Ok(a), Ok(b)) => {
                // Debug text when `==` fails: a NaN (mutations make some) is not equal to itself.
                if a != b {
                    assert_eq!(
                        format!("{a:?}"),
                        format!("{b:?}"),
                        "body {}",
                        hex::encode(body)
                    );
                }
                for i in 1..a.len() {
                    assert_eq!(
                        Arc::ptr_eq(&a[i - 1].resource, &a[i].resource),
                        Arc::ptr_eq(&b[i - 1].resource, &b[i].resource),
                        "resource sharing differs at span {i}"
                    );
                }
            }
            (Err(Error::Malformed(_)), Err(Error::Malformed(_))) => {}
            (Err(Error::Invalid(a)), Err(Error::Invalid(b))) => assert_eq!(a, b),
            _ => panic!(
                "the paths disagree on {}:\n direct: {direct:?}\n prost: {old:?}",
                hex::encode(body)
            ),
        }
        direct
    }

    fn kv(key: &str, v: Option<Value>) -> Kv {
        Kv {
            key: key.into(),
            value: v.map(|value| AnyValue { value: Some(value) }),
            key_strindex: 0,
        }
    }

    fn sv(s: &str) -> Option<Value> {
        Some(Value::StringValue(s.into()))
    }

    fn full_span(seed: u8) -> Span {
        Span {
            trace_id: vec![seed; 16],
            span_id: vec![seed.wrapping_add(1); 8],
            trace_state: "k=v".into(),
            parent_span_id: vec![9; 8],
            flags: 0x301,
            name: format!("GET /items/{seed}"),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_250_000,
            attributes: vec![
                kv("http.request.method", sv("GET")),
                kv("url.path", sv("/items/42 ünïcode")),
                kv("http.response.status_code", Some(Value::IntValue(503))),
                kv("negative", Some(Value::IntValue(-7))),
                kv("ratio", Some(Value::DoubleValue(0.25))),
                kv("inf", Some(Value::DoubleValue(f64::INFINITY))),
                kv("ok", Some(Value::BoolValue(true))),
                kv("no", Some(Value::BoolValue(false))),
                kv("bytes", Some(Value::BytesValue(vec![0, 1, 0xfe]))),
                kv("strindex", Some(Value::StringValueStrindex(3))),
                kv("missing", None),
                Kv {
                    key: "empty".into(),
                    value: Some(AnyValue { value: None }),
                    key_strindex: 0,
                },
                kv(
                    "array",
                    Some(Value::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue { value: sv("a") },
                            AnyValue { value: None },
                            AnyValue {
                                value: Some(Value::IntValue(2)),
                            },
                            AnyValue {
                                value: Some(Value::ArrayValue(ArrayValue {
                                    values: vec![AnyValue {
                                        value: Some(Value::DoubleValue(1.5)),
                                    }],
                                })),
                            },
                        ],
                    })),
                ),
                kv(
                    "map",
                    Some(Value::KvlistValue(KeyValueList {
                        values: vec![
                            kv("z", sv("last")),
                            kv("a", Some(Value::BoolValue(true))),
                            kv("gone", None),
                            kv("bin", Some(Value::BytesValue(vec![0xab]))),
                        ],
                    })),
                ),
                kv("", sv("empty key")),
            ],
            dropped_attributes_count: 2,
            events: vec![
                span::Event {
                    time_unix_nano: 1_700_000_000_000_100_000,
                    name: "exception".into(),
                    attributes: vec![
                        kv("exception.type", sv("IOError")),
                        kv("exception.count", Some(Value::IntValue(1))),
                    ],
                    dropped_attributes_count: 1,
                },
                span::Event::default(),
            ],
            dropped_events_count: 3,
            links: vec![
                span::Link {
                    trace_id: vec![5; 16],
                    span_id: vec![6; 8],
                    trace_state: "x=y".into(),
                    attributes: vec![kv("link.kind", sv("follows"))],
                    dropped_attributes_count: 0,
                    flags: 1,
                },
                // Dropped by both paths: wrong id lengths.
                span::Link {
                    trace_id: vec![5; 3],
                    span_id: vec![6; 8],
                    ..Default::default()
                },
            ],
            dropped_links_count: 4,
            status: Some(Status {
                message: "upstream timed out".into(),
                code: 2,
            }),
        }
    }

    fn plain_span(seed: u8) -> Span {
        Span {
            trace_id: vec![seed; 16],
            span_id: vec![seed; 8],
            name: "plain".into(),
            start_time_unix_nano: 10,
            end_time_unix_nano: 10,
            ..Default::default()
        }
    }

    fn rich_request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![
                            kv("service.name", sv("shop")),
                            kv("host.ip", Some(Value::ArrayValue(ArrayValue::default()))),
                        ],
                        dropped_attributes_count: 1,
                        entity_refs: vec![Default::default()],
                    }),
                    scope_spans: vec![
                        ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "tracer".into(),
                                version: "0.1.0".into(),
                                attributes: vec![kv("scope.attr", sv("x"))],
                                dropped_attributes_count: 0,
                            }),
                            spans: vec![full_span(1), plain_span(2)],
                            schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
                        },
                        ScopeSpans {
                            scope: None,
                            spans: vec![plain_span(3)],
                            schema_url: String::new(),
                        },
                    ],
                    schema_url: "s".into(),
                },
                // No resource at all: unknown_service.
                ResourceSpans {
                    resource: None,
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "only-name".into(),
                            ..Default::default()
                        }),
                        spans: vec![full_span(4)],
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                },
                // service.name that is not a string, and an empty one.
                ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![kv("service.name", Some(Value::IntValue(7)))],
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![plain_span(5)],
                        ..Default::default()
                    }],
                    schema_url: String::new(),
                },
                ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![kv("service.name", sv(""))],
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![plain_span(6)],
                        ..Default::default()
                    }],
                    schema_url: String::new(),
                },
                // Nothing in it.
                ResourceSpans::default(),
            ],
        }
    }

    #[test]
    fn same_records_as_the_prost_path() {
        let out = agree(&rich_request().encode_to_vec()).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(out[0].service, "shop");
        assert_eq!(out[0].scope_name, "tracer");
        assert_eq!(out[2].scope_name, "");
        assert_eq!(out[3].service, crate::convert::UNKNOWN_SERVICE);
        assert_eq!(out[4].service, "7");
        assert_eq!(out[5].service, crate::convert::UNKNOWN_SERVICE);
        assert_eq!(out[0].events.len(), 2);
        assert_eq!(out[0].links.len(), 1);
        assert!(Arc::ptr_eq(&out[0].resource, &out[2].resource));
        assert!(matches!(
            out[0]
                .attributes
                .iter()
                .find(|kv| kv.key == "map")
                .unwrap()
                .value,
            tracer_store::AttrValue::Json(_)
        ));
        assert_eq!(agree(&[]).unwrap(), vec![]);
    }

    #[test]
    fn invalid_spans_give_the_same_message() {
        let cases: [fn(&mut Span); 8] = [
            |s| s.trace_id.truncate(15),
            |s| s.trace_id = vec![0; 16],
            |s| s.span_id = vec![1; 9],
            |s| s.span_id = vec![0; 8],
            |s| s.parent_span_id = vec![1; 4],
            |s| s.parent_span_id = vec![0; 8],
            |s| s.end_time_unix_nano = s.start_time_unix_nano - 1,
            |s| s.trace_id.clear(),
        ];
        for (i, spoil) in cases.iter().enumerate() {
            let mut req = rich_request();
            // The third span of the request, after two good ones.
            spoil(&mut req.resource_spans[0].scope_spans[1].spans[0]);
            let err = agree(&req.encode_to_vec()).unwrap_err();
            let Error::Invalid(msg) = err else {
                panic!("case {i}: {err:?}")
            };
            assert!(msg.starts_with("span #3"), "case {i}: {msg}");
            // A malformed tail wins over the invalid span, as when the body is decoded first.
            let mut body = req.encode_to_vec();
            body.extend_from_slice(&[0x0a, 0x05, 0x01]);
            assert!(matches!(agree(&body), Err(Error::Malformed(_))), "case {i}");
        }
    }

    /// A minimal protobuf writer for hand-made bodies.
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn key(out: &mut Vec<u8>, field: u32, wt: u8) {
        varint(out, u64::from(field) << 3 | u64::from(wt));
    }
    fn ld(field: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        key(&mut out, field, LEN);
        varint(&mut out, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }
    fn vi(field: u32, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        key(&mut out, field, VARINT);
        varint(&mut out, v);
        out
    }
    fn fx64(field: u32, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        key(&mut out, field, I64);
        out.extend_from_slice(&v.to_le_bytes());
        out
    }
    /// Unknown fields of every wire type, a nested group included.
    fn unknowns() -> Vec<u8> {
        let mut out = vi(900, 1 << 40);
        out.extend(fx64(901, 7));
        key(&mut out, 902, I32);
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend(ld(903, b"\xff\xfe not utf-8, but unknown"));
        key(&mut out, 904, START_GROUP);
        out.extend(vi(1, 5));
        key(&mut out, 905, START_GROUP);
        out.extend(ld(2, b"x"));
        key(&mut out, 905, END_GROUP);
        key(&mut out, 904, END_GROUP);
        out
    }
    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// A body with unknown fields everywhere, fields out of the usual order, and singular
    /// fields repeated (which protobuf merges).
    fn odd_body() -> Vec<u8> {
        let u = unknowns();
        let any_str = |s: &str| cat(&[&u, &ld(1, s.as_bytes())]);
        let kv = |k: &str, any: &[u8]| cat(&[&ld(2, any), &u, &ld(1, k.as_bytes()), &vi(3, 0)]);
        let array = |items: &[&[u8]]| {
            let mut a = Vec::new();
            for i in items {
                a.extend(ld(1, i));
            }
            ld(5, &a)
        };
        // AnyValues that merge: two arrays concatenate; a string replaced by an int; an int
        // replaced by an array.
        let merged_array = cat(&[&array(&[&any_str("a")]), &array(&[&vi(3, 1)])]);
        let replaced = cat(&[&ld(1, b"s"), &vi(3, 9)]);
        let int_then_array = cat(&[&vi(3, 9), &array(&[&vi(2, 1)])]);
        let span = cat(&[
            &u,
            &ld(5, b"first name"),
            &ld(9, &kv("merged", &merged_array)),
            &fx64(8, 20),
            &ld(1, &[3; 16]),
            &ld(9, &kv("replaced", &replaced)),
            &ld(2, &[4; 8]),
            &fx64(7, 10),
            &ld(15, &cat(&[&vi(3, 2), &u])),
            &ld(15, &ld(2, b"merged status")),
            &vi(6, 3),
            &ld(9, &kv("int_then_array", &int_then_array)),
            &ld(5, b"last name wins"),
            &ld(
                11,
                &cat(&[
                    &u,
                    &ld(2, b"ev"),
                    &fx64(1, 15),
                    &ld(3, &kv("e", &any_str("v"))),
                ]),
            ),
            &ld(
                13,
                &cat(&[
                    &ld(4, &kv("l", &vi(2, 1))),
                    &ld(2, &[1; 8]),
                    &ld(1, &[2; 16]),
                ]),
            ),
            &vi(6, u64::MAX), // kind: wraps to -1 like prost's `as i32`
            &u,
        ]);
        let scope = cat(&[
            &u,
            &ld(2, b"v1"),
            &ld(1, b"scope"),
            &ld(3, &kv("sa", &any_str("x"))),
        ]);
        let scope_spans = cat(&[
            &ld(2, &span),
            &u,
            &ld(1, &scope),
            &ld(1, &ld(2, b"v2")), // merges: the name stays, the version is replaced
            &ld(2, &span),
        ]);
        let resource_a = cat(&[&ld(1, &kv("service.name", &any_str("odd"))), &u, &vi(2, 1)]);
        let resource_b = cat(&[&ld(1, &kv("extra", &vi(2, 1))), &ld(3, &ld(2, b"entity"))]);
        let rs = cat(&[
            &ld(2, &scope_spans),
            &u,
            &ld(1, &resource_a),
            &ld(3, b"schema"),
            &ld(1, &resource_b), // merges: the attributes add up
            &ld(1000, b"deprecated instrumentation_library_spans"),
        ]);
        cat(&[&u, &ld(1, &rs), &u, &ld(1, &rs)])
    }

    #[test]
    fn unknown_fields_order_and_merging_as_protobuf_says() {
        let out = agree(&odd_body()).unwrap();
        assert_eq!(out.len(), 4);
        let s = &out[0];
        assert_eq!(s.operation, "last name wins");
        assert_eq!(s.service, "odd");
        assert_eq!(
            (s.scope_name.as_str(), s.scope_version.as_str()),
            ("scope", "v2")
        );
        assert_eq!(s.resource.len(), 2);
        assert_eq!(s.kind, -1);
        assert_eq!(
            (s.status_code, s.status_message.as_str()),
            (2, "merged status")
        );
        assert_eq!(s.attributes.len(), 3);
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.links.len(), 1);
        assert!(!Arc::ptr_eq(&out[1].resource, &out[2].resource));
    }

    fn assert_malformed(body: &[u8], says: &str) {
        match agree(body) {
            Err(Error::Malformed(m)) => assert!(m.contains(says), "{m:?} lacks {says:?}"),
            other => panic!("{} gave {other:?}", hex::encode(body)),
        }
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        assert_malformed(b"\xff\xff\xff\xff garbage", "");
        // Over-long and overflowing varints.
        // (Field 2 is unknown at the top: skipped, so only its varint is read.)
        let long = [&[0x10][..], &[0xff; 9], &[0x80, 0x01]].concat();
        assert_malformed(&long, "varint longer than 10 bytes");
        let over = [&[0x10][..], &[0xff; 9], &[0x02]].concat();
        assert_malformed(&over, "over 64 bits");
        assert_malformed(&[0x10, 0x80], "truncated varint");
        let max = [&[0x10][..], &[0xff; 9], &[0x01]].concat();
        assert_eq!(agree(&max), Ok(vec![]));
        // A length past the end, at the top and nested.
        assert_malformed(&[0x0a, 0x05, 0x12, 0x00], "5 bytes announced, 2 left");
        assert_malformed(&ld(1, &[0x12, 0x09, 0x00]), "in ResourceSpans");
        assert_malformed(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], "bytes announced");
        // Wrong wire types for known fields.
        assert_malformed(&vi(1, 3), "field 1 (resource_spans) has wire type 0");
        let span_with = |f: &[u8]| ld(1, &ld(2, &ld(2, f)));
        assert_malformed(&span_with(&vi(1, 1)), "(trace_id) has wire type 0");
        assert_malformed(
            &span_with(&ld(7, &[0; 8])),
            "(start_time_unix_nano) has wire type 2",
        );
        assert_malformed(&span_with(&vi(16, 1)), "(flags)");
        assert_malformed(&span_with(&ld(10, b"")), "dropped_attributes_count");
        assert_malformed(&span_with(&ld(9, &ld(2, &ld(4, b"")))), "double_value");
        // Invalid wire types, field 0, unbalanced groups.
        assert_malformed(&[0x0f], "invalid wire type 7");
        assert_malformed(&[0x02, 0x00], "field number 0");
        assert_malformed(&[0x14], "unexpected end-group");
        assert_malformed(&[0xcb, 0x01, 0x08, 0x01], "not closed");
        assert_malformed(
            &[0xcb, 0x01, 0xd4, 0x01],
            "closed by an end-group of field 26",
        );
        let mut deep = Vec::new();
        for _ in 0..200 {
            key(&mut deep, 99, START_GROUP);
        }
        assert_malformed(&deep, "");
        // Invalid UTF-8 in strings, even ones not stored.
        assert_malformed(&span_with(&ld(5, b"\xc3\x28")), "UTF-8");
        assert_malformed(&span_with(&ld(3, b"\xff")), "UTF-8");
        assert_malformed(&ld(1, &ld(3, b"\xff")), "UTF-8");
        // Garbage inside an array value.
        assert_malformed(
            &span_with(&ld(9, &ld(2, &ld(5, b"\x0a\x09")))),
            "array value",
        );
    }

    #[test]
    fn every_truncation_agrees() {
        for body in [rich_request().encode_to_vec(), odd_body()] {
            for n in 0..body.len() {
                let _ = agree(&body[..n]);
            }
        }
    }

    /// Random damage (flipped, inserted, deleted bytes) never panics, and both paths agree.
    #[test]
    fn mutated_bodies_agree() {
        let bodies = [rich_request().encode_to_vec(), odd_body()];
        let mut rng = tracer_test_support::Rng(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next();
        // More with DECODE_FUZZ_ITERATIONS=1000000 (in release: `cargo test --release`).
        let iterations = std::env::var("DECODE_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4000);
        for i in 0..iterations {
            let mut b = bodies[i % 2].clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % b.len();
                match next() % 4 {
                    0 => b[at] ^= 1 << (next() % 8),
                    1 => b[at] = next() as u8,
                    2 => b.insert(at, next() as u8),
                    _ => {
                        let n = (next() as usize % 8).min(b.len() - at);
                        b.drain(at..at + n);
                    }
                }
            }
            let _ = agree(&b);
        }
    }
}
