//! Trace context that arrives on the wire: W3C `traceparent` and B3 headers in HTTP/1 requests,
//! and whose context the agent trusts.
//!
//! An incoming `traceparent` lets a server span join the trace of an SDK-instrumented caller
//! (and parent what an instrumented service does after it). Only the ids are kept: `tracestate`,
//! baggage and sampling flags are not needed for linking and may carry user data.
use std::net::IpAddr;

use anyhow::{bail, Context as _};

/// Which header a context came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextHeader {
    Traceparent,
    B3,
}

/// A caller's trace id and span id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub header: ContextHeader,
}

/// `traceparent: 00-<32 hex>-<16 hex>-<2 hex>` (W3C Trace Context, level 1). Versions above 00
/// are read the same way, as the spec asks; all-zero ids and version ff are invalid.
#[must_use]
pub fn parse_traceparent(value: &[u8]) -> Option<RemoteContext> {
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = hex_bytes::<1>(&value[..2])?;
    if version[0] == 0xff || (version[0] == 0 && value.len() != 55) {
        return None;
    }
    let trace_id = hex_bytes::<16>(&value[3..35])?;
    let span_id = hex_bytes::<8>(&value[36..52])?;
    hex_bytes::<1>(&value[53..55])?;
    valid(trace_id, span_id, ContextHeader::Traceparent)
}

/// Single-header B3 (`b3: <trace>-<span>[-<sampled>[-<parent>]]`, trace id of 16 or 32 hex).
#[must_use]
pub fn parse_b3(value: &[u8]) -> Option<RemoteContext> {
    let mut parts = value.split(|&b| b == b'-');
    let trace = parts.next()?;
    let span = parts.next()?;
    parse_b3_ids(trace, span)
}

/// Multi-header B3: `X-B3-TraceId` and `X-B3-SpanId`.
#[must_use]
pub fn parse_b3_ids(trace: &[u8], span: &[u8]) -> Option<RemoteContext> {
    let trace_id = match trace.len() {
        32 => hex_bytes::<16>(trace)?,
        16 => {
            // A 64-bit B3 trace id is the low half of the 128-bit one.
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&hex_bytes::<8>(trace)?);
            id
        }
        _ => return None,
    };
    if span.len() != 16 {
        return None;
    }
    valid(trace_id, hex_bytes::<8>(span)?, ContextHeader::B3)
}

fn valid(trace_id: [u8; 16], span_id: [u8; 8], header: ContextHeader) -> Option<RemoteContext> {
    (trace_id != [0; 16] && span_id != [0; 8]).then_some(RemoteContext {
        trace_id,
        span_id,
        header,
    })
}

/// Lower-case or upper-case hex of exactly `N` bytes.
pub(crate) fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Whose incoming context the agent honours (`--trust-context`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    All,
    Nobody,
    /// Callers whose address is in one of these networks.
    Networks(Vec<(IpAddr, u8)>),
}

impl Trust {
    /// `all`, `none`, or comma-separated CIDRs (a bare address is a /32 or /128).
    pub fn parse(s: &str) -> anyhow::Result<Trust> {
        Self::parse_flag("--trust-context", s)
    }

    /// As `parse`, for the option `flag` (named in the errors).
    pub fn parse_flag(flag: &str, s: &str) -> anyhow::Result<Trust> {
        match s.trim() {
            "all" => return Ok(Trust::All),
            "none" => return Ok(Trust::Nobody),
            _ => {}
        }
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (addr, bits) = match part.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (part, None),
            };
            let addr: IpAddr = addr.parse().with_context(|| {
                format!(
                    "{flag}: {part:?} is not an address or CIDR (use all, none or e.g. 10.0.0.0/8)"
                )
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(b) => b
                    .parse::<u8>()
                    .ok()
                    .filter(|&b| b <= max)
                    .with_context(|| format!("{flag}: bad prefix length in {part:?}"))?,
                None => max,
            };
            nets.push((addr, bits));
        }
        if nets.is_empty() {
            bail!("{flag} is empty: use all, none or a list of CIDRs");
        }
        Ok(Trust::Networks(nets))
    }

    #[must_use]
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = unmap(peer);
        match self {
            Trust::All => true,
            Trust::Nobody => false,
            Trust::Networks(nets) => nets.iter().any(|&(net, bits)| in_network(peer, net, bits)),
        }
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) as IPv4.
#[must_use]
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_and_rejects_bad_values() {
        let v = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = parse_traceparent(v).unwrap();
        assert_eq!(c.trace_id[0], 0x4b);
        assert_eq!(c.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(c.header, ContextHeader::Traceparent);
        // All-zero ids, version ff, wrong lengths, non-hex.
        assert!(
            parse_traceparent(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none()
        );
        assert!(
            parse_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_none()
        );
        assert!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01").is_none()
        );
        // A later version may append fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn b3_single_and_multi_headers_parse() {
        let c = parse_b3(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap();
        assert_eq!(c.trace_id[0], 0x80);
        assert_eq!(c.header, ContextHeader::B3);
        let c = parse_b3_ids(b"a3ce929d0e0e4736", b"00f067aa0ba902b7").unwrap();
        assert_eq!(&c.trace_id[..8], &[0; 8]);
        assert_eq!(c.trace_id[8], 0xa3);
        assert!(parse_b3(b"0").is_none());
        assert!(parse_b3_ids(b"a3ce", b"00f067aa0ba902b7").is_none());
    }

    #[test]
    fn trust_lists_match_networks() {
        let t = Trust::parse("10.0.0.0/8, 192.168.1.7,fd00::/8").unwrap();
        assert!(t.trusts("10.200.3.4".parse().unwrap()));
        assert!(t.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(t.trusts("192.168.1.7".parse().unwrap()));
        assert!(!t.trusts("192.168.1.8".parse().unwrap()));
        assert!(t.trusts("fd12::1".parse().unwrap()));
        assert!(!t.trusts("2001:db8::1".parse().unwrap()));
        assert!(Trust::parse("all")
            .unwrap()
            .trusts("8.8.8.8".parse().unwrap()));
        assert!(!Trust::parse("none")
            .unwrap()
            .trusts("127.0.0.1".parse().unwrap()));
        assert!(Trust::parse("10.0.0.0/33").is_err());
        assert!(Trust::parse("nope").is_err());
        assert!(Trust::parse("0.0.0.0/0")
            .unwrap()
            .trusts("1.2.3.4".parse().unwrap()));
    }
}
