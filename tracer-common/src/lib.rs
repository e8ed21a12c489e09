//! Records exchanged between the kernel probes (`tracer-ebpf`) and the agent (`tracer-user`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so that both sides agree on the layout
//! byte for byte; `bool` is never used (its width is not a stable ABI), flags are `u32`.
#![no_std]

/// Bytes of payload one ring-buffer record can carry.
///
/// Enough for an HTTP/1.x request line plus typical headers; the rest of a message is counted
/// (its length travels in every record) but not copied. A power of two so the kernel side can
/// bound copies with a mask the verifier understands.
pub const MAX_CAPTURE: usize = 512;

/// Bytes of payload captured per *message* (a run of syscalls in one direction on one
/// connection), across as many records as it takes. Lets the agent reassemble headers that
/// arrive in several reads without copying whole bodies.
pub const MESSAGE_CAPTURE_BUDGET: u32 = 2048;

/// The ring buffer wakes the agent only once this many bytes are waiting, and again at each
/// multiple while the backlog grows; otherwise the agent drains on a timer. Waking per record
/// costs ~1 µs per syscall (see docs/ARCHITECTURE.md). A power of two.
pub const WAKEUP_THRESHOLD_BYTES: u64 = 256 * 1024;

/// The version of the records' layout, bumped whenever a record type changes. Recordings
/// (`tracer agent --record`) carry it, so a replay refuses another version's. A new kind alone
/// keeps it: older recordings do not have it, and an older agent counts it as undecodable.
pub const RECORD_LAYOUT: u32 = 5;

/// Direction of the data, seen from the traced process.
pub mod direction {
    /// Bytes the process received (read, recv*).
    pub const INGRESS: u32 = 1;
    /// Bytes the process sent (write, send*).
    pub const EGRESS: u32 = 2;
}

/// Record kinds; the first field of every record. Discriminants are never reused.
pub mod kind {
    pub const DATA: u32 = 1;
    pub const CLOSE: u32 = 2;
    pub const CONNECTION: u32 = 3;
    /// The probes inserted a `traceparent` header into the request a data record carries
    /// (`--inject-context`); comes right before that record.
    pub const INJECTED: u32 = 4;
    /// A [`RedRecord`]: what the agent needs of the HTTP/1 exchanges counted in the kernel.
    pub const RED: u32 = 5;
}

/// Which syscall produced a record (for debugging and statistics).
pub mod syscall {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const READV: u32 = 3;
    pub const WRITEV: u32 = 4;
    pub const RECVFROM: u32 = 5;
    pub const SENDTO: u32 = 6;
    pub const RECVMSG: u32 = 7;
    pub const SENDMSG: u32 = 8;
    pub const SENDFILE: u32 = 9;
    pub const SENDMMSG: u32 = 10;
    pub const RECVMMSG: u32 = 11;
    /// Plaintext from the TLS library (OpenSSL's `SSL_read`/`SSL_read_ex`, uprobes).
    pub const SSL_READ: u32 = 12;
    /// Plaintext to the TLS library (`SSL_write`/`SSL_write_ex`).
    pub const SSL_WRITE: u32 = 13;
}

/// Per-CPU counters the probes keep; the agent sums them over CPUs.
pub mod counter {
    /// A record could not be reserved in the ring buffer (the agent is behind): lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// A write's entry time was not seen (the thread moved to another CPU mid-call): its record
    /// carries the exit time as entry time. Not a loss; shows how often request starts are late.
    pub const ENTRY_TIME_MISSED: u32 = 1;
    /// The connection table refused an insert.
    pub const CONN_TABLE_FULL: u32 = 2;
    /// Reading the payload from user memory failed (page not resident): record sent without it.
    pub const PAYLOAD_READ_FAILED: u32 = 3;
    /// Data syscalls on tracked TCP connections seen.
    pub const DATA_SYSCALLS: u32 = 4;
    /// Records written to the ring buffer.
    pub const RECORDS_SENT: u32 = 5;
    /// `traceparent` headers inserted into outgoing requests (`--inject-context`).
    pub const CONTEXT_INJECTED: u32 = 6;
    /// New outgoing connections whose first message is not a whole HTTP/1 request head (another
    /// protocol, a head longer than the injector reads): left unchanged.
    pub const INJECT_NOT_HTTP: u32 = 7;
    /// Requests that already carried a `traceparent` (a proxy forwarding it): left alone.
    pub const INJECT_HEADER_PRESENT: u32 = 8;
    /// Inserting failed (the kernel refused to grow the message): sent unchanged.
    pub const INJECT_FAILED: u32 = 9;
    /// TLS plaintext dropped: the library's socket was never seen (its first call on this
    /// `SSL` object ran on another CPU than the syscall, or before the agent).
    pub const TLS_SOCKET_UNKNOWN: u32 = 10;
    /// TLS plaintext records sent.
    pub const TLS_RECORDS: u32 = 11;
    /// HTTP/1 exchanges counted in the kernel (`--metrics-only`), no record sent for them.
    pub const RED_COUNTED: u32 = 12;
    /// HTTP/1 connections counted in the kernel whose next message was not the HTTP/1 the
    /// framing expected: recorded for the agent from there on; a request whose response did not
    /// start as one is in neither count.
    pub const RED_GAVE_UP: u32 = 13;
    /// `--sample-in-kernel`: calls made while their process served kept and dropped requests
    /// at once, decided by the one request their thread serves,
    pub const CALLS_BY_THREAD: u32 = 14;
    /// by the one request in flight with their method and path,
    pub const CALLS_BY_LINE: u32 = 15;
    /// or neither: recorded and marked, linked by the agent only through a forwarded header.
    pub const CALLS_MARKED: u32 = 16;
    /// `--sample-in-kernel`: decisions written into a TCP option on a call's first segment,
    /// for its server end on another host,
    pub const DECISIONS_SENT: u32 = 17;
    /// and read from one on a request's first segment.
    pub const DECISIONS_RECEIVED: u32 = 18;
    pub const COUNT: u32 = 19;
}

