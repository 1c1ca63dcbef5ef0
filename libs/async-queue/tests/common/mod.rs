//! Shared test harness: one queue factory per backend. Redis comes from
//! `SHAMAL_TEST_REDIS_URL`, under the skip policy of every test that needs
//! a service (`tests/support/services.rs`, `docs/testing.md`): unset, the
//! Redis cases are skipped loudly (they fail under
//! `SHAMAL_REQUIRE_SERVICES=1`, as in `scripts/test.sh`); set, Redis must
//! answer.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::{JobId, JobQueue, MemoryQueue, QueueConfig, RedisOptions, RedisQueue};

#[path = "../../../../tests/support/services.rs"]
pub mod services;

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
    /// Redis at `SHAMAL_TEST_REDIS_URL`, which must answer PING; `None`
    /// (the test is skipped, loudly) when the variable is unset, unless
    /// `SHAMAL_REQUIRE_SERVICES=1` (see `tests/support/services.rs`).
    pub async fn redis() -> Option<Backend> {
        let url = services::configured(
            "SHAMAL_TEST_REDIS_URL",
            "Redis queue test",
            "scripts/ensure-redis.sh prints a URL for it",
        )?;
        if let Err(error) = ping(&url).await {
            services::unusable("SHAMAL_TEST_REDIS_URL", &url, error);
        }
        Some(Backend::Redis(url))
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
