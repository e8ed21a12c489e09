//! `--metrics-only`: the HTTP/1 exchanges the probes count in the kernel (tracer-ebpf's
//! `red.rs`), read into the agent's histograms (`red.rs` here).
//!
//! The probes keep cumulative per-CPU histograms keyed by process, the server's port, role,
//! method, status and a hash of the path; the agent reads them every second, adds what grew
//! since its last read, and names each key's route from the path the probes sent once (a
//! `RedRecord`). The filters (`--port`, `--exe`...) apply to the keys as they are read: the
//! probes count before the agent has seen a connection's announcement.
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use tracer_common::{red, RedCounts, RedKey, RedRecord, Serving};

/// Counts of one key that grew since the last read, with what names them.
pub struct Growth<'a> {
    pub key: RedKey,
    /// The request target the probes hashed; empty if its record was lost (ring full).
    pub path: &'a str,
    pub counts: RedCounts,
}

/// What the agent keeps of the kernel's counts: their last sums, and the paths.
#[derive(Default)]
pub struct Tally {
    last: HashMap<RedKey, RedCounts>,
    paths: HashMap<(u32, u32), String>,
}

/// Paths kept at most (as many as the probes' `PATHS` remembers): a service with ids in its
/// paths sends a new one for every id. Past it, the paths no key in the probes' table uses are
/// forgotten here and there (the probes send one again when it is next used).
pub const MAX_PATHS: usize = 16384;

impl Tally {
    /// A path the probes sent (`red::PATH`); past `MAX_PATHS`, returns the paths forgotten to
    /// make room, as `PATHS` keys.
    pub fn learn(&mut self, rec: &RedRecord) -> Vec<u64> {
        let n = (rec.path_len as usize).min(rec.path.len());
        let path = String::from_utf8_lossy(&rec.path[..n]).into_owned();
        self.paths.insert((rec.key.tgid, rec.key.path_hash), path);
        if self.paths.len() <= MAX_PATHS {
            return Vec::new();
        }
        let used: std::collections::HashSet<(u32, u32)> =
            self.last.keys().map(|k| (k.tgid, k.path_hash)).collect();
        let mut forgotten = Vec::new();
        let newest = (rec.key.tgid, rec.key.path_hash);
        self.paths.retain(|&(tgid, hash), _| {
            let keep = used.contains(&(tgid, hash)) || (tgid, hash) == newest;
            if !keep {
                forgotten.push((u64::from(tgid) << 32) | u64::from(hash));
            }
            keep
        });
        forgotten
    }

    /// The path of `key`, if known.
    pub fn path(&self, key: &RedKey) -> &str {
        self.paths
            .get(&(key.tgid, key.path_hash))
            .map_or("", String::as_str)
    }

    /// `now` is a key's cumulative sum: what grew since the last one, if anything.
    pub fn grown(&mut self, key: RedKey, now: RedCounts) -> Option<Growth<'_>> {
        let before = self.last.insert(key, now).unwrap_or_default();
        let mut counts = RedCounts::default();
        let mut any = false;
        for ((d, n), b) in counts
            .buckets
            .iter_mut()
            .zip(now.buckets)
            .zip(before.buckets)
        {
            *d = n.saturating_sub(b);
            any |= *d > 0;
        }
        counts.sum_ns = now.sum_ns.saturating_sub(before.sum_ns);
        any.then(|| Growth {
            key,
            path: self.path(&key),
            counts,
        })
    }

    /// Forgets the keys and paths of processes that ended (`alive` says which live); returns
    /// them, as the probes' `RED` keys and `PATHS` keys (`tgid << 32 | hash`).
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) -> (Vec<RedKey>, Vec<u64>) {
        let gone: Vec<RedKey> = self
            .last
            .keys()
            .filter(|k| !alive(k.tgid))
            .copied()
            .collect();
        for k in &gone {
            self.last.remove(k);
        }
        let mut paths = Vec::new();
        self.paths.retain(|(tgid, hash), _| {
            let keep = alive(*tgid);
            if !keep {
                paths.push((u64::from(*tgid) << 32) | u64::from(*hash));
            }
            keep
        });
        (gone, paths)
    }
}

/// The probes' maps for `--metrics-only` and `--sample-in-kernel`.
pub struct KernelRed {
    counts: PerCpuHashMap<MapData, RedKey, RedCounts>,
    /// The paths the probes have sent, by `tgid << 32 | hash`: forgotten with their process,
    /// or a new process given the same pid would never send its own.
    sent_paths: BpfHashMap<MapData, u64, u8>,
    /// `--sample-in-kernel`: the requests each process serves, by tgid (forgotten with it).
    serving: BpfHashMap<MapData, u32, Serving>,
    pub tally: Tally,
}

impl KernelRed {
    pub fn new(
        counts: PerCpuHashMap<MapData, RedKey, RedCounts>,
        sent_paths: BpfHashMap<MapData, u64, u8>,
        serving: BpfHashMap<MapData, u32, Serving>,
    ) -> Self {
        KernelRed {
            counts,
            sent_paths,
            serving,
            tally: Tally::default(),
        }
    }