/// A TCP connection's endpoints. IPv4 addresses use the first 4 bytes of the 16.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnTuple {
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// Fields every record starts with; the decoder reads `kind` at offset 0 before anything else.
///
/// Records are kept small: the lines the probes write into the ring are usually cold, and the
/// agent reads each one from another CPU. The connection's endpoints and process names (88
/// bytes) travel once, in a [`ConnRecord`], instead of in every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordHeader {
    pub kind: u32,
    pub tgid: u32,
    pub fd: u32,
    /// The thread that made the syscall: which request a thread was serving when it made a
    /// call elsewhere is how the agent links a server span to the client spans it causes.
    pub tid: u32,
    /// Unique per connection while the agent runs: the monotonic time the probes first saw it.
    pub conn_id: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at syscall entry and exit. Entry is stamped for writes
    /// (where a request starts); for every other record it equals `ts_exit`.
    pub ts_enter: u64,
    pub ts_exit: u64,
}

/// The probes started tracking a TCP connection. Precedes every other record of it in the
/// ring; if it was lost (ring full), the agent reads the same facts from the `CONNS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnRecord {
    pub header: RecordHeader,
    pub tuple: ConnTuple,
    /// The process's command name (its main thread's): the agent's fallback for a process that
    /// exited before it could read /proc (curl, short scripts).
    pub comm: [u8; 16],
    /// The file name of the process's executable (`mm->exe_file`), NUL-terminated, cut at
    /// `EXE_NAME_LEN - 1` bytes; empty if unreadable. With `comm`, it names an exited process as
    /// /proc would have: a venv's `python` link runs `python3.11`, a busybox applet `busybox`.
    pub exe: [u8; EXE_NAME_LEN],
}

/// Bytes of the executable's file name a [`ConnRecord`] carries.
pub const EXE_NAME_LEN: usize = 32;

/// Flags of a [`DataRecord`].
pub mod data_flags {
    /// `tcp_seq` holds the TCP sequence number of the record's first byte. Set on the first
    /// record of each message; the agent counts bytes from there for the rest of the message.
    pub const TCP_SEQ: u32 = 1;
    /// The payload is plaintext from the TLS library (`syscall::SSL_*`), not the socket's bytes;
    /// with `TCP_SEQ`, `tcp_seq` counts plaintext bytes in this direction since the connection
    /// began (both ends count the same bytes), not TCP sequence numbers.
    pub const TLS: u32 = 2;
    /// `--sample-in-kernel`: the probes framed this record's HTTP/1 exchange and counted it in
    /// the RED map; the agent does not count its span again.
    pub const RED_COUNTED: u32 = 4;
    /// `--sample-in-kernel`: the probes decided to keep this exchange (by its request's TCP
    /// sequence number, or because its process serves only kept requests): its span is
    /// exported whatever the agent's own rule says, and a trace it starts gets an id that rule
    /// keeps, so its other spans are kept too.
    pub const KEPT: u32 = 8;
    /// `--sample-in-kernel`: a call made while its process served kept and dropped requests
    /// at once; the agent links it only by a rule that requests it never saw cannot fool.
    pub const MARKED: u32 = 16;
    /// `--sample-in-kernel`: a call decided by the one request in flight in its process with
    /// the same method and path (a reverse proxy forwarding it), while its process served kept
    /// and dropped requests at once; the agent links it only to the request in flight with the
    /// same request line, if exactly one.
    pub const BY_LINE: u32 = 32;
    /// The flags of the probes' sampling decision.
    pub const DECIDED: u32 = RED_COUNTED | KEPT | MARKED | BY_LINE;
}

