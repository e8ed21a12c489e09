//! Hashers for the agent's per-record maps. The standard SipHash resists hash flooding, which
//! these keys cannot cause (they come from the kernel, not from traffic), and it was a
//! measurable share of the agent's time per record.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// A map hashed with [`FxHasher`].
pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Passes a `u64` key through as its own hash: for keys that are hashes already.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is expected; fold anything else in rather than lose it.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(SEED);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The multiply-rotate hash rustc uses for its own tables (FxHash): a few cycles a word.
#[derive(Default)]
pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::HashSet,
        hash::{BuildHasher, BuildHasherDefault},
        net::SocketAddr,
    };

    #[test]
    fn socket_address_pairs_spread() {
        // Many connections from one client to one server port: only the client port differs.
        let server: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let hashes: HashSet<u64> = (1000..11000u16)
            .map(|port| {
                let client = SocketAddr::from(([127, 0, 0, 1], port));
                let mut h = BuildHasherDefault::<FxHasher>::default().build_hasher();
                std::hash::Hash::hash(&(server, client), &mut h);
                h.finish() >> 57 // the bits hashbrown uses for its control bytes
                    | (h.finish() & 0x3ff) << 7 // and the low bits it uses for buckets
            })
            .collect();
        assert!(hashes.len() > 9000, "{}", hashes.len());
    }
}
