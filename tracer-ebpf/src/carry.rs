//! `--sample-in-kernel` across hosts: a call's decision travels in a TCP option on the segment
//! that carries its request's first byte, and the server end on the other host takes it, as a
//! server end on the same host takes it from `FOLLOWED`, instead of deciding by the request's
//! sequence number alone. Only decisions that differ from the number's are sent: those are the
//! ones `FOLLOWED` holds.
//!
//! `carry_decisions` (sock_ops, on the cgroup v2 root; needs CAP_NET_ADMIN like the context
//! injector) asks to be called as each segment of an outgoing connection is built and as a
//! segment with an option the kernel does not know arrives on an accepted one: only with
//! remote addresses in `--tcp-option-networks` (a server outside the fleet has no agent to
//! read it; a client outside could drop its own requests from the traces), and not over
//! loopback (both ends are on this host, where `FOLLOWED` hands the decision over). Sending, it
//! looks up the segment's first sequence number (`snd_nxt` as new data is sent) in `FOLLOWED`,
//! where the write's entry (red.rs, `decide_ahead`) put the call's decision; a retransmitted
//! segment goes without (its server end then decides by the number), and so does one too full
//! for the option within the MSS, which the kernel sizes without it. Receiving, the option
//! names the request's first sequence number itself, so a segment split by GSO, each part
//! with a copy of the option, inserts the same entry.
//!
//! The option is RFC 6994's shared experimental kind with this project's id: a middlebox that
//! drops segments with unknown options breaks connections, `--no-tcp-option` turns it off.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::generated::{
        bpf_get_netns_cookie, bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use tracer_common::{counter, data_flags, red};

use crate::{
    flow::{words, AF_INET6},
    kernel::AF_INET,
    maps::*,
    red::{edge_key, follow, followed},
};

#[sock_ops]
pub fn carry_decisions(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => watch(&ctx, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            watch(&ctx, BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG)
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            if outgoing(&ctx).is_some() {
                // SAFETY: the helper takes the program's context.
                unsafe { bpf_reserve_hdr_opt(ctx.ops, u32::from(red::OPTION_LEN), 0) };
            }
        }
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => {
            if let Some((seq, keep)) = outgoing(&ctx) {
                let opt = option(seq, keep);
                // SAFETY: the helper reads `OPTION_LEN` bytes of the array.
                let stored = unsafe {
                    bpf_store_hdr_opt(ctx.ops, opt.as_ptr().cast(), u32::from(red::OPTION_LEN), 0)
                };
                if stored == 0 {
                    bump(counter::DECISIONS_SENT);
                }
            }
        }
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => incoming(&ctx),
        _ => {}
    }
    1
}

/// A new connection of the traced namespace with a host it exchanges decisions with: have this
/// program called back with `flag`.
#[inline(always)]
fn watch(ctx: &SockOpsContext, flag: u32) {
    if ours(ctx) && exchanged_with(ctx) {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | flag) as i32);
    }
}

/// Whether decisions are exchanged with the remote address: not a loopback one (127.0.0.0/8,
/// ::1, ::ffff:127.x.y.z), and in `CARRY_NETS` unless `CARRY_EVERYWHERE`.
#[inline(always)]
fn exchanged_with(ctx: &SockOpsContext) -> bool {
    // SAFETY: the context pointer is valid for this run.
    let ops = unsafe { &*ctx.ops };
    // Addresses in network order, read as little-endian words: the first byte is the lowest.
    let mut key = [0u8; 20];
    if ops.family == AF_INET6 {
        let a = words(&ops.remote_ip6);
        let mapped = a[0] == 0 && a[1] == 0 && a[2] == 0xffff_0000;
        if (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 1u32.to_be())
            || (mapped && a[3] & 0xff == 127)
        {
            return false;
        }
        if mapped {
            // A dual-stack socket's IPv4 peer: looked up as IPv4.
            key[0] = AF_INET as u8;
            key[4..8].copy_from_slice(&a[3].to_le_bytes());
        } else {
            key[0] = AF_INET6 as u8;
            for (i, w) in a.iter().enumerate() {
                key[4 + 4 * i..8 + 4 * i].copy_from_slice(&w.to_le_bytes());
            }
        }
    } else {
        if ops.remote_ip4 & 0xff == 127 {
            return false;
        }
        key[0] = AF_INET as u8;
        key[4..8].copy_from_slice(&ops.remote_ip4.to_le_bytes());
    }
    // SAFETY: read_volatile: the agent rewrites the zero initialiser before load.
    let everywhere = unsafe { core::ptr::read_volatile(&raw const CARRY_EVERYWHERE) } != 0;
    everywhere || CARRY_NETS.get(TrustKey::new(160, key)).is_some()
}

