//! The compact binary form of what a span row keeps outside its columns (attributes, events,
//! links, scope, kind, status message) and of resources.
//!
//! Strings that repeat across spans (attribute keys, scope names, event names) are written as ids
//! into the `strings` dictionary; everything else inline. A string reference is one varint `h`:
//! even `h` is an inline string of `h >> 1` bytes that follow, odd `h` is dictionary id `h >> 1`.
//! With 17 attributes a typical HTTP span body is ~150 bytes, a third of its JSON.
use crate::{
    AttrValue, AttrValueRef, KeyValue, KeyValueRef, SpanEvent, SpanEventRef, SpanLink, SpanLinkRef,
};

/// First byte of every body: bumps when the layout changes, so old rows stay readable.
const BODY_FORMAT: u8 = 1;
/// First byte of every resource blob.
const RESOURCE_FORMAT: u8 = 1;

const FLAG_MESSAGE: u64 = 1;
const FLAG_EVENTS: u64 = 2;
const FLAG_LINKS: u64 = 4;

const V_STR: u8 = 0;
const V_JSON: u8 = 1;
const V_INT: u8 = 2;
const V_FLOAT: u8 = 3;
const V_FALSE: u8 = 4;
const V_TRUE: u8 = 5;

/// Strings longer than this stay inline: long strings rarely repeat exactly.
pub(super) const MAX_INTERNED_LEN: usize = 96;

/// Gives dictionary ids to strings while encoding.
pub(super) trait Interner {
    /// The id of `s`, or `None` to write it inline.
    fn id(&mut self, s: &str) -> Option<u32>;
}

/// Resolves dictionary ids while decoding.
pub(super) trait Strings {
    fn get(&self, id: u32) -> Option<&str>;
}

#[derive(Debug)]
pub(super) struct Corrupt(pub &'static str);

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a stored span body is corrupt: {}", self.0)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_sref(out: &mut Vec<u8>, s: &str, interner: &mut impl Interner) {
    match interner.id(s) {
        Some(id) => put_varint(out, (u64::from(id) << 1) | 1),
        None => put_inline(out, s),
    }
}

fn put_inline(out: &mut Vec<u8>, s: &str) {
    put_varint(out, (s.len() as u64) << 1);
    out.extend_from_slice(s.as_bytes());
}

/// Values are inline: most distinct values (paths, addresses, ports) do not repeat enough to
/// pay for a dictionary entry.
fn put_value(out: &mut Vec<u8>, v: AttrValueRef<'_>) {
    match v {
        AttrValueRef::Str(s) => {
            out.push(V_STR);
            put_inline(out, s);
        }
        AttrValueRef::Json(s) => {
            out.push(V_JSON);
            put_inline(out, s);
        }
        AttrValueRef::Int(i) => {
            out.push(V_INT);
            put_varint(out, zigzag(i));
        }
        AttrValueRef::Float(f) => {
            out.push(V_FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        AttrValueRef::Bool(false) => out.push(V_FALSE),
        AttrValueRef::Bool(true) => out.push(V_TRUE),
    }
}

pub(super) fn put_attrs(
    out: &mut Vec<u8>,
    attrs: &[KeyValueRef<'_>],
    interner: &mut impl Interner,
) {
    put_varint(out, attrs.len() as u64);
    for kv in attrs {
        put_sref(out, kv.key, interner);
        put_value(out, kv.value);
    }
}

/// The parts of a span that live in its body.
pub(super) struct BodyRef<'a> {
    pub kind: i32,
    pub start_unix_nano: u64,
    pub status_message: &'a str,
    pub attributes: &'a [KeyValueRef<'a>],
    pub events: &'a [SpanEventRef<'a>],
    pub links: &'a [SpanLinkRef<'a>],
    pub scope_name: &'a str,
    pub scope_version: &'a str,
}

pub(super) fn encode_body(out: &mut Vec<u8>, b: &BodyRef<'_>, interner: &mut impl Interner) {
    out.push(BODY_FORMAT);
    let mut flags = 0;
    if !b.status_message.is_empty() {
        flags |= FLAG_MESSAGE;
    }
    if !b.events.is_empty() {
        flags |= FLAG_EVENTS;
    }
    if !b.links.is_empty() {
        flags |= FLAG_LINKS;
    }
    put_varint(out, flags);
    put_varint(out, zigzag(i64::from(b.kind)));
    put_sref(out, b.scope_name, interner);
    put_sref(out, b.scope_version, interner);
    put_attrs(out, b.attributes, interner);
    if flags & FLAG_MESSAGE != 0 {
        put_inline(out, b.status_message);
    }
    if flags & FLAG_EVENTS != 0 {
        put_varint(out, b.events.len() as u64);
        for e in b.events {
            // Relative to the span start: small, and exact for any u64 thanks to wrapping.
            put_varint(
                out,
                zigzag(e.time_unix_nano.wrapping_sub(b.start_unix_nano) as i64),
            );
            put_sref(out, e.name, interner);
            put_attrs(out, e.attributes, interner);
        }
    }
    if flags & FLAG_LINKS != 0 {
        put_varint(out, b.links.len() as u64);
        for l in b.links {
            out.extend_from_slice(&l.trace_id);
            out.extend_from_slice(&l.span_id);
            put_attrs(out, l.attributes, interner);
        }
    }
}