/// One data syscall on a tracked TCP connection. `captured` bytes of payload follow it in the
/// same ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataRecord {
    pub header: RecordHeader,
    /// Bytes the syscall moved (its return value).
    pub len: u64,
    /// `direction::*`.
    pub direction: u32,
    /// `syscall::*`.
    pub syscall: u32,
    /// Bytes of payload after the record (`<= MAX_CAPTURE`, `<= len`).
    pub captured: u32,
    /// Counts direction changes on the connection: records of one message share it.
    pub message_seq: u32,
    /// The TCP sequence number of the first byte this syscall moved (the sender's `write_seq`
    /// before it, the receiver's `copied_seq`): both ends of a connection see the same number
    /// for the same byte, which is how spans of one request are joined across hosts. Valid
    /// when `flags` has `data_flags::TCP_SEQ`.
    pub tcp_seq: u32,
    /// `data_flags::*`.
    pub flags: u32,
}

/// Length of the header line the probes insert: `traceparent: 00-<32 hex>-<16 hex>-01\r\n`.
pub const TRACEPARENT_LINE_LEN: usize = 70;

/// The probes inserted a `traceparent` line into the request whose first bytes the next data
/// record of the same connection carries. The ids are the W3C ones, as lowercase hex: the
/// agent gives the client span this span id and, where it can, this trace id, so that what a
/// downstream service does under the header lands in the same trace.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InjectedRecord {
    pub header: RecordHeader,
    pub trace_id_hex: [u8; 32],
    pub span_id_hex: [u8; 16],
    /// Where the line went, in the syscall's own bytes (after the request line).
    pub offset: u32,
    /// Bytes inserted (`TRACEPARENT_LINE_LEN`): the peer's stream, and its TCP sequence
    /// numbers, run this far ahead of what the process wrote.
    pub inserted: u32,
    /// `inject_flags::*`.
    pub flags: u32,
    pub _pad: u32,
}

/// Flags of an [`InjectedRecord`].
pub mod inject_flags {
    /// The trace id came from the request the writing thread was serving (its sole request in
    /// flight), so the server span and this client span share it.
    pub const FROM_SERVED_REQUEST: u32 = 1;
    /// The served request's own `traceparent` gave the trace id.
    pub const FROM_INCOMING_HEADER: u32 = 2;
}

/// The traced process closed a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseRecord {
    pub header: RecordHeader,
}

/// `--metrics-only`: HTTP/1 exchanges framed and counted in the kernel (see tracer-ebpf's
/// `red.rs`), by process, the server's port, role, method, status and a hash of the path.
pub mod red {
    /// `ConnState::red_phase`: not framed yet (every message recorded for the agent).
    pub const NEW: u32 = 0;
    /// A request is in progress (read or written, its response not started).
    pub const REQUEST: u32 = 1;
    /// Its response started: the exchange is counted, the next request is awaited.
    pub const RESPONSE: u32 = 2;
    /// Not HTTP/1 as the framing expects: every message recorded.
    pub const OFF: u32 = 3;
    /// An interim (1xx) response came: the request's body and the final response follow.
    pub const INTERIM: u32 = 4;

    /// `RedKey::role`.
    pub const SERVER: u8 = 1;
    pub const CLIENT: u8 = 2;

    /// `ConnState::red_ahead`: set beside a decision made at a write's entry.
    pub const AHEAD: u32 = 1 << 31;

    /// `ConnState::red_ahead`: where the counter of the rule that made the decision is kept
    /// (5 bits, 0 for none), counted when the write's exit takes the decision: a write that
    /// fails and is retried decides again at its next entry.
    pub const AHEAD_RULE_SHIFT: u32 = 24;

    /// The TCP option that carries a call's decision to its server end on another host
    /// (RFC 6994's shared experimental kind, this project's 16-bit id, the request's first
    /// sequence number and the `data_flags::DECIDED` flags, both big-endian).
    pub const OPTION_KIND: u8 = 254;
    pub const OPTION_LEN: u8 = 12;
    pub const OPTION_EXID: u16 = 0x7472;