    /// A path the probes sent: kept, and room made past `MAX_PATHS`.
    pub fn learn(&mut self, rec: &RedRecord) {
        for path in self.tally.learn(rec) {
            let _ = self.sent_paths.remove(&path);
        }
    }

    /// Reads every key's sums over CPUs and hands on what grew.
    pub fn read(&mut self, mut f: impl FnMut(&Growth<'_>)) {
        let keys: Vec<RedKey> = self.counts.keys().filter_map(Result::ok).collect();
        for key in keys {
            let Ok(per_cpu) = self.counts.get(&key, 0) else {
                continue;
            };
            let mut sum = RedCounts::default();
            for c in per_cpu.iter() {
                for (s, n) in sum.buckets.iter_mut().zip(c.buckets) {
                    *s += n;
                }
                sum.sum_ns += c.sum_ns;
            }
            if let Some(g) = self.tally.grown(key, sum) {
                f(&g);
            }
        }
    }

    /// After a `read`: drops the keys of processes that ended, here and in the probes.
    pub fn forget_ended(&mut self) {
        let alive = |tgid: u32| std::path::Path::new(&format!("/proc/{tgid}")).exists();
        let (keys, paths) = self.tally.retain(alive);
        for key in keys {
            let _ = self.counts.remove(&key);
        }
        for path in paths {
            let _ = self.sent_paths.remove(&path);
        }
        let ended: Vec<u32> = (self.serving.keys().filter_map(Result::ok))
            .filter(|&tgid| !alive(tgid))
            .collect();
        for tgid in ended {
            let _ = self.serving.remove(&tgid);
        }
    }
}

/// The span name a key's exchanges would have had: `METHOD /route`.
pub fn name_into(key: &RedKey, path: &str, out: &mut String) {
    out.clear();
    let method = red::METHODS
        .get(usize::from(key.method).wrapping_sub(1))
        .copied()
        .unwrap_or("_OTHER");
    out.push_str(method);
    out.push(' ');
    let path = crate::protocol::http::head::target_path(path.as_bytes());
    crate::protocol::http::path_template_into(&String::from_utf8_lossy(path), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(status: u16) -> RedKey {
        RedKey {
            tgid: 42,
            port: 8080,
            role: red::SERVER,
            method: 1,
            status,
            _pad: 0,
            path_hash: 7,
        }
    }

    /// Each read hands on only what grew since the last, by bucket and sum.
    #[test]
    fn growth_is_the_difference_of_sums() {
        let mut tally = Tally::default();
        let mut now = RedCounts::default();
        now.buckets[0] = 3;
        now.sum_ns = 300;
        let g = tally.grown(key(200), now).unwrap();
        assert_eq!((g.counts.buckets[0], g.counts.sum_ns), (3, 300));
        assert!(tally.grown(key(200), now).is_none(), "nothing grew");
        now.buckets[0] = 4;
        now.buckets[14] = 1;
        now.sum_ns = 20_000_000_400;
        let g = tally.grown(key(200), now).unwrap();
        assert_eq!(g.counts.buckets[0], 1);
        assert_eq!(g.counts.buckets[14], 1);
        assert_eq!(g.counts.sum_ns, 20_000_000_100);
        // Another status is another key.
        assert_eq!(tally.grown(key(404), now).unwrap().counts.buckets[0], 4);
    }

    /// Paths are named by process and hash; ended processes are forgotten.
    #[test]
    fn paths_name_keys_until_their_process_ends() {
        let mut tally = Tally::default();
        let mut rec = RedRecord {
            header: Default::default(),
            key: key(0),
            duration_ns: 0,
            what: red::PATH,
            path_len: 7,
            path: [b'x'; red::PATH_LEN],
        };
        rec.path[..7].copy_from_slice(b"/users/");
        assert!(tally.learn(&rec).is_empty());
        let mut c = RedCounts::default();
        c.buckets[1] = 1;
        assert_eq!(tally.grown(key(200), c).unwrap().path, "/users/");
        let mut name = String::new();
        name_into(&key(200), "/users/12345", &mut name);
        assert!(name.starts_with("GET /users/"), "{name}");
        assert_eq!(
            tally.retain(|_| false),
            (vec![key(200)], vec![(42 << 32) | 7])
        );
        assert_eq!(tally.path(&key(200)), "");
    }

    /// Past `MAX_PATHS`, the paths no counted key uses are forgotten, the newest kept.
    #[test]
    fn paths_are_bounded() {
        let mut tally = Tally::default();
        let mut c = RedCounts::default();
        c.buckets[0] = 1;
        tally.grown(key(200), c);
        let mut rec = RedRecord {
            header: Default::default(),
            key: key(0),
            duration_ns: 0,
            what: red::PATH,
            path_len: 2,
            path: [b'/'; red::PATH_LEN],
        };
        let mut forgotten = 0;
        // MAX_PATHS + 1 paths, the used one (hash 7) among them.
        for hash in 0..=MAX_PATHS as u32 {
            rec.key.path_hash = hash;
            forgotten += tally.learn(&rec).len();
        }
        assert_eq!(forgotten, MAX_PATHS - 1);
        assert_eq!(tally.paths.len(), 2, "the used path and the newest");
        assert_eq!(tally.path(&key(200)), "//");
    }
}
