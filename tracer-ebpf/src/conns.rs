//! Connection tracking: a socket becomes a connection the first time it moves data (or at
//! connect/accept), announced to the agent once; its close or replacement is announced too.
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use tracer_common::{conn_key, counter, kind, CloseRecord, ConnRecord, ConnState};

use crate::{capture::*, kernel::*, maps::*};

/// Starts tracking `fd` of the calling thread's process, met mid-stream by a data syscall, if
/// it is a TCP socket (of the traced network namespace); returns its state if it is tracked now.
#[inline(always)]
pub(crate) fn track(pid_tgid: u64, fd: u32) -> Option<*mut ConnState> {
    if !start_tracking(pid_tgid, fd, false, false) {
        return None;
    }
    CONNS.get_ptr_mut(conn_key((pid_tgid >> 32) as u32, fd))
}

/// Starts tracking `fd` of the calling thread's process if it is a TCP socket (of the traced
/// network namespace) and tells the agent its endpoints; remembers an fd that is not one.
/// Whether it is tracked now. connect and accept call this alone: they need no pointer to the
/// new entry, so they skip the map lookup that would find it.
#[inline(always)]
pub(crate) fn start_tracking(pid_tgid: u64, fd: u32, accepted: bool, from_start: bool) -> bool {
    let tgid = (pid_tgid >> 32) as u32;
    let key = conn_key(tgid, fd);
    let socket = match fd_kind(fd) {
        Some(FdKind::Tcp(socket)) => socket,
        Some(FdKind::NotTcp) => {
            let _ = NOT_TCP.insert(key, 0, 0);
            return false;
        }
        None => return false,
    };
    let wanted_netns = netns_filter();
    if wanted_netns != 0 && netns_of(socket.sk) != wanted_netns {
        // Another namespace's socket is, for this agent, as good as a file.
        let _ = NOT_TCP.insert(key, 0, 0);
        return false;
    }
    // Built in a per-CPU slot, not on the stack: the probes that inline this twice (recvmmsg)
    // have no room for two copies.
    let Some(state) = NEW_CONN.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot; programs do not nest on a CPU. Zeroed in place, then filled.
    let state = unsafe {
        core::ptr::write_bytes(state, 0, 1);
        &mut *state
    };
    state.conn_id = unsafe { bpf_ktime_get_ns() };
    state.sk = socket.sk;
    state.datagram = u32::from(socket.datagram);
    state.accepted = u32::from(accepted);
    state.from_start = u32::from(from_start);
    state.tuple = socket.tuple;
    state.comm = current_comm();
    // With the framing in the kernel, announced before its first record, if it has one; but
    // a process's first connection at once: the agent names the kernel's counts by process
    // from it (a short-lived client is gone from /proc by the time the counts are read).
    let now = !red_enabled() || ANNOUNCED_PROCESSES.get_ptr(tgid).is_none();
    if now && red_enabled() {
        let _ = ANNOUNCED_PROCESSES.insert(tgid, 0, 0);
    }
    state.announced = u32::from(now);
    // By reference: a copy of the value would go on the stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    if CONNS.insert(key, &*state, 0).is_err() {
        bump(counter::CONN_TABLE_FULL);
        return false;
    }
    if now {
        send_announcement(state, pid_tgid, fd);
    }
    true
}

/// Announces the connection of `state` to the agent before its first record, if not yet (the
/// framing in the kernel defers it: see `ConnState::announced`).
#[inline(always)]
pub(crate) fn announce(state: &mut ConnState, pid_tgid: u64, fd: u32) {
    if state.announced == 0 {
        state.announced = 1;
        send_announcement(state, pid_tgid, fd);
    }
}

/// The connection's `ConnRecord`. Lost when the ring is full; the agent then reads the same
/// facts from CONNS.
#[inline(always)]
fn send_announcement(state: &ConnState, pid_tgid: u64, fd: u32) {
    match EVENTS.reserve::<ConnRecord>(0) {
        Some(mut entry) => {
            let ts = state.conn_id;
            let rec = entry.as_mut_ptr();
            // SAFETY: a reserved record of the right size, filled field by field.
            unsafe {
                (*rec).header = header(kind::CONNECTION, pid_tgid, fd, ts, ts, ts);
                (*rec).tuple = state.tuple;
                (*rec).comm = state.comm;
                exe_name_into((*rec).exe.as_mut_ptr());
            }
            entry.submit(wake_flags(core::mem::size_of::<ConnRecord>() as u64));
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
}

/// `fd` was released (close, or replaced by dup2/dup3): forget it, and tell the agent if it
/// was a connection.
#[inline(always)]
pub(crate) fn on_close(pid_tgid: u64, fd: u32) -> u32 {
    let key = conn_key((pid_tgid >> 32) as u32, fd);
    let Some(state) = CONNS.get_ptr_mut(key) else {
        let _ = NOT_TCP.remove(key);
        return 0;
    };
    // Only the fields needed, read before the entry goes (not the whole ~140-byte state
    // copied out to the stack).
    // SAFETY: a map value pointer, valid for this run; the entry is removed after the reads.
    let (conn_id, muted, announced) = unsafe {
        if inject_enabled() {
            crate::inject::serving_ends(&mut *state);
        }
        if red_enabled() {
            crate::red::on_close(&mut *state, pid_tgid);
        }
        ((*state).conn_id, (*state).muted, (*state).announced)
    };
    let _ = CONNS.remove(key);
    if muted != 0 || announced == 0 {
        // Muted, or never announced: the agent holds nothing of it.
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<CloseRecord>(0) {
        Some(mut entry) => {
            unsafe {
                (*entry.as_mut_ptr()).header = header(kind::CLOSE, pid_tgid, fd, conn_id, now, now);
            }
            let flags = wake_flags(core::mem::size_of::<CloseRecord>() as u64);
            entry.submit(flags);
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
    0
}