pub(super) fn encode_resource(
    out: &mut Vec<u8>,
    attrs: &[KeyValueRef<'_>],
    interner: &mut impl Interner,
) {
    out.push(RESOURCE_FORMAT);
    put_attrs(out, attrs, interner);
}

/// A string as stored: inline bytes or a dictionary id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Sref<'a> {
    Inline(&'a [u8]),
    Id(u32),
}

pub(super) struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Cursor { b, pos: 0 }
    }

    fn byte(&mut self) -> Result<u8, Corrupt> {
        let v = *self.b.get(self.pos).ok_or(Corrupt("truncated"))?;
        self.pos += 1;
        Ok(v)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(Corrupt("truncated"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, Corrupt> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Corrupt("varint too long"))
    }

    fn sref(&mut self) -> Result<Sref<'a>, Corrupt> {
        let h = self.varint()?;
        if h & 1 == 1 {
            u32::try_from(h >> 1)
                .map(Sref::Id)
                .map_err(|_| Corrupt("string id out of range"))
        } else {
            let n = usize::try_from(h >> 1).map_err(|_| Corrupt("string too long"))?;
            self.bytes(n).map(Sref::Inline)
        }
    }

    fn string(&mut self, dict: &impl Strings) -> Result<String, Corrupt> {
        resolve(self.sref()?, dict).map(str::to_owned)
    }

    fn inline_string(&mut self) -> Result<String, Corrupt> {
        match self.sref()? {
            Sref::Inline(b) => std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| Corrupt("invalid UTF-8")),
            Sref::Id(_) => Err(Corrupt("expected an inline string")),
        }
    }

    fn value(&mut self) -> Result<AttrValue, Corrupt> {
        Ok(match self.byte()? {
            V_STR => AttrValue::Str(self.inline_string()?),
            V_JSON => AttrValue::Json(self.inline_string()?),
            V_INT => AttrValue::Int(unzigzag(self.varint()?)),
            V_FLOAT => {
                let b = self.bytes(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                AttrValue::Float(f64::from_le_bytes(a))
            }
            V_FALSE => AttrValue::Bool(false),
            V_TRUE => AttrValue::Bool(true),
            _ => return Err(Corrupt("unknown value type")),
        })
    }

    fn attrs(&mut self, dict: &impl Strings) -> Result<Vec<KeyValue>, Corrupt> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let key = self.string(dict)?;
            let value = self.value()?;
            out.push(KeyValue { key, value });
        }
        Ok(out)
    }

    /// A element count, sanity-checked against the bytes left (every element takes one or more).
    fn count(&mut self) -> Result<usize, Corrupt> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.b.len() - self.pos)
            .ok_or(Corrupt("count larger than the body"))
    }

    /// Skips one value, returning it in a form to compare as text.
    fn raw_value(&mut self) -> Result<RawValue<'a>, Corrupt> {
        Ok(match self.byte()? {
            V_STR | V_JSON => match self.sref()? {
                Sref::Inline(b) => RawValue::Text(b),
                Sref::Id(_) => return Err(Corrupt("expected an inline string")),
            },
            V_INT => RawValue::Int(unzigzag(self.varint()?)),
            V_FLOAT => {
                let b = self.bytes(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                RawValue::Float(f64::from_le_bytes(a))
            }
            V_FALSE => RawValue::Bool(false),
            V_TRUE => RawValue::Bool(true),
            _ => return Err(Corrupt("unknown value type")),
        })
    }
}

fn resolve<'a>(s: Sref<'a>, dict: &'a impl Strings) -> Result<&'a str, Corrupt> {
    match s {
        Sref::Inline(b) => std::str::from_utf8(b).map_err(|_| Corrupt("invalid UTF-8")),
        Sref::Id(id) => dict.get(id).ok_or(Corrupt("unknown string id")),
    }
}

