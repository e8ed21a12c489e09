//! The small interned tables (strings, services, operations, resources), mirrored in memory.
//!
//! Writers resolve names to ids here without touching SQLite, so encoding runs on the calling
//! threads in parallel. New ids are handed out in memory and stay *pending* until the group
//! commit that first needs them writes them, in the same transaction as the spans that use them:
//! a committed span never references an id that is not committed. This relies on one process
//! owning the database, which the store's lock file guarantees.
use std::{collections::HashMap, sync::Arc};

use foldhash::HashMap as FastMap;

use rusqlite::{params, Connection};

use super::codec::{Interner, Strings, MAX_INTERNED_LEN};
use crate::StoreError;

/// Dictionary entries at most: past this, new strings stay inline (a flood of distinct keys
/// must not grow memory without bound).
const MAX_STRINGS: usize = 100_000;
/// Resource blobs remembered for deduplication; beyond this the cache starts over, which only
/// means a resource may be stored twice.
const MAX_CACHED_RESOURCES: usize = 20_000;
/// Distinct operation names a service (and span kind) may have. Names come from whoever reaches
/// a traced server (a path the templating keeps, `/abc/def/xyz`): 20,000 were all kept, listed
/// and loaded at every start. Past the cap, new names go to one overflow operation.
pub(super) const MAX_OPERATIONS_PER_SERVICE: usize = 1000;
/// The overflow operation's name.
pub(super) const OVERFLOW_OPERATION: &str = "(other operations)";

#[derive(Default)]
pub(super) struct Catalog {
    strings: FastMap<Arc<str>, u32>,
    /// `by_id[id - 1]`.
    by_id: Vec<Arc<str>>,
    services: FastMap<String, i64>,
    /// (service id, kind) -> name -> operation id.
    operations: FastMap<(i64, i32), FastMap<String, i64>>,
    /// Every operation id in `operations`, committed or pending.
    operation_ids: foldhash::HashSet<i64>,
    /// Counts the prunings of operations (see [`Catalog::prune_operations`]): a batch encoded
    /// under an older epoch may name an operation that is gone.
    epoch: u64,
    resources: FastMap<Vec<u8>, i64>,
    next_service: i64,
    next_operation: i64,
    next_resource: i64,
    pending: Pending,
    /// Spans stored under `OVERFLOW_OPERATION` because their service was full.
    pub operations_overflowed: std::sync::atomic::AtomicU64,
}

/// Ids handed out but not committed yet, in allocation order.
#[derive(Clone, Default)]
pub(super) struct Pending {
    pub strings: Vec<(u32, Arc<str>)>,
    pub services: Vec<(i64, String)>,
    pub operations: Vec<(i64, i64, String, i32)>,
    pub resources: Vec<(i64, Vec<u8>)>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
            && self.services.is_empty()
            && self.operations.is_empty()
            && self.resources.is_empty()
    }

    /// Writes the entries; part of the caller's transaction.
    pub fn persist(&self, tx: &Connection) -> rusqlite::Result<()> {
        for (id, s) in &self.strings {
            tx.prepare_cached("INSERT INTO strings(id, value) VALUES (?1, ?2)")?
                .execute(params![id, &**s])?;
        }
        for (id, name) in &self.services {
            tx.prepare_cached("INSERT INTO services(id, name) VALUES (?1, ?2)")?
                .execute(params![id, name])?;
        }
        for (id, svc, name, kind) in &self.operations {
            tx.prepare_cached(
                "INSERT INTO operations(id, service_id, name, kind) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id, svc, name, kind])?;
        }
        for (id, blob) in &self.resources {
            tx.prepare_cached("INSERT INTO resources(id, attributes) VALUES (?1, ?2)")?
                .execute(params![id, blob])?;
        }
        Ok(())
    }
}

/// What an encoding pass could not resolve.
#[derive(Default)]
pub(super) struct Missing {
    pub strings: Vec<String>,
    pub services: Vec<String>,
    pub operations: Vec<(i64, String, i32)>,
    pub resources: Vec<Vec<u8>>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
            && self.services.is_empty()
            && self.operations.is_empty()
            && self.resources.is_empty()
    }
}

