//! The context injector's sock_ops half (`--inject-context`), an object of its own: its
//! sockhash needs CAP_NET_ADMIN to create, which the agent asks for only when injecting (the
//! packaged agent runs without it). See `inject.rs` for the whole design.
//!
//! `track_outgoing` (on the cgroup v2 root) puts each outgoing TCP connection of the traced
//! namespace into `OUTGOING` once it is established, and takes it out as the first segment with
//! data is built: by then the sk_msg program attached to the map has seen the first message,
//! and no response can have come. A socket in a sockmap gets `tcp_bpf`'s operations, whose
//! `FIONREAD` counts only what a verdict program queued (none here): kept in the map, nginx
//! reading a proxied 20 MB response stalled after 24 KB.
#![no_std]
#![no_main]

mod flow;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_map_delete_elem},
    macros::{map, sock_ops},
    maps::SockHash,
    programs::SockOpsContext,
};

use crate::flow::*;

/// The namespace (its cookie) whose connections may be changed; 0 for every namespace.
#[no_mangle]
static INJECT_NETNS_COOKIE: u64 = 0;

/// New outgoing connections not yet sent on; the injector (sk_msg) is attached to it.
#[map]
static OUTGOING: SockHash<FlowKey> = SockHash::with_max_entries(65536, 0);

#[sock_ops]
pub fn track_outgoing(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: read_volatile: the agent rewrites the zero initialiser before load.
            let want = unsafe { core::ptr::read_volatile(&INJECT_NETNS_COOKIE) };
            // SAFETY: the helper takes the program's context.
            if want != 0 && unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != want {
                return 1;
            }
            let key = flow_of_ops(&ctx);
            // SAFETY: the context pointer is valid for this run.
            if OUTGOING.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
                // Called back as each segment is built (no option space reserved, headers
                // unchanged): the first with data ends the connection's time in the map.
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
                let _ = ctx.set_cb_flags(flags as i32);
            }
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            // SAFETY: the context pointer is valid for this run.
            if unsafe { (*ctx.ops).skb_len } == 0 {
                // A pure ACK (the handshake's last): the first message is still to come.
                return 1;
            }
            let key = flow_of_ops(&ctx);
            // SAFETY: the map and a key of its type; sock_ops may delete from a sockmap (sk_msg
            // may not: "cannot update sockmap in this context").
            unsafe {
                bpf_map_delete_elem(
                    (&raw const OUTGOING).cast_mut().cast(),
                    (&raw const key).cast(),
                )
            };
            let flags = ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
        }
        _ => {}
    }
    1
}

/// A connection's endpoints from a sock_ops context, as `FlowKey` has them.
#[inline(always)]
fn flow_of_ops(ctx: &SockOpsContext) -> FlowKey {
    // SAFETY: the context pointer is valid for this run.
    let ops = unsafe { &*ctx.ops };
    let mut key = FlowKey {
        family: ops.family,
        local_port: ops.local_port,
        remote_port: ops.remote_port,
        _pad: 0,
        local: [0; 4],
        remote: [0; 4],
    };
    if ops.family == AF_INET6 {
        key.local = words(&ops.local_ip6);
        key.remote = words(&ops.remote_ip6);
    } else {
        key.local[0] = ops.local_ip4;
        key.remote[0] = ops.remote_ip4;
    }
    key
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
