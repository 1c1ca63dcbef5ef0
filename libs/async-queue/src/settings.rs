//! The checks of the async settings that routers and workers share, so
//! that both refuse the same values with the same words.

/// A shared async setting that is out of range; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("async_key_prefix must be 1 to 128 printable characters without spaces")]
    KeyPrefix,
    #[error("async_result_ttl_ms must be at least 1000")]
    ResultTtl,
}

/// Checks the prefix of the queue's Redis keys and how long results are
/// kept (milliseconds), as routers and workers must agree on both.
pub fn check_shared_settings(key_prefix: &str, result_ttl_ms: u64) -> Result<(), SettingError> {
    if key_prefix.is_empty()
        || key_prefix.len() > 128
        || key_prefix.chars().any(|c| !c.is_ascii_graphic())
    {
        return Err(SettingError::KeyPrefix);
    }
    if result_ttl_ms < 1_000 {
        return Err(SettingError::ResultTtl);
    }
    Ok(())
}

/// Whether `url` names a Redis server the queue can use.
pub fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("redis+unix://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_settings_are_checked_alike() {
        assert_eq!(check_shared_settings("shamal:async", 3_600_000), Ok(()));
        assert_eq!(
            check_shared_settings("", 3_600_000),
            Err(SettingError::KeyPrefix)
        );
        assert_eq!(
            check_shared_settings("a b", 3_600_000),
            Err(SettingError::KeyPrefix)
        );
        assert_eq!(
            check_shared_settings(&"x".repeat(129), 3_600_000),
            Err(SettingError::KeyPrefix)
        );
        assert_eq!(
            check_shared_settings("p", 999),
            Err(SettingError::ResultTtl)
        );
        assert!(is_redis_url("redis://127.0.0.1:6379/0"));
        assert!(is_redis_url("redis+unix:///run/redis.sock"));
        assert!(!is_redis_url("http://127.0.0.1:6379"));
    }
}
