//! The agent's CPU priority: out of the traced processes' way while it can afford it.
//!
//! A drain is a burst of a few milliseconds of CPU. On a small machine it often lands on the
//! CPU of a traced process that is about to wake, which then waits for the burst to end: with
//! the collector elsewhere, one nginx connection in a closed loop measured p99 1.7–2.0 ms traced
//! against 0.1 ms untraced. Under `SCHED_IDLE` the agent runs only when a CPU has nothing else
//! to do, and p99 fell to 0.26–0.31 ms (3 alternated runs) at the same agent CPU. But at
//! saturation no CPU is ever idle: an idle-only agent fell behind and the ring buffer dropped
//! most records.
//!
//! So the agent's threads run under `SCHED_IDLE` while the ring buffer has room, and at normal
//! priority while the probes' records pile up: a watchdog thread (normal priority, it sleeps
//! between checks) looks at the ring every 20 ms and switches the agent's threads to normal
//! priority when more than an eighth of the ring is waiting, and back once the drain has
//! brought it under a sixty-fourth. Nothing is dropped for it that a normal-priority agent
//! would have kept: at an eighth (1 MiB of the default 8), the ring still holds ~150 ms of
//! records at 20k requests/s. The default since it measured better or equal at every load
//! (README): one connection p99 1.3–1.8 ms -> 0.22–0.31 ms, saturation +6–13% requests, 10k
//! median and agent CPU slightly lower; 0 drops.
//!
//! While records trickle in (under ~5k requests/s) the watchdog does not poll: it waits for
//! the probes' own wake-up of the ring buffer (sent when 256 KiB are waiting), or 100 ms. A
//! wake-up costs ~30–60 µs of CPU on a VM whose idle CPUs halt, and 50 checks a second were
//! most of an idle agent's CPU.
use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracer_common::WAKEUP_THRESHOLD_BYTES;

use crate::ring::{quarter_wakeup_time, RingFill};

/// How often the watchdog looks at the ring. Every 5 ms, its own wake-ups (200 a second) cost
/// more than the idle priority saved: at 10k requests/s the median rose ~20 µs and the agent's
/// CPU ~8% against normal priority (5 alternated rounds); every 20 ms both were lower than at
/// normal priority (p50 341 -> 307 µs, 4.11 -> 3.91 µs, 5 rounds). In 20 ms at saturation the
/// probes fill ~1 MiB, an eighth of the default ring: the boost comes with most of it to spare.
/// A smaller ring (`--ring-buffer-mib`) is checked proportionally more often.
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// The ring size `CHECK_EVERY` is meant for.
const DEFAULT_RING_BYTES: u64 = 8 << 20;
/// The longest wait for the probes' wake-up while records trickle in. The wake-up is the signal;
/// this bounds what a wake-up lost to a race between CPUs (see the probes' `wake_flags`) costs.
const QUIET_WAIT: Duration = Duration::from_millis(100);

/// Waits for the ring buffer's wake-ups: one event per wake-up the probes send (edge
/// triggered, so records waiting do not keep it ready).
pub struct RingWakeups {
    epoll: OwnedFd,
}

impl RingWakeups {
    pub fn new(ring: BorrowedFd<'_>) -> std::io::Result<Self> {
        // SAFETY: epoll_create1 has no preconditions; the fd it returns is ours.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: both fds are open; epoll_ctl reads `event`.
        let added = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                ring.as_raw_fd(),
                &mut event,
            )
        };
        if added != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RingWakeups { epoll })
    }

    /// Returns at the next wake-up (or at once, for one sent since the last call), or after
    /// `timeout`.
    fn wait(&self, timeout: Duration) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one event's room for epoll_wait to write.
        unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                &mut event,
                1,
                timeout.as_millis() as libc::c_int,
            )
        };
    }
}

