//! Validated tokens, remembered by their SHA-256 until they expire, so
//! that a token seen before costs a hash and a lookup instead of a
//! signature check. Bounded: when a shard is full its expired entries go
//! first, then arbitrary ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::principal::User;

const SHARDS: usize = 16;

pub type TokenHash = [u8; 32];

type Shard = Mutex<HashMap<TokenHash, Arc<User>>>;

pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Debug)]
pub struct TokenCache {
    shards: Box<[Shard]>,
    per_shard: usize,
}

impl TokenCache {
    /// A cache of at most about `capacity` tokens (0: nothing is kept).
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache::with_shards(capacity, SHARDS)
    }

    fn with_shards(capacity: usize, shards: usize) -> TokenCache {
        let shards = shards.clamp(1, 256);
        TokenCache {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(shards),
        }
    }

    fn shard(&self, hash: &TokenHash) -> &Shard {
        &self.shards[usize::from(hash[0]) % self.shards.len()]
    }

    /// The user of a token validated before and not expired at `now`.
    pub fn get(&self, hash: &TokenHash, now: SystemTime) -> Option<Arc<User>> {
        if self.per_shard == 0 {
            return None;
        }
        let mut shard = self
            .shard(hash)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let user = shard.get(hash)?;
        if user.expires_at > now {
            Some(user.clone())
        } else {
            shard.remove(hash);
            None
        }
    }

    /// Remembers a validated token until `user.expires_at`.
    pub fn insert(&self, hash: TokenHash, user: Arc<User>, now: SystemTime) {
        if self.per_shard == 0 || user.expires_at <= now {
            return;
        }
        let mut shard = self
            .shard(&hash)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&hash) {
            shard.retain(|_, user| user.expires_at > now);
            if shard.len() >= self.per_shard {
                // Still full of live tokens: drop an eighth (at least one),
                // whichever the map yields first, so that a full cache
                // does not pay this on every insert.
                let drop = (self.per_shard / 8).max(1);
                let victims: Vec<TokenHash> = shard.keys().take(drop).copied().collect();
                for victim in victims {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(hash, user);
    }

    /// Tokens remembered (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// The most tokens it keeps.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn user(expires_at: SystemTime) -> Arc<User> {
        Arc::new(User {
            subject: "s".into(),
            client_id: None,
            tenant: None,
            roles: vec![],
            groups: vec![],
            expires_at,
        })
    }

    #[test]
    fn hits_until_expiry_then_forgets() {
        let cache = TokenCache::new(100);
        let now = SystemTime::now();
        let hash = token_hash("a.b.c");
        cache.insert(hash, user(now + Duration::from_secs(10)), now);
        assert!(cache.get(&hash, now).is_some());
        assert!(cache.get(&token_hash("a.b.d"), now).is_none());
        assert!(cache.get(&hash, now + Duration::from_secs(10)).is_none());
        assert_eq!(cache.len(), 0, "the expired entry is removed on sight");
        cache.insert(hash, user(now), now);
        assert_eq!(cache.len(), 0, "an expired token is not cached");
    }

    #[test]
    fn evicts_expired_tokens_first_then_arbitrary_ones() {
        let cache = TokenCache::with_shards(10, 1);
        let now = SystemTime::now();
        let live = now + Duration::from_secs(60);
        let short = now + Duration::from_secs(1);
        for i in 0..10 {
            let expiry = if i % 2 == 0 { short } else { live };
            cache.insert(token_hash(&format!("t{i}")), user(expiry), now);
        }
        assert_eq!(cache.len(), 10);
        let later = now + Duration::from_secs(2);
        for i in 10..15 {
            cache.insert(token_hash(&format!("t{i}")), user(live), later);
        }
        assert_eq!(cache.len(), 10);
        for i in (1..10).step_by(2).chain(10..15) {
            assert!(
                cache.get(&token_hash(&format!("t{i}")), later).is_some(),
                "t{i}"
            );
        }
        // Full of live tokens: one more drops one to make room.
        cache.insert(token_hash("t15"), user(live), later);
        assert_eq!(cache.len(), 10);
        assert!(cache.get(&token_hash("t15"), later).is_some());
    }

    #[test]
    fn never_grows_past_its_capacity() {
        let cache = TokenCache::new(160);
        assert_eq!(cache.capacity(), 160);
        let now = SystemTime::now();
        let live = now + Duration::from_secs(60);
        for i in 0..10_000 {
            cache.insert(token_hash(&format!("x{i}")), user(live), now);
            assert!(cache.len() <= 160);
        }
        assert!(cache.len() > 100, "{}", cache.len());
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let cache = TokenCache::new(0);
        let now = SystemTime::now();
        let hash = token_hash("a");
        cache.insert(hash, user(now + Duration::from_secs(5)), now);
        assert!(cache.get(&hash, now).is_none());
        assert_eq!(cache.len(), 0);
    }
}