impl Catalog {
    pub fn load(conn: &Connection) -> Result<Catalog, StoreError> {
        Catalog::read(conn)
            .map_err(|e| StoreError::Database(format!("loading the dictionaries: {e}")))
    }

    fn read(conn: &Connection) -> Result<Catalog, String> {
        let sql = |e: rusqlite::Error| e.to_string();
        let mut c = Catalog::default();
        let mut st = conn
            .prepare("SELECT id, value FROM strings ORDER BY id")
            .map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let id: u32 = r.get(0).map_err(sql)?;
            let s: Arc<str> = Arc::from(r.get::<_, String>(1).map_err(sql)?);
            // Ids are dense from 1 (only this module writes them); anything else is corruption
            // that decoding reports as an unknown id rather than a misread string.
            if id as usize != c.by_id.len() + 1 {
                return Err(format!(
                    "string id {id} breaks the sequence (corrupt dictionary)"
                ));
            }
            c.strings.insert(s.clone(), id);
            c.by_id.push(s);
        }
        let mut st = conn.prepare("SELECT id, name FROM services").map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let id: i64 = r.get(0).map_err(sql)?;
            c.services.insert(r.get(1).map_err(sql)?, id);
            c.next_service = c.next_service.max(id);
        }
        let mut st = conn
            .prepare("SELECT id, service_id, name, kind FROM operations")
            .map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let id: i64 = r.get(0).map_err(sql)?;
            c.operations
                .entry((r.get(1).map_err(sql)?, r.get(3).map_err(sql)?))
                .or_default()
                .insert(r.get(2).map_err(sql)?, id);
            c.operation_ids.insert(id);
            c.next_operation = c.next_operation.max(id);
        }
        c.next_resource = conn
            .query_row("SELECT coalesce(max(id), 0) FROM resources", [], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        let mut st = conn
            .prepare("SELECT id, attributes FROM resources ORDER BY id DESC LIMIT ?1")
            .map_err(sql)?;
        let mut rows = st.query([MAX_CACHED_RESOURCES as i64]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            c.resources
                .insert(r.get(1).map_err(sql)?, r.get(0).map_err(sql)?);
        }
        c.next_service += 1;
        c.next_operation += 1;
        c.next_resource += 1;
        Ok(c)
    }

    pub fn string_id(&self, s: &str) -> Option<u32> {
        self.strings.get(s).copied()
    }

    pub fn service_id(&self, name: &str) -> Option<i64> {
        self.services.get(name).copied()
    }

    /// The operation's id; for a new name of a service at its cap, the overflow operation's.
    pub fn operation_id(&self, service: i64, name: &str, kind: i32) -> Option<i64> {
        let ops = self.operations.get(&(service, kind))?;
        ops.get(name).copied().or_else(|| {
            let overflow = (ops.len() >= MAX_OPERATIONS_PER_SERVICE)
                .then(|| ops.get(OVERFLOW_OPERATION).copied())
                .flatten();
            if overflow.is_some() {
                self.operations_overflowed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            overflow
        })
    }

    pub fn resource_id(&self, blob: &[u8]) -> Option<i64> {
        self.resources.get(blob).copied()
    }

    fn can_intern(&self, s: &str) -> bool {
        s.len() <= MAX_INTERNED_LEN && self.by_id.len() + 1 < MAX_STRINGS
    }

    /// Hands out ids for everything missing (some may have been added meanwhile).
    pub fn allocate(&mut self, m: Missing) {
        for s in m.strings {
            if self.strings.contains_key(s.as_str()) || !self.can_intern(&s) {
                continue;
            }
            let s: Arc<str> = Arc::from(s);
            self.by_id.push(s.clone());
            let id = self.by_id.len() as u32;
            self.strings.insert(s.clone(), id);
            self.pending.strings.push((id, s));
        }
        for name in m.services {
            if self.services.contains_key(&name) {
                continue;
            }
            let id = self.next_service;
            self.next_service += 1;
            self.services.insert(name.clone(), id);
            self.pending.services.push((id, name));
        }
        for (svc, mut name, kind) in m.operations {
            let ops = self.operations.entry((svc, kind)).or_default();
            if ops.contains_key(&name) {
                continue;
            }
            if ops.len() >= MAX_OPERATIONS_PER_SERVICE {
                name = OVERFLOW_OPERATION.to_owned();
                if ops.contains_key(&name) {
                    continue;
                }
            }
            let id = self.next_operation;
            self.next_operation += 1;
            ops.insert(name.clone(), id);
            self.operation_ids.insert(id);
            self.pending.operations.push((id, svc, name, kind));
        }
        for blob in m.resources {
            if self.resources.contains_key(&blob) {
                continue;
            }
            if self.resources.len() >= MAX_CACHED_RESOURCES {
                self.resources.clear();
            }
            let id = self.next_resource;
            self.next_resource += 1;
            self.resources.insert(blob.clone(), id);
            self.pending.resources.push((id, blob));
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether operation `id` still exists (ids are never handed out twice in a process).
    pub fn has_operation(&self, id: i64) -> bool {
        self.operation_ids.contains(&id)
    }

    /// Forgets operations whose rows retention deleted: `(id, service id, name, kind)`. A later
    /// span of the same name gets a new id.
    pub fn prune_operations(&mut self, gone: &[(i64, i64, String, i32)]) {
        for (id, service, name, kind) in gone {
            if let Some(ops) = self.operations.get_mut(&(*service, *kind)) {
                if ops.get(name) == Some(id) {
                    ops.remove(name);
                }
                if ops.is_empty() {
                    self.operations.remove(&(*service, *kind));
                }
            }
            self.operation_ids.remove(id);
        }
        self.epoch += 1;
    }

    pub fn pending(&self) -> &Pending {
        &self.pending
    }

    /// Forgets the first entries of each pending list once `done` (a snapshot of them) committed.
    pub fn committed(&mut self, done: &Pending) {
        self.pending.strings.drain(..done.strings.len());
        self.pending.services.drain(..done.services.len());
        self.pending.operations.drain(..done.operations.len());
        self.pending.resources.drain(..done.resources.len());
    }

    /// Looks strings up for one encoding pass, noting those worth a dictionary entry.
    pub fn interner<'a>(&'a self, missing: &'a mut Vec<String>) -> CatalogInterner<'a> {
        CatalogInterner {
            cat: self,
            missing,
            recent: [[("", 0); 2]; RECENT_SETS],
        }
    }
}

impl Strings for Catalog {
    fn get(&self, id: u32) -> Option<&str> {
        self.by_id.get((id as usize).checked_sub(1)?).map(|s| &**s)
    }
}

/// Sets of the interner's cache of recent hits (two entries each).
const RECENT_SETS: usize = 128;

/// The cache set of `s`: its length and first and last 8 bytes, mixed. Cheap (no loop over the
/// bytes) and good at telling attribute keys apart, which mostly differ in length or at their
/// ends (`network.peer.port`, `network.local.port`, `http.response.status_code`).
fn recent_set(s: &str) -> usize {
    let b = s.as_bytes();
    let word = |w: &[u8]| {
        let mut a = [0u8; 8];
        a[..w.len()].copy_from_slice(w);
        u64::from_le_bytes(a)
    };
    let (head, tail) = if b.len() >= 8 {
        (word(&b[..8]), word(&b[b.len() - 8..]))
    } else {
        (word(b), 0)
    };
    let mut h = (head ^ tail.rotate_left(32) ^ b.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (h >> 57) as usize % RECENT_SETS
}

pub(super) struct CatalogInterner<'a> {
    cat: &'a Catalog,
    missing: &'a mut Vec<String>,
    /// Recently resolved strings, two per set, most recent first: the same ~20 keys repeat
    /// span after span, and a compare is much cheaper than a map lookup. (The previous
    /// direct-mapped 64 slots with FNV put the 19 strings of an HTTP span into 12 slots: two
    /// thirds of the lookups missed and hashed with SipHash.) Every hit is verified, so
    /// colliding strings only cost a map lookup.
    recent: [[(&'a str, u32); 2]; RECENT_SETS],
}

impl CatalogInterner<'_> {
    /// How many strings were found missing so far.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }
}

impl Interner for CatalogInterner<'_> {
    fn id(&mut self, s: &str) -> Option<u32> {
        let set = &mut self.recent[recent_set(s)];
        for (cached, id) in set.iter() {
            if *id != 0 && *cached == s {
                return Some(*id);
            }
        }
        match self.cat.strings.get_key_value(s) {
            Some((k, id)) => {
                set[1] = set[0];
                set[0] = (&**k, *id);
                Some(*id)
            }
            None => {
                if self.cat.can_intern(s) {
                    self.missing.push(s.to_owned());
                }
                None
            }
        }
    }
}

/// Interning straight into the database, for migrations (no concurrent writers then).
pub(super) struct DbInterner<'c> {
    pub conn: &'c Connection,
    pub ids: HashMap<String, u32>,
    pub strs: Vec<String>,
    pub error: Option<rusqlite::Error>,
}

impl<'c> DbInterner<'c> {
    pub fn new(conn: &'c Connection) -> rusqlite::Result<Self> {
        let mut ids = HashMap::new();
        let mut strs = Vec::new();
        let mut st = conn.prepare("SELECT id, value FROM strings ORDER BY id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let s: String = r.get(1)?;
            ids.insert(s.clone(), r.get(0)?);
            strs.push(s);
        }
        Ok(DbInterner {
            conn,
            ids,
            strs,
            error: None,
        })
    }
}

impl Interner for DbInterner<'_> {
    fn id(&mut self, s: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(s) {
            return Some(*id);
        }
        if s.len() > MAX_INTERNED_LEN || self.strs.len() + 1 >= MAX_STRINGS {
            return None;
        }
        let id = self.strs.len() as u32 + 1;
        if let Err(e) = self
            .conn
            .prepare_cached("INSERT INTO strings(id, value) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(params![id, s]))
        {
            // Inline is always correct; the error is reported when the step ends.
            self.error.get_or_insert(e);
            return None;
        }
        self.ids.insert(s.to_owned(), id);
        self.strs.push(s.to_owned());
        Some(id)
    }
}

impl Strings for DbInterner<'_> {
    fn get(&self, id: u32) -> Option<&str> {
        self.strs
            .get((id as usize).checked_sub(1)?)
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent's HTTP spans and their resources intern, span after span.
    const SPAN_STRINGS: [&str; 19] = [
        "http.request.method",
        "url.path",
        "url.scheme",
        "network.protocol.name",
        "network.protocol.version",
        "network.transport",
        "server.address",
        "server.port",
        "network.peer.address",
        "network.peer.port",
        "network.local.address",
        "network.local.port",
        "http.request.size",
        "http.response.size",
        "client.address",
        "user_agent.original",
        "http.response.status_code",
        "tracer",
        "0.1.0",
    ];
    const RESOURCE_STRINGS: [&str; 14] = [
        "service.name",
        "process.pid",
        "process.executable.name",
        "process.executable.path",
        "process.command_line",
        "process.linux.cgroup",
        "host.name",
        "host.id",
        "host.arch",
        "os.type",
        "os.version",
        "host.cpu.count",
        "host.memory.total",
        "host.ip",
    ];

    #[test]
    fn an_http_spans_strings_all_stay_in_the_cache() {
        // At most two per set (the sets' size): after the first span, every lookup is a hit.
        let mut per_set = [0; RECENT_SETS];
        for s in SPAN_STRINGS.iter().chain(&RESOURCE_STRINGS) {
            per_set[recent_set(s)] += 1;
        }
        assert!(per_set.iter().all(|n| *n <= 2), "{per_set:?}");
    }

    #[test]
    fn colliding_and_missing_strings_resolve_correctly() {
        let mut cat = Catalog::default();
        let mut missing = Vec::new();
        let words: Vec<String> = (0..1000).map(|i| format!("key.{i}")).collect();
        {
            let mut it = cat.interner(&mut missing);
            assert!(words.iter().all(|w| it.id(w).is_none()));
        }
        cat.allocate(Missing {
            strings: std::mem::take(&mut missing),
            ..Default::default()
        });
        let mut it = cat.interner(&mut missing);
        // Three rounds through far more strings than the cache holds: every id right.
        for _ in 0..3 {
            for w in &words {
                let id = it.id(w).expect("interned");
                assert_eq!(cat.get(id), Some(w.as_str()));
            }
        }
        assert_eq!(it.id("not.there"), None);
        assert_eq!(it.missing(), 1);
    }
}
