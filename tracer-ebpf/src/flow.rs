//! A TCP connection's endpoints as sock_ops and sk_msg programs both read them: how the context
//! injector's two objects name a connection (sk_msg programs cannot read a socket cookie).
#![allow(dead_code)] // Each object uses its part.

pub(crate) const AF_INET6: u32 = 10;

/// IPv4 in the first word; the local port in host order, the remote one in network order (as
/// the contexts give them).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowKey {
    pub(crate) family: u32,
    pub(crate) local_port: u32,
    pub(crate) remote_port: u32,
    pub(crate) _pad: u32,
    pub(crate) local: [u32; 4],
    pub(crate) remote: [u32; 4],
}

/// An IPv6 address from a program's context, one 32-bit load at a time: the verifier refuses
/// the byte-wise copy the compiler would make of the array.
#[inline(always)]
pub(crate) fn words(a: &[u32; 4]) -> [u32; 4] {
    // SAFETY: aligned fields of the context.
    unsafe {
        [
            core::ptr::read_volatile(&a[0]),
            core::ptr::read_volatile(&a[1]),
            core::ptr::read_volatile(&a[2]),
            core::ptr::read_volatile(&a[3]),
        ]
    }
}
