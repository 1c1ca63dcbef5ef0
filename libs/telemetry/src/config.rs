//! Settings layering shared by every service, and the redaction of secrets
//! in what is printed of them.
//!
//! A service's effective configuration is built in one order, later layers
//! winning: its built-in defaults < a TOML file (`--config`) < environment
//! variables < command-line flags. The last two are one layer: clap reads a
//! flag, else its variable (see [`crate::process`]), into the service's
//! `…Args` struct of `Option`s, which serializes only the values given. So a
//! setting is one field in the configuration struct plus one in the args
//! struct, with no merge code.
//!
//! [figment](https://docs.rs/figment) merges the layers as serde values and
//! deserializes the result once, so the configuration struct's serde
//! attributes (`deny_unknown_fields`, `flatten`, `default`) apply to the
//! merged whole and errors name the key at fault.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a configuration cannot be used. Every variant's message names the
/// file, key or field at fault; services exit with code 64 on any of them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A layer does not deserialize: a TOML syntax error, an unknown key, a
    /// value of the wrong type.
    #[error("{}", parse_message(file.as_deref(), key.as_deref(), message))]
    Parse {
        /// The `--config` file, when one was given (the bad value may still
        /// come from a flag or the environment when `key` is set).
        file: Option<PathBuf>,
        /// Dotted key of the bad value, when known.
        key: Option<String>,
        message: String,
    },
    /// A value deserialized but is out of range or inconsistent; the
    /// message names the field.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// A validation failure; `message` names the field.
    pub fn invalid(message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid(message.into())
    }
}

fn parse_message(file: Option<&Path>, key: Option<&str>, message: &str) -> String {
    match (file, key) {
        (Some(file), Some(key)) => format!("{}: {key}: {message}", file.display()),
        (Some(file), None) => format!("{}: {message}", file.display()),
        (None, Some(key)) => format!("{key}: {message}"),
        (None, None) => message.to_owned(),
    }
}

/// The layers of one service's configuration, ready to be extracted.
#[derive(Debug)]
pub struct Layers {
    figment: Figment,
    file: Option<PathBuf>,
}

impl Layers {
    /// `defaults` < the TOML `file` < `overrides` (the args struct: flags,
    /// else their environment variables). `defaults` must serialize every
    /// value faithfully (it is read back); `overrides` should skip the
    /// values not given (`skip_serializing_if = "Option::is_none"`).
    pub fn new(
        defaults: &impl Serialize,
        file: Option<&Path>,
        overrides: &impl Serialize,
    ) -> Result<Layers, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(path) = file {
            // Read here rather than with `Toml::file`, which treats a
            // missing file as an empty one.
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(Toml::string(&text));
        }
        Ok(Layers {
            figment: figment.merge(Serialized::defaults(overrides)),
            file: file.map(Path::to_owned),
        })
    }

    /// The merged layers as `T`. May be called for several types over the
    /// same layers: a struct `#[serde(flatten)]`ed into another loses the
    /// key of a bad value (serde buffers flattened values), so extracting
    /// the flattened part on its own first gets an error that names it.
    pub fn extract<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.figment
            .extract()
            .map_err(|error| self.parse_error(error))
    }

    fn parse_error(&self, error: figment::Error) -> ConfigError {
        use figment::error::Kind;
        let key = (!error.path.is_empty()).then(|| error.path.join("."));
        let message = match &error.kind {
            Kind::UnknownField(field, _) => format!("unknown field `{field}`"),
            kind => kind.to_string(),
        };
        ConfigError::Parse {
            file: self.file.clone(),
            key,
            message,
        }
    }
}

/// Loads `C` from its defaults, the TOML `file` and `overrides` (see
/// [`Layers::new`]); validation is the caller's.
pub fn load<C: Default + Serialize + DeserializeOwned>(
    file: Option<&Path>,
    overrides: &impl Serialize,
) -> Result<C, ConfigError> {
    Layers::new(&C::default(), file, overrides)?.extract()
}

/// What stands in place of a secret.
pub const REDACTED: &str = "***";

/// `text` with the password of every URL in it (`scheme://user:password@host`)
/// replaced by [`REDACTED`]: database and Redis URLs carry their
/// credentials this way. Text without such a URL comes back borrowed.
pub fn redact_urls(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let authority_start = search + found + 3;
        let authority_len = text[authority_start..]
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '\\') || c.is_whitespace())
            .unwrap_or(text.len() - authority_start);
        let authority = &text[authority_start..authority_start + authority_len];
        search = authority_start + authority_len;
        // The userinfo ends at the authority's last `@` (a password may
        // hold an unescaped one); the password starts after its first `:`.
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let Some(colon) = authority[..at].find(':') else {
            continue;
        };
        let password = authority_start + colon + 1..authority_start + at;
        if password.is_empty() || &text[password.clone()] == REDACTED {
            continue;
        }
        out.push_str(&text[copied..password.start]);
        out.push_str(REDACTED);
        copied = password.end;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Shows a URL (or any text) with its passwords redacted: for error
/// messages and logs that name a configured URL.
#[derive(Clone, Copy, Debug)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&redact_urls(self.0))
    }
}

/// Whether a key names key material whose whole value is secret
/// (`*_password`, `*_secret`, `*_token`, `*_key`; `async_key_prefix` and
/// the like are not).
fn secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|word| key == *word || key.ends_with(&format!("_{word}")))
}

