//! Decoding ring-buffer records into owned Rust values.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tracer_common::{
    kind, CloseRecord, ConnRecord, ConnTuple, DataRecord, InjectedRecord, RecordHeader, RedRecord,
};

pub enum Record<'a> {
    /// A data syscall and the payload captured from it.
    Data {
        record: &'a DataRecord,
        payload: &'a [u8],
    },
    Connection(ConnRecord),
    Close {
        header: RecordHeader,
    },
    /// The probes inserted a `traceparent` into the request of the next data record.
    Injected(InjectedRecord),
    /// `--metrics-only`: a path, or an exchange, counted in the kernel (`kernel_red`).
    Red(RedRecord),
}

/// Reinterprets one ring-buffer item. Returns `None` for a record of unknown kind or short size
/// (a probe/agent version mismatch), which the caller counts.
pub fn decode(bytes: &[u8]) -> Option<Record<'_>> {
    if bytes.len() < 4 {
        return None;
    }
    let k = u32::from_ne_bytes(bytes[..4].try_into().ok()?);
    match k {
        kind::DATA if bytes.len() >= size_of::<DataRecord>() => {
            let ptr = bytes.as_ptr().cast::<DataRecord>();
            if !ptr.is_aligned() {
                return None;
            }
            // SAFETY: size checked above; the ring buffer hands out 8-byte aligned records and
            // alignment is checked; DataRecord is plain old data valid for any bit pattern.
            let record = unsafe { &*ptr };
            let after = &bytes[size_of::<DataRecord>()..];
            let payload = &after[..(record.captured as usize).min(after.len())];
            Some(Record::Data { record, payload })
        }
        kind::CONNECTION if bytes.len() >= size_of::<ConnRecord>() => {
            // SAFETY: size checked; read_unaligned has no alignment requirement.
            let rec = unsafe { bytes.as_ptr().cast::<ConnRecord>().read_unaligned() };
            Some(Record::Connection(rec))
        }
        kind::CLOSE if bytes.len() >= size_of::<CloseRecord>() => {
            // SAFETY: size checked; read_unaligned has no alignment requirement.
            let rec = unsafe { bytes.as_ptr().cast::<CloseRecord>().read_unaligned() };
            Some(Record::Close { header: rec.header })
        }
        kind::INJECTED if bytes.len() >= size_of::<InjectedRecord>() => {
            // SAFETY: size checked; read_unaligned has no alignment requirement.
            let rec = unsafe { bytes.as_ptr().cast::<InjectedRecord>().read_unaligned() };
            Some(Record::Injected(rec))
        }
        kind::RED if bytes.len() >= size_of::<RedRecord>() => {
            // SAFETY: size checked; read_unaligned has no alignment requirement.
            let rec = unsafe { bytes.as_ptr().cast::<RedRecord>().read_unaligned() };
            Some(Record::Red(rec))
        }
        _ => None,
    }
}

/// A record built in a test, laid out as the ring buffer hands records out: `rec`, then
/// `payload`, 8-byte aligned.
#[cfg(test)]
pub(crate) struct AlignedRecord {
    words: Vec<u64>,
    len: usize,
}

#[cfg(test)]
impl AlignedRecord {
    pub fn new<T: Copy>(rec: &T, payload: &[u8]) -> Self {
        let len = size_of::<T>() + payload.len();
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: `words` has room for `len` bytes; T is a plain-old-data record.
        unsafe {
            let bytes = words.as_mut_ptr().cast::<u8>();
            bytes.cast::<T>().write(*rec);
            let after = bytes.add(size_of::<T>());
            std::ptr::copy_nonoverlapping(payload.as_ptr(), after, payload.len());
        }
        AlignedRecord { words, len }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u64s are plain bytes; `len` is within them.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

fn ip(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == libc::AF_INET as u16 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let v6 = Ipv6Addr::from(*raw);
        // Dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d; report them as IPv4.
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

pub fn local_addr(t: &ConnTuple) -> SocketAddr {
    SocketAddr::new(ip(t.family, &t.local_addr), t.local_port)
}

pub fn remote_addr(t: &ConnTuple) -> SocketAddr {
    SocketAddr::new(ip(t.family, &t.remote_addr), t.remote_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_are_reported_as_ipv4() {
        let mut t = ConnTuple {
            family: libc::AF_INET6 as u16,
            local_port: 80,
            ..Default::default()
        };
        t.local_addr[10] = 0xff;
        t.local_addr[11] = 0xff;
        t.local_addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(local_addr(&t), "127.0.0.1:80".parse().unwrap());
    }

    #[test]
    fn payload_is_what_follows_the_record_up_to_captured() {
        let rec = DataRecord {
            header: RecordHeader {
                kind: kind::DATA,
                ..Default::default()
            },
            captured: 5,
            ..Default::default()
        };
        let record = AlignedRecord::new(&rec, b"GET /abc");
        let Some(Record::Data { payload, .. }) = decode(record.bytes()) else {
            panic!("not decoded as data");
        };
        assert_eq!(payload, b"GET /");
        // A record claiming more than it carries gives what it carries.
        let rec = DataRecord {
            captured: 1000,
            ..rec
        };
        let record = AlignedRecord::new(&rec, b"GET /abc");
        let Some(Record::Data { payload, .. }) = decode(record.bytes()) else {
            panic!("not decoded as data");
        };
        assert_eq!(payload.len(), 8);
    }

    #[test]
    fn short_or_unknown_records_are_rejected() {
        assert!(decode(&[1, 0]).is_none());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(
            decode(&[1, 0, 0, 0, 0, 0, 0, 0]).is_none(),
            "data record too short"
        );
    }
}
