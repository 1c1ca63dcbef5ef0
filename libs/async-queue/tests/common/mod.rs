//! Shared test harness: one queue factory per backend.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::{JobId, JobQueue, MemoryQueue, QueueConfig, RedisOptions, RedisQueue};

/// True when Redis must be available (CI): tests fail instead of skipping.
pub fn redis_required() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| v == "1" || v == "true");
    set("CI") || set("SHAMAL_REQUIRE_REDIS")
}

pub fn redis_url() -> String {
    std::env::var("SHAMAL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// PINGs the server at `url`.
pub async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

pub enum Backend {
    Memory,
    Redis(String),
}

impl Backend {
    /// The Redis backend, or `None` (with a loud message) when Redis is not
    /// reachable and not required.
    pub async fn redis() -> Option<Backend> {
        let url = redis_url();
        match ping(&url).await {
            Ok(()) => Some(Backend::Redis(url)),
            Err(e) if redis_required() => {
                panic!("Redis at {url} is unreachable ({e}) and CI/SHAMAL_REQUIRE_REDIS is set")
            }
            Err(e) => {
                eprintln!(
                    "\n!!!!!! SKIPPING Redis test: {url} unreachable ({e}); run scripts/ensure-redis.sh \
                     or set SHAMAL_TEST_REDIS_URL !!!!!!\n"
                );
                None
            }
        }
    }

    pub async fn queue(&self, config: QueueConfig) -> TestQueue {
        match self {
            Backend::Memory => TestQueue {
                q: Arc::new(MemoryQueue::new(config).expect("valid config")),
                redis: None,
            },
            Backend::Redis(url) => {
                let prefix = format!("shamal-test:{}", JobId::generate());
                let opts = RedisOptions::new(url.clone()).with_key_prefix(prefix.clone());
                let q = RedisQueue::connect(opts, config)
                    .await
                    .expect("connect to Redis");
                TestQueue {
                    q: Arc::new(q),
                    redis: Some((url.clone(), prefix)),
                }
            }
        }
    }
}

/// A queue under test; deletes its Redis keys when dropped.
pub struct TestQueue {
    pub q: Arc<dyn JobQueue>,
    redis: Option<(String, String)>,
}

impl std::ops::Deref for TestQueue {
    type Target = Arc<dyn JobQueue>;
    fn deref(&self) -> &Self::Target {
        &self.q
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let Some((url, prefix)) = self.redis.take() else {
            return;
        };
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

impl TestQueue {
    /// Another client of the same Redis queue (own connections), if Redis.
    pub async fn redis_twin(&self, config: QueueConfig) -> Option<Arc<dyn JobQueue>> {
        let (url, prefix) = self.redis.as_ref()?;
        let opts = RedisOptions::new(url.clone()).with_key_prefix(prefix.clone());
        let q = RedisQueue::connect(opts, config)
            .await
            .expect("connect to Redis");
        Some(Arc::new(q))
    }
}

/// A config with short times for tests.
pub fn fast_config() -> QueueConfig {
    QueueConfig {
        result_ttl: Duration::from_secs(60),
        min_idle: Duration::from_millis(300),
        max_attempts: 3,
        // Long: waiters must be woken by notifications, not by re-checks.
        wait_recheck: Duration::from_secs(30),
    }
}
