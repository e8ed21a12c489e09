//! Reading the probes' BPF ring buffer, in batches.
//!
//! aya's `RingBuf` publishes the consumer position after every record and re-reads the
//! producer position whenever it catches up. Both positions live on cache lines that the
//! probes touch on every record they reserve (the kernel checks for free space against the
//! consumer position), so each publish moved a line between CPUs twice: measured at 10k
//! requests/s, ~370 ns of the probes' time per record went to the ring buffer. This reader
//! reads the producer position once per batch and publishes the consumer position once per
//! batch (and every quarter of the ring within a long one, so the probes get room back).
//!
//! Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (mapped read-write),
//! page 1 the producer position, then the data pages, mapped twice in a row so a record that
//! wraps around the end reads as one slice. Each record starts with an 8-byte header: its
//! length with a busy bit (not committed yet) and a discard bit, then the page offset.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::MapData;
use tracer_common::WAKEUP_THRESHOLD_BYTES;

/// How long, at the rate of `bytes` written in `elapsed`, the probes take to write a quarter of
/// what makes them wake the agent (`WAKEUP_THRESHOLD_BYTES`); `Duration::MAX` when nothing was
/// written. Past a period of the agent's own timer, records "trickle in": the drain timer
/// waits that long (`agent::next_drain_wait`), and the priority watchdog waits for the
/// probes' wake-ups instead of polling.
pub fn quarter_wakeup_time(bytes: u64, elapsed: Duration) -> Duration {
    if bytes == 0 {
        return Duration::MAX;
    }
    let secs = (WAKEUP_THRESHOLD_BYTES / 4) as f64 * elapsed.as_secs_f64() / bytes as f64;
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: u64 = 8;

pub struct Ring {
    /// Keeps the map (and its fd) open as long as the mappings.
    map: MapData,
    consumer: Arc<Mapping>,
    producer: Arc<Mapping>,
    /// Where the data pages start in `producer`.
    data_offset: usize,
    /// Ring size in bytes (a power of two): positions are taken modulo it.
    size: u64,
    /// The consumer position as far as this reader has read.
    pos: u64,
}

/// A memory mapping of the ring buffer map, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> anyhow::Result<Self> {
        // SAFETY: a fresh shared mapping of a map fd; the kernel checks prot and length against
        // what a ring buffer allows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the ring buffer");
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).context("mmap returned null")?,
            len,
        })
    }
}

// SAFETY: the mapping is plain shared memory; every access to it goes through atomics or
// through the one `Ring` that reads the records.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the region mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Ring {
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let size = u64::from(
            map.info()
                .context("reading the ring buffer's size")?
                .max_entries(),
        );
        anyhow::ensure!(
            size.is_power_of_two(),
            "ring buffer size {size} is not a power of two"
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Arc::new(Mapping::new(
            fd,
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            0,
        )?);
        let producer = Arc::new(Mapping::new(
            fd,
            page + 2 * size as usize,
            libc::PROT_READ,
            page,
        )?);
        let mut ring = Ring {
            map,
            consumer,
            producer,
            data_offset: page,
            size,
            pos: 0,
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        self.consumer.first_word()
    }

    fn producer_pos(&self) -> &AtomicU64 {
        self.producer.first_word()
    }

    /// A view of how full the ring is, for another thread.
    pub fn fill(&self) -> RingFill {
        RingFill {
            consumer: self.consumer.clone(),
            producer: self.producer.clone(),
            size: self.size,
        }
    }

    /// Hands every committed record to `f`, in order, and returns how many there were. Stops at
    /// the first record still being written (the next drain picks it up) and after one ring's
    /// worth of bytes, so a producer faster than `f` cannot keep the caller here forever.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let start = self.pos;
        let mut published = self.pos;
        let mut records = 0;
        // SAFETY: the data pages follow the producer page; twice `size` bytes are mapped.
        let data = unsafe { self.producer.ptr.as_ptr().add(self.data_offset) };
        'batch: loop {
            let end = self.producer_pos().load(Ordering::Acquire);
            if end == self.pos {
                break;
            }
            while self.pos != end {
                let at = (self.pos & (self.size - 1)) as usize;
                // SAFETY: `at` is within the first mapping of the data pages; record headers
                // are 8-byte aligned; the kernel commits a header with a release store.
                let header = unsafe { (*data.add(at).cast::<AtomicU32>()).load(Ordering::Acquire) };
                if header & BUSY_BIT != 0 {
                    break 'batch;
                }
                let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
                let step = (HEADER_BYTES + len).next_multiple_of(8);
                prefetch(data, at + PREFETCH_AHEAD, step as usize);
                if header & DISCARD_BIT == 0 {
                    // SAFETY: a committed record of `len` bytes after its header; the double
                    // mapping makes it contiguous even across the end of the ring, and the
                    // kernel does not reuse it before the consumer position passes it.
                    let record = unsafe {
                        std::slice::from_raw_parts(
                            data.add(at + HEADER_BYTES as usize),
                            len as usize,
                        )
                    };
                    f(record);
                    records += 1;
                }
                self.pos += step;
                if self.pos - published >= self.size / 4 {
                    self.consumer_pos().store(self.pos, Ordering::Release);
                    published = self.pos;
                }
            }
            if self.pos - start >= self.size {
                break;
            }
        }
        if self.pos != published {
            self.consumer_pos().store(self.pos, Ordering::Release);
        }
        records
    }
}

/// How far ahead of the record being handled the drain asks for the ring's bytes. The records
/// were written by the probes on whichever CPU made the syscall, so the first read of each one
/// (head parsing) missed the cache. Asking a few records ahead overlaps those waits with
/// handling the records before; measured at 10k requests/s, 5 alternated rounds: agent CPU a
/// request 5.55 -> 5.27 µs, lower in every round. Asking for the next record only (an earlier
/// session) measured nothing: it comes too late.
const PREFETCH_AHEAD: usize = 2048;

/// Asks the CPU to start loading `len` bytes at `data + from` into its cache. A hint: it
/// neither faults nor changes anything the program can see.
#[inline(always)]
fn prefetch(data: *const u8, from: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut line = from & !63;
        while line < from + len {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch(data.wrapping_add(line).cast(), _MM_HINT_T0) };
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, from, len);
}

impl Mapping {
    /// The position word at the start of the consumer or producer page.
    fn first_word(&self) -> &AtomicU64 {
        // SAFETY: the first word of a mapped page, aligned, alive as long as `self`.
        unsafe { self.ptr.cast::<AtomicU64>().as_ref() }
    }
}

/// How many bytes the probes have written that the agent has not yet released: read from the
/// ring's position pages, which outlive the `Ring` as long as this is held.
#[derive(Clone)]
pub struct RingFill {
    consumer: Arc<Mapping>,
    producer: Arc<Mapping>,
    size: u64,
}

impl RingFill {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes written and not released (the drain releases them every quarter ring and at its
    /// end, so this can run ahead of what is really left by up to a quarter).
    pub fn unread(&self) -> u64 {
        let consumer = self.consumer.first_word().load(Ordering::Acquire);
        let producer = self.producer.first_word().load(Ordering::Acquire);
        producer.saturating_sub(consumer)
    }

    /// Bytes the probes have written since the ring was created.
    pub fn produced(&self) -> u64 {
        self.producer.first_word().load(Ordering::Acquire)
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}