    /// `RedKey::method`, 1-based; 0 is none. CONNECT is not framed (a tunnel follows).
    pub const METHODS: [&str; 8] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE",
    ];

    /// OpenTelemetry's advised HTTP duration boundaries (0.005 s ... 10 s), in ns: a duration
    /// falls in the first bucket whose bound it does not exceed, the last bucket past them all.
    pub const BOUNDS_NS: [u64; 14] = [
        5_000_000,
        10_000_000,
        25_000_000,
        50_000_000,
        75_000_000,
        100_000_000,
        250_000_000,
        500_000_000,
        750_000_000,
        1_000_000_000,
        2_500_000_000,
        5_000_000_000,
        7_500_000_000,
        10_000_000_000,
    ];

    /// Bytes of a request target the probes hash and send (past them, targets share a key).
    pub const PATH_LEN: usize = 96;

    /// `RedRecord::what`.
    pub const PATH: u32 = 1;
    pub const EXCHANGE: u32 = 2;
}

/// `--sample-in-kernel`: the framed HTTP/1 requests a process is serving (read, response not
/// started): kept, dropped, and recorded for the agent to decide on (their client's call was
/// marked); and whether it ever served anything the framing handed back to the agent (TLS,
/// HTTP/2, another protocol). A call the process makes follows these: see tracer-ebpf's
/// `red.rs`. Value of the probes' `SERVING` map, key the tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Serving {
    // 64 bits: the eBPF target's atomic adds are on 64-bit words.
    pub kept: u64,
    pub dropped: u64,
    pub undecided: u64,
    pub unframed: u64,
}

/// `ConnState::red_serving`.
pub mod serving {
    pub const NONE: u32 = 0;
    pub const KEPT: u32 = 1;
    pub const DROPPED: u32 = 2;
    pub const UNDECIDED: u32 = 3;
}

/// Key of the probes' `RED` map (and of a `RedRecord`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RedKey {
    pub tgid: u32,
    /// The server's port: the local one of a server end, the remote one of a client end.
    pub port: u16,
    /// `red::SERVER` or `red::CLIENT`.
    pub role: u8,
    /// `red::METHODS` index + 1.
    pub method: u8,
    /// The response's status code; 0 when the connection closed before one.
    pub status: u16,
    pub _pad: u16,
    /// FNV-1a of the request target up to `?`, `#`, a space or `red::PATH_LEN` bytes.
    pub path_hash: u32,
}

/// Value of the `RED` map, per CPU: a histogram of the exchanges' durations (`red::BOUNDS_NS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RedCounts {
    pub buckets: [u64; 15],
    pub sum_ns: u64,
}

/// A path the agent has not been told yet (`what` = `red::PATH`: `key`'s tgid and path hash
/// name it), or an exchange the `RED` map had no room for (`red::EXCHANGE`: counted by the
/// agent from `key` and `duration_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RedRecord {
    pub header: RecordHeader,
    pub key: RedKey,
    pub duration_ns: u64,
    pub what: u32,
    pub path_len: u32,
    pub path: [u8; red::PATH_LEN],
}

/// Kernel-side state of one tracked connection (value of the `CONNS` map, key `conn_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    // What every data syscall reads or writes comes first, next to the map entry's key: one
    // cache line to fetch instead of two.
    pub conn_id: u64,
    /// Direction of the message in progress (0 before the first byte).
    pub direction: u32,
    pub message_seq: u32,
    /// Payload bytes already captured from the message in progress.
    pub message_captured: u32,
    /// Set by the agent for connections it cannot parse: the probes then stop sending their data.
    pub muted: u32,
    /// A connected UDP socket (DNS): no TCP sequence numbers to read.
    pub datagram: u32,
    /// Came through accept: this process is the server (only tracked with `--inject-context`).
    pub accepted: u32,
    /// The thread counted as serving this connection's request in flight (0: none), so that
    /// the count drops on the thread that raised it (`--inject-context`'s per-thread count, or
    /// `--sample-in-kernel`'s: the two modes do not go together).
    pub serving_tid: u32,
    /// Tracked since connect or accept: every byte of it was seen.
    pub from_start: u32,
    /// Its `ConnRecord` was sent (or lost to a full ring). With the framing in the kernel
    /// (`--metrics-only`, `--sample-in-kernel`) a connection other than its process's first is
    /// announced before its first record only, so one whose exchanges were all counted in the
    /// kernel costs no announcement and no `CloseRecord`.
    pub announced: u32,
    /// `--metrics-only`: the HTTP/1 framing (`red::*` phase), the request in progress's role,
    /// method and path hash, and when it started.
    pub red_phase: u32,
    pub red_role: u32,
    pub red_method: u32,
    pub red_path_hash: u32,
    pub red_start_ns: u64,
    /// `--sample-in-kernel`: the exchange in progress's `data_flags::DECIDED` (0: dropped, no
    /// record sent), and whether its request counts in its process's `Serving` (`serving::*`).
    pub red_keep: u32,
    pub red_serving: u32,
    /// `--sample-in-kernel` with the decisions carried across hosts: a call's decision made at
    /// its write's entry, before its first segment leaves (`red::AHEAD` set, 0: none), and its
    /// request's first sequence number, which the write's exit takes it for.
    pub red_ahead: u32,
    pub red_ahead_seq: u32,
    /// The TLS library's plaintext on this connection, as a stream of its own: the direction of
    /// its message in progress, its message count and captured bytes, muted by the agent, and
    /// bytes per direction (`INGRESS`, `EGRESS`) since the connection began.
    pub tls_direction: u32,
    pub tls_message_seq: u32,
    pub tls_message_captured: u32,
    pub tls_muted: u32,
    pub tls_offset: [u32; 2],
    /// The kernel's `struct sock *`, to read the TCP sequence numbers at each message start.
    pub sk: u64,
    // The rest is for the agent, when a connection's `ConnRecord` was lost.
    pub tuple: ConnTuple,
    pub comm: [u8; 16],
}

