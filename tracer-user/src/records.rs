//! Decoding ring-buffer records into owned Rust values.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tracer_common::{kind, CloseRecord, ConnTuple, DataRecord, RecordHeader};

pub enum Record<'a> {
    Data { record: &'a DataRecord },
    Close { header: RecordHeader },
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
            Some(Record::Data {
                record: unsafe { &*ptr },
            })
        }
        kind::CLOSE if bytes.len() >= size_of::<CloseRecord>() => {
            // SAFETY: size checked; read_unaligned has no alignment requirement.
            let rec = unsafe { bytes.as_ptr().cast::<CloseRecord>().read_unaligned() };
            Some(Record::Close { header: rec.header })
        }
        _ => None,
    }
}

/// The payload bytes a data record carries.
pub fn payload(record: &DataRecord) -> &[u8] {
    let n = (record.captured as usize).min(record.data.len());
    &record.data[..n]
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
    fn short_or_unknown_records_are_rejected() {
        assert!(decode(&[1, 0]).is_none());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(
            decode(&[1, 0, 0, 0, 0, 0, 0, 0]).is_none(),
            "data record too short"
        );
    }
}
