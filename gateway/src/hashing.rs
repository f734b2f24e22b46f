//! The hash maps looked up for every reading: the device registry and the rules' state by
//! device id, the rules' index by stream and topic level, the upstream session's
//! in-flight publishes by packet id.
//!
//! std's `HashMap` hashes with SipHash-1-3, built to resist keys chosen to collide; for
//! the short keys here it took some 700 instructions per reading at 100 devices x 2/s
//! (`bench/instructions.sh`, BENCHMARKS.md "A faster hasher for the per-reading maps").
//! [`FastHashMap`] hashes with aHash, keyed at random per process (`runtime-rng`): a
//! client that picks its id still cannot predict which ids collide, which is the property
//! SipHash gave these maps (device ids are chosen by clients, authenticated or not).
//!
//! Maps built once and rarely read (configuration, rule compilation, the HTTP API) keep
//! std's default.

use std::collections::HashMap;

/// A `HashMap` with aHash under a per-process random key; make one with
/// `FastHashMap::default()`.
pub type FastHashMap<K, V> = HashMap<K, V, ahash::RandomState>;

#[cfg(test)]
mod tests {
    use super::FastHashMap;

    #[test]
    fn two_maps_hash_the_same_key_differently() {
        let a: FastHashMap<String, ()> = FastHashMap::default();
        let b: FastHashMap<String, ()> = FastHashMap::default();
        let key = "sensor-0001";
        // Keys drawn per map from a per-process random source: the same key lands
        // elsewhere in another map, so a chosen set of colliding ids cannot be precomputed.
        assert_ne!(a.hasher().hash_one(key), b.hasher().hash_one(key));
    }
}