enum RawValue<'a> {
    Text(&'a [u8]),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl RawValue<'_> {
    /// Equal to `text` the way [`AttrValue::as_text`] renders it, without allocating for the
    /// common cases.
    fn text_eq(&self, text: &str) -> bool {
        match self {
            RawValue::Text(b) => *b == text.as_bytes(),
            RawValue::Int(i) => {
                let mut buf = [0u8; 24];
                let mut w = &mut buf[..];
                use std::io::Write;
                if write!(w, "{i}").is_err() {
                    return false;
                }
                let left = w.len();
                buf[..24 - left] == *text.as_bytes()
            }
            RawValue::Float(f) => f.to_string() == text,
            RawValue::Bool(b) => text == if *b { "true" } else { "false" },
        }
    }
}

/// A body decoded.
pub(super) struct Body {
    pub kind: i32,
    pub status_message: String,
    pub attributes: Vec<KeyValue>,
    pub events: Vec<SpanEvent>,
    pub links: Vec<SpanLink>,
    pub scope_name: String,
    pub scope_version: String,
}

pub(super) fn decode_body(
    b: &[u8],
    start_unix_nano: u64,
    dict: &impl Strings,
) -> Result<Body, Corrupt> {
    let mut c = Cursor::new(b);
    if c.byte()? != BODY_FORMAT {
        return Err(Corrupt("unknown body format"));
    }
    let flags = c.varint()?;
    let kind = i32::try_from(unzigzag(c.varint()?)).map_err(|_| Corrupt("kind out of range"))?;
    let scope_name = c.string(dict)?;
    let scope_version = c.string(dict)?;
    let attributes = c.attrs(dict)?;
    let status_message = if flags & FLAG_MESSAGE != 0 {
        c.inline_string()?
    } else {
        String::new()
    };
    let mut events = Vec::new();
    if flags & FLAG_EVENTS != 0 {
        let n = c.count()?;
        events.reserve(n);
        for _ in 0..n {
            let delta = unzigzag(c.varint()?);
            events.push(SpanEvent {
                time_unix_nano: start_unix_nano.wrapping_add(delta as u64),
                name: c.string(dict)?,
                attributes: c.attrs(dict)?,
            });
        }
    }
    let mut links = Vec::new();
    if flags & FLAG_LINKS != 0 {
        let n = c.count()?;
        links.reserve(n);
        for _ in 0..n {
            let mut trace_id = [0u8; 16];
            trace_id.copy_from_slice(c.bytes(16)?);
            let mut span_id = [0u8; 8];
            span_id.copy_from_slice(c.bytes(8)?);
            links.push(SpanLink {
                trace_id,
                span_id,
                attributes: c.attrs(dict)?,
            });
        }
    }
    if c.pos != b.len() {
        return Err(Corrupt("trailing bytes"));
    }
    Ok(Body {
        kind,
        status_message,
        attributes,
        events,
        links,
        scope_name,
        scope_version,
    })
}

pub(super) fn decode_resource(b: &[u8], dict: &impl Strings) -> Result<Vec<KeyValue>, Corrupt> {
    let mut c = Cursor::new(b);
    if c.byte()? != RESOURCE_FORMAT {
        return Err(Corrupt("unknown resource format"));
    }
    let attrs = c.attrs(dict)?;
    if c.pos != b.len() {
        return Err(Corrupt("trailing bytes"));
    }
    Ok(attrs)
}

/// A tag condition prepared for matching encoded attributes.
pub(super) struct TagMatcher<'q> {
    key: &'q str,
    /// The key's dictionary id, if it has one.
    key_id: Option<u32>,
    value: &'q str,
}

impl<'q> TagMatcher<'q> {
    pub fn new(key: &'q str, value: &'q str, dict_id: Option<u32>) -> Self {
        TagMatcher {
            key,
            key_id: dict_id,
            value,
        }
    }

    fn key_is(&self, s: Sref<'_>) -> bool {
        match s {
            Sref::Id(id) => Some(id) == self.key_id,
            Sref::Inline(b) => b == self.key.as_bytes(),
        }
    }

