//! The key ring: AES-256 keys by id, one of them active.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::KeyError;

/// Length of an AES-256 key in bytes.
pub const KEY_BYTES: usize = 32;
/// Longest key id (it is stored in every blob header).
pub const MAX_KEY_ID_BYTES: usize = 64;

/// AES-256 keys by id, one of them active (the one new data is encrypted
/// under). Key bytes are zeroized on drop; `Debug` shows only the ids.
pub struct KeyRing {
    active: String,
    keys: BTreeMap<String, Zeroizing<[u8; KEY_BYTES]>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("KeyRing")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A key file: `active = "k2"` and `[keys]` of `id = "<base64>"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    active: String,
    keys: BTreeMap<String, Zeroizing<String>>,
}

/// Checks a key id: 1-64 characters of letters, digits, '.', '_' and '-'.
pub(crate) fn validate_key_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= MAX_KEY_ID_BYTES
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "key id '{}' is not 1-{MAX_KEY_ID_BYTES} characters of letters, digits, '.', '_' and '-'",
            id.escape_default()
        ))
    }
}

/// Decodes one base64 key, naming its id (never its value) on error.
fn decode_key(id: &str, encoded: &str) -> Result<Zeroizing<[u8; KEY_BYTES]>, String> {
    validate_key_id(id)?;
    let bytes = Zeroizing::new(
        STANDARD
            .decode(encoded.trim())
            .map_err(|_| format!("key '{id}' is not valid base64"))?,
    );
    if bytes.len() != KEY_BYTES {
        return Err(format!(
            "key '{id}' is {} bytes; AES-256 keys are {KEY_BYTES} bytes (44 base64 characters)",
            bytes.len()
        ));
    }
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    key.copy_from_slice(&bytes);
    Ok(key)
}

impl KeyRing {
    /// A ring of base64-encoded keys, `active` among them. `origin` names
    /// where they come from in error messages.
    fn from_encoded<'a>(
        origin: &dyn Fn(String) -> KeyError,
        active: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<KeyRing, KeyError> {
        let mut keys = BTreeMap::new();
        for (id, encoded) in entries {
            let key = decode_key(id, encoded).map_err(origin)?;
            if keys.insert(id.to_owned(), key).is_some() {
                return Err(origin(format!("key id '{id}' appears twice")));
            }
        }
        if keys.is_empty() {
            return Err(origin("holds no keys".to_owned()));
        }
        if !keys.contains_key(active) {
            return Err(origin(format!(
                "the active key id '{active}' is not among its keys ({})",
                keys.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(KeyRing {
            active: active.to_owned(),
            keys,
        })
    }

    /// A ring of raw keys (tests and tools); `active` must be among them.
    pub fn new<'a>(
        active: &str,
        keys: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<KeyRing, KeyError> {
        let origin = |message| KeyError::Invalid {
            origin: "key ring".to_owned(),
            message,
        };
        let encoded: Vec<(&str, Zeroizing<String>)> = keys
            .into_iter()
            .map(|(id, key)| (id, Zeroizing::new(STANDARD.encode(key))))
            .collect();
        KeyRing::from_encoded(
            &origin,
            active,
            encoded.iter().map(|(id, key)| (*id, key.as_str())),
        )
    }

    /// Loads a key file: TOML (`active = "k2"` then `[keys]` with
    /// `k1 = "<base64>"` lines) or the same as JSON
    /// (`{"active": "k2", "keys": {"k1": "<base64>"}}`). The file must not
    /// be readable or writable by group or others.
    pub fn from_file(path: &Path) -> Result<KeyRing, KeyError> {
        let error = |message: String| KeyError::File {
            path: path.to_owned(),
            message,
        };
        let metadata =
            std::fs::metadata(path).map_err(|source| error(format!("cannot read it: {source}")))?;
        if !metadata.is_file() {
            return Err(error("is not a regular file".to_owned()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(error(format!(
                    "is accessible by group or others (mode {mode:04o}); key files must be private: chmod 600 {}",
                    path.display()
                )));
            }
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|source| error(format!("cannot read it: {source}")))?,
        );
        let file: KeyFile = if text.trim_start().starts_with('{') {
            serde_json::from_str(&text)
                .map_err(|parse| error(format!("not a valid JSON key file: {parse}")))?
        } else {
            toml::from_str(&text).map_err(|parse| {
                error(format!(
                    "not a valid TOML key file (`active = \"k1\"` and a [keys] table): {}",
                    parse.message()
                ))
            })?
        };
        KeyRing::from_encoded(
            &error,
            &file.active,
            file.keys
                .iter()
                .map(|(id, key)| (id.as_str(), key.as_str())),
        )
    }

    /// Parses the value of an environment variable (named `variable` in
    /// errors): comma-separated `id:base64` entries, the first one active,
    /// e.g. `k2:...,k1:...`.
    pub fn from_env_value(variable: &str, value: &str) -> Result<KeyRing, KeyError> {
        KeyRing::from_entries(&format!("environment variable {variable}"), value)
    }

    /// Parses comma-separated `id:base64` entries, the first one active;
    /// `origin` names where they come from in error messages (a setting, a
    /// variable).
    pub fn from_entries(origin: &str, value: &str) -> Result<KeyRing, KeyError> {
        let error = |message: String| KeyError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        let mut entries = Vec::new();
        for entry in value
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let Some((id, key)) = entry.split_once(':') else {
                // The entry may be a bare key: name its position, not it.
                return Err(error(format!(
                    "entry {} is not `id:base64`",
                    entries.len() + 1
                )));
            };
            entries.push((id.trim(), key));
        }
        let Some((active, _)) = entries.first().copied() else {
            return Err(error(
                "holds no keys (expected `id:base64` entries, the active one first)".to_owned(),
            ));
        };
        KeyRing::from_encoded(&error, active, entries)
    }

    /// The ring in environment variable `variable`, `None` when it is unset
    /// or empty.
    pub fn from_env(variable: &str) -> Result<Option<KeyRing>, KeyError> {
        match std::env::var(variable) {
            Ok(value) if !value.trim().is_empty() => {
                let value = Zeroizing::new(value);
                KeyRing::from_env_value(variable, &value).map(Some)
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(KeyError::Invalid {
                origin: format!("environment variable {variable}"),
                message: "is not valid UTF-8".to_owned(),
            }),
        }
    }

    /// The id of the key new data is encrypted under.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// The ids of every key held, in order.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether the ring holds key `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// The cipher of key `id`.
    pub(crate) fn cipher(&self, id: &str) -> Result<Aes256Gcm, KeyError> {
        let key = self.keys.get(id).ok_or_else(|| KeyError::UnknownKey {
            key_id: id.to_owned(),
            known: self.keys.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.as_slice())))
    }
}