/// How often to look at a ring of `size` bytes: as often, relative to its size, as the default
/// ring is every `CHECK_EVERY`, but no more than every 2 ms.
fn check_period(size: u64) -> Duration {
    let scaled = CHECK_EVERY.as_micros() as u64 * size / DEFAULT_RING_BYTES;
    Duration::from_micros(scaled.clamp(2_000, CHECK_EVERY.as_micros() as u64))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Policy {
    /// Runs only on otherwise idle CPU time.
    Idle,
    /// `SCHED_OTHER`, at the nice value the agent was started with.
    Normal,
}

/// Sets the scheduling policy of thread `tid` (0: the caller). The legacy call keeps the
/// thread's nice value.
fn set_policy(tid: libc::pid_t, policy: Policy) -> std::io::Result<()> {
    let policy = match policy {
        Policy::Idle => libc::SCHED_IDLE,
        Policy::Normal => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the sched_param we pass.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Whether this process may move a thread out of `SCHED_IDLE` again (root or CAP_SYS_NICE, or
/// an RLIMIT_NICE that allows it), tried on a scratch thread: the agent's own thread must
/// never be left idle-only.
fn can_leave_idle() -> Result<(), String> {
    std::thread::spawn(|| {
        // SAFETY: sched_getscheduler has no preconditions.
        let policy = unsafe { libc::sched_getscheduler(0) };
        if policy != libc::SCHED_OTHER {
            return Err(format!(
                "the agent runs under scheduling policy {policy}, not SCHED_OTHER"
            ));
        }
        set_policy(0, Policy::Idle).map_err(|e| format!("cannot use SCHED_IDLE: {e}"))?;
        set_policy(0, Policy::Normal)
            .map_err(|e| format!("cannot leave SCHED_IDLE (no CAP_SYS_NICE): {e}"))
    })
    .join()
    .unwrap_or_else(|_| Err("the check panicked".into()))
}

/// The watchdog of the calling thread's priority; stops (leaving the thread at normal
/// priority) when dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Puts the process's threads (all but the watchdog's own) under the watchdog: idle-only
/// while `fill` shows room. `on_boost` is called at each switch to normal priority. Returns
/// why not when this process may not switch back and forth.
pub fn watch(
    fill: RingFill,
    wakeups: RingWakeups,
    on_boost: impl Fn() + Send + 'static,
) -> Result<Watchdog, String> {
    let size = fill.size();
    let ring = RingSignals {
        unread: Box::new({
            let fill = fill.clone();
            move || fill.unread()
        }),
        produced: Box::new(move || fill.produced()),
        wait: Box::new(move |timeout| wakeups.wait(timeout)),
    };
    watch_level(size, ring, on_boost)
}

/// What the watchdog needs of the ring (a trait object so that the tests can stand in for it).
struct RingSignals {
    /// Bytes waiting for the drain.
    unread: Box<dyn Fn() -> u64 + Send>,
    /// Bytes written in all.
    produced: Box<dyn Fn() -> u64 + Send>,
    /// Returns at the probes' next wake-up, or after the timeout.
    wait: Box<dyn Fn(Duration) + Send>,
}

/// [`watch`] on any `ring` of `size` bytes.
fn watch_level(
    size: u64,
    ring: RingSignals,
    on_boost: impl Fn() + Send + 'static,
) -> Result<Watchdog, String> {
    can_leave_idle()?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("priority".into())
        .spawn({
            let stop = stop.clone();
            move || watchdog(size, &ring, &on_boost, &stop)
        })
        .map_err(|e| format!("cannot start the priority watchdog: {e}"))?;
    Ok(Watchdog {
        stop,
        thread: Some(thread),
    })
}

/// Sets `policy` on every thread of the process but the caller: the drain's, and any the
/// runtime started (a name lookup for the exporter must not wait for idle CPU either).
fn set_process_policy(policy: Policy) -> std::io::Result<()> {
    let me = current_tid();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let tid = entry?.file_name().to_string_lossy().parse::<libc::pid_t>();
        match tid {
            Ok(tid) if tid != me => match set_policy(tid, policy) {
                // A thread that has just ended.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                other => other?,
            },
            _ => {}
        }
    }
    Ok(())
}

fn watchdog(size: u64, ring: &RingSignals, on_boost: &dyn Fn(), stop: &AtomicBool) {
    let (boost_at, relax_at) = (size / 8, size / 64);
    let period = check_period(size);
    let mut policy = Policy::Normal;
    let (mut last_produced, mut last_check) = ((ring.produced)(), Instant::now());
    while !stop.load(Relaxed) {
        let unread = (ring.unread)();
        let want = match policy {
            Policy::Idle if unread >= boost_at => Policy::Normal,
            Policy::Normal if unread <= relax_at => Policy::Idle,
            same => same,
        };
        if want != policy {
            match set_process_policy(want) {
                Ok(()) => {
                    if want == Policy::Normal {
                        on_boost();
                    }
                    policy = want;
                }
                Err(e) => {
                    // Checked at the start, so unexpected: get back to normal priority and
                    // stop adapting.
                    log::warn!("changing the agent's priority failed ({e}); it stays normal");
                    let _ = set_process_policy(Policy::Normal);
                    return;
                }
            }
        }
        // Records trickle in when less than a quarter of the wake-up threshold arrives per
        // period. Then, with the backlog under the threshold, the probes will wake the ring
        // before it reaches it: wait for that instead of polling. Above the threshold the
        // wake-up has been sent already (the drain may be starved): poll.
        let produced = (ring.produced)();
        let trickle = quarter_wakeup_time(produced - last_produced, last_check.elapsed()) > period;
        (last_produced, last_check) = (produced, Instant::now());
        if policy == Policy::Idle && trickle && unread < WAKEUP_THRESHOLD_BYTES {
            (ring.wait)(QUIET_WAIT);
        } else {
            std::thread::sleep(period);
        }
    }
    let _ = set_process_policy(Policy::Normal);
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::AtomicU64,
        time::{Duration, Instant},
    };

    use super::*;

    fn policy_of(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: sched_getscheduler has no preconditions.
        unsafe { libc::sched_getscheduler(tid) }
    }

    #[test]
    fn smaller_rings_are_checked_more_often() {
        assert_eq!(check_period(8 << 20), Duration::from_millis(20));
        assert_eq!(check_period(64 << 20), Duration::from_millis(20));
        assert_eq!(check_period(2 << 20), Duration::from_millis(5));
        assert_eq!(check_period(64_000), Duration::from_millis(2));
    }

    /// A watchdog sets the policy of every thread of the process: one test at a time.
    fn lock_policies() -> std::sync::MutexGuard<'static, ()> {
        static POLICIES: std::sync::Mutex<()> = std::sync::Mutex::new(());
        POLICIES.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to a second for `cond`.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// The real system calls on this kernel: a thread of the process goes idle-only while the
    /// backlog is small, back to normal above an eighth, idle again under a sixty-fourth, and
    /// normal for good when the watchdog stops.
    #[test]
    fn threads_go_idle_with_room_and_normal_when_records_pile_up() {
        let _one_at_a_time = lock_policies();
        let level = Arc::new(AtomicU64::new(0));
        let boosts = Arc::new(AtomicU64::new(0));
        let me = current_tid();
        let ring = RingSignals {
            unread: Box::new({
                let level = level.clone();
                move || level.load(Relaxed)
            }),
            produced: Box::new(|| 0),
            wait: Box::new(std::thread::sleep),
        };
        let watchdog = watch_level(64_000, ring, {
            let boosts = boosts.clone();
            move || {
                boosts.fetch_add(1, Relaxed);
            }
        })
        .expect("root may switch policies");
        assert!(eventually(|| policy_of(me) == libc::SCHED_IDLE));
        // Between the thresholds nothing changes.
        level.store(4_000, Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(policy_of(me), libc::SCHED_IDLE);
        level.store(8_000, Relaxed);
        assert!(eventually(|| policy_of(me) == libc::SCHED_OTHER));
        assert_eq!(boosts.load(Relaxed), 1);
        level.store(4_000, Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(policy_of(me), libc::SCHED_OTHER);
        level.store(1_000, Relaxed);
        assert!(eventually(|| policy_of(me) == libc::SCHED_IDLE));
        drop(watchdog);
        assert_eq!(policy_of(me), libc::SCHED_OTHER);
    }

    /// While records trickle in, the watchdog waits for the probes' wake-ups instead of polling;
    /// while they pour in, it polls (a wake-up has no bound on how late it may come then).
    #[test]
    fn the_watchdog_waits_for_wake_ups_only_while_records_trickle_in() {
        let _one_at_a_time = lock_policies();
        let produced = Arc::new(AtomicU64::new(0));
        let waits = Arc::new(AtomicU64::new(0));
        let ring = RingSignals {
            unread: Box::new(|| 0),
            produced: Box::new({
                let produced = produced.clone();
                move || produced.load(Relaxed)
            }),
            wait: Box::new({
                let waits = waits.clone();
                move |timeout| {
                    waits.fetch_add(1, Relaxed);
                    std::thread::sleep(timeout.min(Duration::from_millis(5)));
                }
            }),
        };
        let watchdog = watch_level(8 << 20, ring, || {}).expect("root may switch policies");
        assert!(eventually(|| waits.load(Relaxed) >= 3), "quiet: it waits");
        // 1 MiB a millisecond: far above a quarter of the wake-up threshold per 20 ms period.
        let pouring = Arc::new(AtomicBool::new(true));
        let feeder = std::thread::spawn({
            let (produced, pouring) = (produced.clone(), pouring.clone());
            move || {
                while pouring.load(Relaxed) {
                    produced.fetch_add(1 << 20, Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let before = waits.load(Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(waits.load(Relaxed), before, "pouring: it polls");
        pouring.store(false, Relaxed);
        feeder.join().unwrap();
        assert!(
            eventually(|| waits.load(Relaxed) > before),
            "quiet again: it waits"
        );
        drop(watchdog);
    }
}