    /// Whether the encoded attribute list at `c` has `key = value`; leaves the cursor anywhere.
    fn in_attrs(&self, c: &mut Cursor<'_>) -> Result<bool, Corrupt> {
        let n = c.count()?;
        for _ in 0..n {
            let k = c.sref()?;
            let v = c.raw_value()?;
            if self.key_is(k) && v.text_eq(self.value) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Matches against a span body's attributes without decoding them.
    pub fn in_body(&self, body: &[u8]) -> Result<bool, Corrupt> {
        let mut c = Cursor::new(body);
        if c.byte()? != BODY_FORMAT {
            return Err(Corrupt("unknown body format"));
        }
        c.varint()?; // flags
        c.varint()?; // kind
        c.sref()?; // scope name
        c.sref()?; // scope version
        self.in_attrs(&mut c)
    }

    pub fn in_resource(&self, resource: &[u8]) -> Result<bool, Corrupt> {
        let mut c = Cursor::new(resource);
        if c.byte()? != RESOURCE_FORMAT {
            return Err(Corrupt("unknown resource format"));
        }
        self.in_attrs(&mut c)
    }

    /// The span kind from a body, for the `span.kind` pseudo tag.
    pub fn body_kind(body: &[u8]) -> Result<i32, Corrupt> {
        let mut c = Cursor::new(body);
        c.byte()?;
        c.varint()?;
        i32::try_from(unzigzag(c.varint()?)).map_err(|_| Corrupt("kind out of range"))
    }
}

/// The tag index key of `key = value` (text as [`AttrValue::as_text`] renders it): FNV-1a,
/// fixed forever because it is stored. Collisions only cost a candidate that fails verification.
pub(super) fn tag_hash(key: &str, value: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(value.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Dict {
        ids: HashMap<String, u32>,
        strs: Vec<String>,
    }
    impl Interner for Dict {
        fn id(&mut self, s: &str) -> Option<u32> {
            if s.len() > MAX_INTERNED_LEN {
                return None;
            }
            if let Some(id) = self.ids.get(s) {
                return Some(*id);
            }
            self.strs.push(s.to_owned());
            let id = self.strs.len() as u32;
            self.ids.insert(s.to_owned(), id);
            Some(id)
        }
    }
    impl Strings for Dict {
        fn get(&self, id: u32) -> Option<&str> {
            self.strs
                .get(id.checked_sub(1)? as usize)
                .map(String::as_str)
        }
    }

    fn kv(k: &str, v: AttrValue) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: v,
        }
    }

    #[test]
    fn bodies_round_trip_and_match_without_decoding() {
        let mut d = Dict::default();
        let attrs = vec![
            kv("s", AttrValue::Str("GET".into())),
            kv("i", AttrValue::Int(-404)),
            kv("big", AttrValue::Int(i64::MIN)),
            kv("f", AttrValue::Float(0.25)),
            kv("b", AttrValue::Bool(true)),
            kv("j", AttrValue::Json("[1]".into())),
            kv(&"k".repeat(200), AttrValue::Str("long key".into())),
        ];
        let events = vec![SpanEvent {
            time_unix_nano: 3,
            name: "before start".into(),
            attributes: attrs.clone(),
        }];
        let links = vec![SpanLink {
            trace_id: [7; 16],
            span_id: [8; 8],
            attributes: vec![],
        }];
        let attr_refs: Vec<KeyValueRef<'_>> = attrs.iter().map(KeyValue::as_ref).collect();
        let event_refs = [SpanEventRef {
            time_unix_nano: 3,
            name: "before start",
            attributes: &attr_refs,
        }];
        let link_refs = [SpanLinkRef {
            trace_id: [7; 16],
            span_id: [8; 8],
            attributes: &[],
        }];
        let b = BodyRef {
            kind: 3,
            start_unix_nano: u64::MAX - 1,
            status_message: "oops",
            attributes: &attr_refs,
            events: &event_refs,
            links: &link_refs,
            scope_name: "scope",
            scope_version: "",
        };
        let mut out = Vec::new();
        encode_body(&mut out, &b, &mut d);
        let got = decode_body(&out, u64::MAX - 1, &d).unwrap();
        assert_eq!(got.kind, 3);
        assert_eq!(got.status_message, "oops");
        assert_eq!(got.attributes, attrs);
        assert_eq!(got.events, events);
        assert_eq!(got.links, links);
        assert_eq!(
            (got.scope_name.as_str(), got.scope_version.as_str()),
            ("scope", "")
        );
        let m = |k: &str, v: &str| {
            TagMatcher::new(k, v, d.ids.get(k).copied())
                .in_body(&out)
                .unwrap()
        };
        assert!(m("i", "-404"));
        assert!(!m("i", "404"));
        assert!(m("big", &i64::MIN.to_string()));
        assert!(m("s", "GET"));
        assert!(m("f", "0.25"));
        assert!(m("b", "true"));
        assert!(m("j", "[1]"));
        assert!(m(&"k".repeat(200), "long key"));
        assert!(!m("nope", "GET"));
        assert_eq!(TagMatcher::body_kind(&out).unwrap(), 3);
        // Every truncation is an error, never a panic.
        for n in 0..out.len() {
            assert!(decode_body(&out[..n], 0, &d).is_err());
        }
    }
}