/// A fresh random AES-256 key, base64-encoded (for a key file or the
/// environment variable).
pub fn random_key_base64() -> Zeroizing<String> {
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    OsRng.fill_bytes(key.as_mut_slice());
    Zeroizing::new(STANDARD.encode(key.as_slice()))
}

/// Writes a new key file at `path` (mode 0600, never replacing an existing
/// file) holding one random key, `k1`, active; returns its id. For `shamal
/// up`, which keeps such a file in its state directory.
pub fn generate_key_file(path: &Path) -> Result<String, KeyError> {
    let error = |message: String| KeyError::File {
        path: path.to_owned(),
        message,
    };
    let id = "k1";
    let key = random_key_base64();
    let text = Zeroizing::new(format!(
        "# Shamal data-at-rest keys: new data is encrypted under `active`; data\n\
         # under any key listed here stays readable. Keep this file private.\n\
         active = \"{id}\"\n\n[keys]\n{id} = \"{}\"\n",
        key.as_str()
    ));
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .map_err(|source| error(format!("cannot create its directory: {source}")))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            error("already exists; a key file is never overwritten".to_owned())
        } else {
            error(format!("cannot create it: {source}"))
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| error(format!("cannot write it: {source}")))?;
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(byte: u8) -> String {
        STANDARD.encode([byte; KEY_BYTES])
    }

    fn private_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        path
    }

    #[test]
    fn key_files_in_toml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let toml = private_file(
            dir.path(),
            "keys.toml",
            &format!(
                "active = \"k2\"\n[keys]\nk1 = \"{}\"\nk2 = \"{}\"\n",
                key(1),
                key(2)
            ),
        );
        let ring = KeyRing::from_file(&toml).unwrap();
        assert_eq!(ring.active_id(), "k2");
        assert_eq!(ring.key_ids().collect::<Vec<_>>(), ["k1", "k2"]);
        let json = private_file(
            dir.path(),
            "keys.json",
            &format!(
                "{{\"active\": \"k1\", \"keys\": {{\"k1\": \"{}\"}}}}",
                key(1)
            ),
        );
        let ring = KeyRing::from_file(&json).unwrap();
        assert_eq!(ring.active_id(), "k1");
        assert!(ring.contains("k1") && !ring.contains("k2"));
    }

    #[test]
    fn bad_key_files_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                format!(
                    "active = \"k1\"\n[keys]\nk1 = \"{}\"\n",
                    STANDARD.encode([7u8; 16])
                ),
                "key 'k1' is 16 bytes",
            ),
            (
                "active = \"k1\"\n[keys]\nk1 = \"not base64!\"\n".to_owned(),
                "key 'k1' is not valid base64",
            ),
            (
                format!("active = \"k3\"\n[keys]\nk1 = \"{}\"\n", key(1)),
                "active key id 'k3' is not among its keys (k1)",
            ),
            (
                format!("active = \"k1\"\n[keys]\n\"k 1\" = \"{}\"\n", key(1)),
                "key id 'k 1'",
            ),
            ("active = \"k1\"\n[keys]\n".to_owned(), "holds no keys"),
            ("[keys]\n".to_owned(), "not a valid TOML key file"),
        ];
        for (text, expected) in cases {
            let path = private_file(dir.path(), "keys.toml", &text);
            let error = KeyRing::from_file(&path).unwrap_err().to_string();
            assert!(
                error.contains(expected) && error.contains("keys.toml"),
                "{text}: {error}"
            );
            // Never the key material.
            assert!(!error.contains(&key(1)), "{error}");
        }
        let error = KeyRing::from_file(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("missing.toml") && error.contains("cannot read"),
            "{error}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn key_files_open_to_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = private_file(
            dir.path(),
            "keys.toml",
            &format!("active = \"k1\"\n[keys]\nk1 = \"{}\"\n", key(1)),
        );
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = KeyRing::from_file(&path).unwrap_err().to_string();
            assert!(
                error.contains("keys.toml")
                    && error.contains("group or others")
                    && error.contains(&format!("{mode:04o}")),
                "{error}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        KeyRing::from_file(&path).unwrap();
    }

    #[test]
    fn environment_entries_first_is_active() {
        let value = format!("k2:{}, k1:{}", key(2), key(1));
        let ring = KeyRing::from_env_value("SHAMAL_TEST_KEYS", &value).unwrap();
        assert_eq!(ring.active_id(), "k2");
        assert!(ring.contains("k1"));
        for (value, expected) in [
            (String::new(), "holds no keys"),
            (key(1), "entry 1 is not `id:base64`"),
            (
                format!("k1:{}", STANDARD.encode([1u8; 31])),
                "key 'k1' is 31 bytes",
            ),
            (
                format!("k1:{},k1:{}", key(1), key(2)),
                "key id 'k1' appears twice",
            ),
        ] {
            let error = KeyRing::from_env_value("SHAMAL_TEST_KEYS", &value)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("SHAMAL_TEST_KEYS") && error.contains(expected),
                "{value}: {error}"
            );
            assert!(!error.contains(&key(1)), "{error}");
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let ring = KeyRing::new("k1", [("k1", [0xabu8; KEY_BYTES].as_slice())]).unwrap();
        let shown = format!("{ring:?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(!shown.contains("171") && !shown.contains("ab"), "{shown}");
        assert!(
            !shown.contains(&STANDARD.encode([0xabu8; KEY_BYTES])),
            "{shown}"
        );
    }

    #[test]
    fn generated_key_files_are_private_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("artifact-keys.toml");
        let id = generate_key_file(&path).unwrap();
        let ring = KeyRing::from_file(&path).unwrap();
        assert_eq!(ring.active_id(), id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let error = generate_key_file(&path).unwrap_err().to_string();
        assert!(error.contains("already exists"), "{error}");
        // Still the first key.
        assert_eq!(KeyRing::from_file(&path).unwrap().active_id(), id);
    }
}
