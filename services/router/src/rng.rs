//! The router's pseudo-random numbers: replica choice (power of two
//! choices) and rollout traffic splits need spread and speed, not
//! cryptographic randomness, so a thread-local xorshift seeded once per
//! thread serves them without locks or system calls.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A cheap, thread-local xorshift: load balancing and traffic splits need
/// spread, not cryptographic randomness.
pub fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// A distinct, non-zero seed per thread: the clock mixed with a counter.
fn seed() -> u64 {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut seed = nanos
        ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser: neighbouring seeds give unrelated streams.
    seed = (seed ^ (seed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    seed = (seed ^ (seed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (seed ^ (seed >> 31)) | 1
}

/// A random index below `bound` (not zero).
pub fn random_index(bound: usize) -> usize {
    (random_u64() % bound as u64) as usize
}
