//! The few pieces of the protobuf wire format the agent writes by hand: OTLP spans are encoded
//! straight from the agent's own span type (see `spans.rs`), and the request around them from
//! pre-encoded resources (see `export.rs`). Field numbers are those of the OTLP `.proto` files
//! (opentelemetry-proto, `trace/v1/trace.proto`, `common/v1/common.proto`).
//!
//! Everything is inlined: at a call site with a literal key the key's copy has a known length
//! and compiles to a few moves instead of a `memcpy` call (~25 a span, 13% of the agent's time).

/// Wire type of length-delimited fields (strings, bytes, messages).
pub const LEN: u8 = 2;
const VARINT: u8 = 0;
const FIXED64: u8 = 1;

pub mod request {
    pub const RESOURCE_SPANS: u32 = 1;
}
pub mod resource_spans {
    pub const RESOURCE: u32 = 1;
    pub const SCOPE_SPANS: u32 = 2;
}
pub mod scope_spans {
    pub const SCOPE: u32 = 1;
    pub const SPANS: u32 = 2;
}
pub mod span {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START_TIME_UNIX_NANO: u32 = 7;
    pub const END_TIME_UNIX_NANO: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
}
pub mod status {
    pub const MESSAGE: u32 = 2;
    pub const CODE: u32 = 3;
}
mod key_value {
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
}
mod any_value {
    pub const STRING_VALUE: u32 = 1;
    pub const INT_VALUE: u32 = 3;
}

#[inline(always)]
pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline(always)]
pub fn varint_len(v: u64) -> usize {
    // 7 bits a byte; 0 still takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline(always)]
pub fn tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire_type)));
}

/// Bytes a length-delimited field of `len` bytes takes, its tag included (every field written
/// here is numbered below 16: a one-byte tag).
#[inline(always)]
pub fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

#[inline(always)]
pub fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[inline(always)]
pub fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, VARINT);
    varint(out, v);
}

#[inline(always)]
pub fn fixed64_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A `KeyValue` as repeated field `field`, up to its `AnyValue`'s content of `any` bytes.
#[inline(always)]
fn key_value_head(out: &mut Vec<u8>, field: u32, key: &str, any: usize) {
    let kv = field_len(key.len()) + field_len(any);
    tag(out, field, LEN);
    varint(out, kv as u64);
    bytes_field(out, key_value::KEY, key.as_bytes());
    tag(out, key_value::VALUE, LEN);
    varint(out, any as u64);
}

/// Writes a `KeyValue` as repeated field `field` up to its value's own bytes (the `AnyValue`'s
/// tag and length, the key, and the value's tag `value_tag`) in three runs, when every length
/// in it fits one byte (`kv` < 128; fields numbered below 16). Returns false, having written
/// nothing, otherwise.
///
/// Nearly every attribute fits: written tag by tag, varint by varint, attributes were about a
/// third of encoding a span.
#[inline(always)]
fn short_key_value_head(
    out: &mut Vec<u8>,
    field: u32,
    key: &str,
    any: usize,
    value_tag: u8,
) -> bool {
    let kv = field_len(key.len()) + field_len(any);
    if field >= 16 || kv >= 128 {
        return false;
    }
    let tag = |field: u32, wire_type: u8| (field << 3) as u8 | wire_type;
    out.reserve(2 + kv);
    out.extend_from_slice(&[
        tag(field, LEN),
        kv as u8,
        tag(key_value::KEY, LEN),
        key.len() as u8,
    ]);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&[tag(key_value::VALUE, LEN), any as u8, value_tag]);
    true
}

/// A `KeyValue` with a string `AnyValue`, as repeated field `field`.
#[inline(always)]
pub fn string_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &str) {
    let any = field_len(value.len());
    let value_tag = (any_value::STRING_VALUE << 3) as u8 | LEN;
    if short_key_value_head(out, field, key, any, value_tag) {
        // `any` < 128: the value's length is one byte too.
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
        return;
    }
    key_value_head(out, field, key, any);
    bytes_field(out, any_value::STRING_VALUE, value.as_bytes());
}

/// A `KeyValue` with an integer `AnyValue`, as repeated field `field`.
#[inline(always)]
pub fn int_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: i64) {
    // int64 is a plain varint: negative numbers take ten bytes.
    let any = 1 + varint_len(value as u64);
    let value_tag = (any_value::INT_VALUE << 3) as u8 | VARINT;
    if short_key_value_head(out, field, key, any, value_tag) {
        varint(out, value as u64);
        return;
    }
    key_value_head(out, field, key, any);
    varint_field(out, any_value::INT_VALUE, value as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(prost::encoding::encoded_len_varint(v), out.len());
        }
    }
}