/// Key of the `CONNS` map: one entry per (process, file descriptor).
#[inline(always)]
pub const fn conn_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// How many bytes of `struct socket` the probes read in one go (its `type` and `sk` are at 4
/// and 24 on every kernel since 2.6), and of `struct sock_common` from `skc_daddr` (IPv4
/// addresses, ports and family: 0 to 18). The agent refuses a kernel where they are not.
pub const SOCKET_HEAD: usize = 32;
pub const SOCK_HEAD: usize = 24;

/// Offsets into kernel structures, read by the agent from the running kernel's BTF and written
/// into the probes as a read-only global before loading. This is how the probes follow
/// `task -> files -> fdtable -> file -> socket -> sock` on any kernel without CO-RE support in
/// the Rust eBPF toolchain. All values are byte offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.pid` and `.tgid`: read through the task pointer the probes hold anyway,
    /// one helper call less than `bpf_get_current_pid_tgid` on every syscall.
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub file_private_data: u32,
    pub inode_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub sock_num: u32,
    pub sock_dport: u32,
    pub sock_rcv_saddr: u32,
    pub sock_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    /// `sock_common.skc_net` (a `struct net *`) and, in `struct net`, `ns.inum`: the socket's
    /// network namespace, to trace one namespace ("host") only.
    pub sock_net: u32,
    pub net_ns_inum: u32,
    /// `tcp_sock.write_seq` and `.copied_seq` (a TCP `struct sock *` is a `tcp_sock *`).
    pub tcp_write_seq: u32,
    pub tcp_copied_seq: u32,
    /// `task_struct.group_leader` and `.comm`: the process's name (its main thread's), for a
    /// process that exits before the agent reads /proc; a thread's own name (a runtime's worker,
    /// `event_engine`, `isc-net-0000`) is no service name.
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `task_struct.mm`, `mm_struct.exe_file`, `file.f_path.dentry` and
    /// `dentry.d_name.name`: the executable's file name, read once per new connection.
    pub task_mm: u32,
    pub mm_exe_file: u32,
    pub file_dentry: u32,
    pub dentry_name: u32,
    /// Non-zero once the agent has filled the table; the probes do nothing before that.
    pub valid: u32,
    pub _pad: u32,
}

impl KernelOffsets {
    pub const ZERO: KernelOffsets = KernelOffsets {
        task_pid: 0,
        task_tgid: 0,
        task_files: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_inode: 0,
        file_private_data: 0,
        inode_mode: 0,
        socket_type: 0,
        socket_sk: 0,
        sock_family: 0,
        sock_num: 0,
        sock_dport: 0,
        sock_rcv_saddr: 0,
        sock_daddr: 0,
        sock_v6_rcv_saddr: 0,
        sock_v6_daddr: 0,
        sock_net: 0,
        net_ns_inum: 0,
        tcp_write_seq: 0,
        tcp_copied_seq: 0,
        task_group_leader: 0,
        task_comm: 0,
        task_mm: 0,
        mm_exe_file: 0,
        file_dentry: 0,
        dentry_name: 0,
        valid: 0,
        _pad: 0,
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all fields are plain integers or arrays of them, with explicit padding.
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::RedKey {}
    unsafe impl aya::Pod for super::RedCounts {}
    unsafe impl aya::Pod for super::Serving {}
}