/// `config` as TOML for `--print-config`, with secrets redacted: the
/// passwords of URLs anywhere in it, and the whole value of keys that name
/// key material (see `secret_key`). Redacting the printed text rather than
/// marking fields means a new secret setting cannot be forgotten.
pub fn printable<C: Serialize>(config: &C) -> Result<String, toml::ser::Error> {
    let text = toml::to_string_pretty(config)?;
    let mut printed = String::with_capacity(text.len());
    for line in text.lines() {
        let key = line.split_once('=').map(|(key, _)| key.trim());
        match key {
            Some(key) if secret_key(key) => {
                printed.push_str(key);
                printed.push_str(" = \"");
                printed.push_str(REDACTED);
                printed.push('"');
            }
            _ => printed.push_str(&redact_urls(line)),
        }
        printed.push('\n');
    }
    Ok(printed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[test]
    fn url_passwords_are_redacted() {
        for (url, shown) in [
            (
                "postgres://shamal:hunter2@db.internal:5432/registry",
                "postgres://shamal:***@db.internal:5432/registry",
            ),
            ("redis://:s3cret@redis:6379/1", "redis://:***@redis:6379/1"),
            (
                "redis://user:p@ss@redis:6379",
                "redis://user:***@redis:6379",
            ),
            (
                "rediss://default:pw@cache.example.com?tls=1",
                "rediss://default:***@cache.example.com?tls=1",
            ),
            // Nothing secret: left alone (and borrowed).
            ("redis://redis:6379/1", "redis://redis:6379/1"),
            ("redis://user@redis:6379", "redis://user@redis:6379"),
            (
                "sqlite://.shamal/registry.db",
                "sqlite://.shamal/registry.db",
            ),
            ("postgres://user:@host/db", "postgres://user:@host/db"),
            ("no url at all", "no url at all"),
        ] {
            assert_eq!(redact_urls(url), shown, "{url}");
            assert_eq!(Redacted(url).to_string(), shown);
        }
        assert!(matches!(
            redact_urls("redis://redis:6379"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            redact_urls("a = \"postgres://u:p@h/d\", b = [\"redis://:x@r\", \"redis://r\"]"),
            "a = \"postgres://u:***@h/d\", b = [\"redis://:***@r\", \"redis://r\"]"
        );
    }

    #[derive(Serialize)]
    struct Printed {
        database_url: String,
        async_queue: Option<String>,
        async_key_prefix: String,
        signing_key: String,
        api_token: String,
        workers: Vec<String>,
    }

    #[test]
    fn printed_configurations_hide_secrets() {
        let printed = printable(&Printed {
            database_url: "postgres://shamal:hunter2@db/registry".to_owned(),
            async_queue: Some("redis://:s3cret@redis:6379/0".to_owned()),
            async_key_prefix: "shamal:async".to_owned(),
            signing_key: "0123abcd".to_owned(),
            api_token: "tok".to_owned(),
            workers: vec!["a:1".to_owned()],
        })
        .unwrap();
        for secret in ["hunter2", "s3cret", "0123abcd", "tok\""] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(
            printed.contains("database_url = \"postgres://shamal:***@db/registry\""),
            "{printed}"
        );
        assert!(
            printed.contains("async_queue = \"redis://:***@redis:6379/0\""),
            "{printed}"
        );
        assert!(
            printed.contains("async_key_prefix = \"shamal:async\""),
            "not key material: {printed}"
        );
        assert!(printed.contains("signing_key = \"***\""), "{printed}");
        // Still TOML.
        let value: toml::Table = toml::from_str(&printed).unwrap();
        assert_eq!(value["workers"][0].as_str(), Some("a:1"));
    }

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(default)]
    struct Shared {
        listen: String,
        capacity: Option<u32>,
    }

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct Service {
        #[serde(flatten)]
        shared: Shared,
        threads: usize,
    }

    #[derive(Default, Serialize)]
    struct Args {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        threads: Option<usize>,
    }

    #[test]
    fn layers_apply_in_order_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("service.toml");
        std::fs::write(&file, "listen = \"file\"\nthreads = 3\ncapacity = 4\n").unwrap();
        let config: Service = load(
            Some(&file),
            &Args {
                listen: Some("flag".to_owned()),
                ..Args::default()
            },
        )
        .unwrap();
        assert_eq!(config.shared.listen, "flag", "flag beats file");
        assert_eq!(config.threads, 3, "file beats default");
        assert_eq!(config.shared.capacity, Some(4));

        let error = |text: &str| {
            std::fs::write(&file, text).unwrap();
            let layers = Layers::new(&Service::default(), Some(&file), &Args::default()).unwrap();
            layers
                .extract::<Shared>()
                .and_then(|_| layers.extract::<Service>())
                .unwrap_err()
                .to_string()
        };
        let unknown = error("thread = 3\n");
        assert!(unknown.contains("unknown field `thread`"), "{unknown}");
        assert!(unknown.contains("service.toml"), "{unknown}");
        let flattened = error("capacity = -1\n");
        assert!(flattened.contains("capacity"), "{flattened}");
        let own = error("threads = \"x\"\n");
        assert!(own.contains("threads"), "{own}");
        let syntax = error("threads = \n");
        assert!(syntax.contains("service.toml"), "{syntax}");

        let missing = load::<Service>(Some(&dir.path().join("nope.toml")), &Args::default())
            .unwrap_err()
            .to_string();
        assert!(missing.starts_with("cannot read"), "{missing}");
        assert!(missing.contains("nope.toml"), "{missing}");
    }
}