/// Whether the connection is in the traced namespace. A socket's callbacks run every program
/// attached, those of the other namespaces' agents too, which asked for none of them.
#[inline(always)]
fn ours(ctx: &SockOpsContext) -> bool {
    // SAFETY: read_volatile: the agent rewrites the zero initialiser before load.
    let want = unsafe { core::ptr::read_volatile(&raw const CARRY_NETNS_COOKIE) };
    // SAFETY: the helper takes the program's context.
    want == 0 || unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } == want
}

/// The decision to send on the segment being built, with the sequence number it starts at:
/// new data starting where a call's request starts, in a segment with room for the option.
#[inline(always)]
fn outgoing(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    // SAFETY: the context pointer is valid for this run; `skb_len` is 0 without a segment
    // (the kernel sizing its options for the MSS: ours are left out of it) and for a segment
    // without data.
    let (len, seq, mss) = unsafe { ((*ctx.ops).skb_len, (*ctx.ops).snd_nxt, (*ctx.ops).mss_cache) };
    // The MSS leaves no room for more options: a segment with less data than it by the whole
    // option space (40 bytes) carries ours within the path's MTU whatever else it carries
    // (SACK blocks). A request whose first segment is fuller goes without, and its server
    // end decides by the number.
    if len == 0 || len + 40 > mss {
        return None;
    }
    let key = edge_key(seq, ctx.local_port() as u16, remote_port(ctx));
    let keep = followed(key)?;
    ours(ctx).then_some((seq, keep))
}

/// A segment with an option the kernel does not know arrived: if it is this project's, its
/// decision waits in `FOLLOWED` for the server end's read of the request.
#[inline(always)]
fn incoming(ctx: &SockOpsContext) {
    if !ours(ctx) {
        return;
    }
    let exid = red::OPTION_EXID.to_be_bytes();
    // Searched by kind and id: the kind, the length of kind, length and id, then the id.
    let mut opt = [0u8; red::OPTION_LEN as usize];
    opt[0] = red::OPTION_KIND;
    opt[1] = 4;
    opt[2] = exid[0];
    opt[3] = exid[1];
    // SAFETY: the helper writes at most `OPTION_LEN` bytes into the array.
    let found = unsafe {
        bpf_load_hdr_opt(
            ctx.ops,
            opt.as_mut_ptr().cast(),
            u32::from(red::OPTION_LEN),
            0,
        )
    };
    if found != i64::from(red::OPTION_LEN) || opt[1] != red::OPTION_LEN {
        return;
    }
    let seq = u32::from_be_bytes([opt[4], opt[5], opt[6], opt[7]]);
    let keep = u32::from_be_bytes([opt[8], opt[9], opt[10], opt[11]]) & data_flags::DECIDED;
    let key = edge_key(seq, remote_port(ctx), ctx.local_port() as u16);
    follow(key, keep);
    bump(counter::DECISIONS_RECEIVED);
}

/// The option: kind, length, id, the request's first sequence number, the decision.
#[inline(always)]
fn option(seq: u32, keep: u32) -> [u8; red::OPTION_LEN as usize] {
    let (exid, seq, keep) = (
        red::OPTION_EXID.to_be_bytes(),
        seq.to_be_bytes(),
        keep.to_be_bytes(),
    );
    [
        red::OPTION_KIND,
        red::OPTION_LEN,
        exid[0],
        exid[1],
        seq[0],
        seq[1],
        seq[2],
        seq[3],
        keep[0],
        keep[1],
        keep[2],
        keep[3],
    ]
}

/// The remote port in host order: sock_ops gives it in network order, in the upper half of
/// the word on little-endian kernels since 5.x (the lower half before).
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    let r = ctx.remote_port();
    let be = if r > 0xffff { r >> 16 } else { r };
    u16::from_be(be as u16)
}
