//! Reading an encrypted output back: [`decrypt_dataset`].

use futures::StreamExt;
use sha2::{Digest, Sha256};
use shamal_keys::KeyRing;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::location::Output;
use crate::output::{ENCRYPTED_SUFFIX, Manifest, PartInfo, StagedPart, part_context, staging_path};

/// Decrypts the encrypted output at `source` (a job's output: a local
/// directory or an `s3://` prefix) into `destination` (local or `s3://`,
/// empty or absent): plain Parquet parts (`part-000042.parquet`) and a
/// plain manifest (no `encryption`, checksums of the plain parts), then
/// `_SUCCESS`, so that any Parquet reader (pyarrow, DuckDB, Spark) reads
/// `destination` as one dataset. Returns the destination's manifest.
///
/// Checks, before anything is written: `source` verifies against its
/// manifest ([`Manifest::verify`]: `_SUCCESS`, every part's size and
/// SHA-256 as stored, no unlisted part), the manifest records encryption,
/// and `ring` holds every key id the parts name. Then each part is
/// decrypted under its job id and name (a part moved, changed, truncated
/// or decrypted under the wrong key fails authentication, naming the
/// part) and must hold the rows the manifest says. Errors name the part
/// or the location: [`Error::Verify`], [`Error::Encryption`],
/// [`Error::Format`] (`destination` not empty, `source` not encrypted).
/// A failure leaves the parts decrypted so far and no manifest.
///
/// Each part is held in memory while it is decrypted (parts are one
/// shard's output each).
pub async fn decrypt_dataset(source: &str, destination: &str, ring: &KeyRing) -> Result<Manifest> {
    let manifest = Manifest::verify(source).await?;
    let Some(encryption) = &manifest.encryption else {
        return Err(Error::Format {
            path: source.to_owned(),
            reason: "is not encrypted: its manifest records no encryption (read its parts as \
                     they are)"
                .to_owned(),
        });
    };
    let missing: Vec<&str> = encryption
        .key_ids
        .iter()
        .map(String::as_str)
        .filter(|id| !ring.contains(id))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Encryption {
            path: source.to_owned(),
            reason: format!(
                "its parts are encrypted under key id {}, which the key ring does not hold \
                 (its keys: {})",
                missing
                    .iter()
                    .map(|id| format!("'{id}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                ring.key_ids().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let from = Output::new(source)?;
    let to = Output::new(destination)?;
    to.check_empty().await?;
    to.create().await?;
    let mut parts = Vec::with_capacity(manifest.parts.len());
    for part in &manifest.parts {
        parts.push(decrypt_part(&manifest, part, &from, &to, ring).await?);
    }
    let plain = Manifest {
        encryption: None,
        ..Manifest::new(
            manifest.job_id.clone(),
            manifest.model.clone(),
            manifest.model_version.clone(),
            parts,
        )
    };
    plain.write(destination).await?;
    Ok(plain)
}

async fn decrypt_part(
    manifest: &Manifest,
    part: &PartInfo,
    from: &Output,
    to: &Output,
    ring: &KeyRing,
) -> Result<PartInfo> {
    let path = from.file(&part.name);
    let failed = |reason: String| Error::Encryption {
        path: path.clone(),
        reason,
    };
    let Some(name) = part.name.strip_suffix(ENCRYPTED_SUFFIX) else {
        return Err(failed(format!(
            "an encrypted part's name ends with '{ENCRYPTED_SUFFIX}'"
        )));
    };
    let stored = from.read(&part.name).await?;
    let stream = shamal_keys::decrypt(
        ring,
        &part_context(&manifest.job_id, &part.name),
        std::io::Cursor::new(stored),
    )
    .await
    .map_err(|error| failed(error.to_string()))?;
    let staging = staging_path(to, name);
    let written = write_plaintext(stream, &staging).await;
    let (sha256, bytes) = match written {
        Ok(written) => written,
        Err(error) => {
            let _ = std::fs::remove_file(&staging);
            return Err(match error {
                Written::Key(error) => failed(error.to_string()),
                Written::Io(error) => Error::Write {
                    path: staging.display().to_string(),
                    source: error,
                },
            });
        }
    };
    // The plaintext must be the Parquet file of the rows the manifest says.
    let rows = tokio::task::spawn_blocking({
        let staging = staging.clone();
        move || -> std::result::Result<i64, String> {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let file = std::fs::File::open(&staging).map_err(|error| error.to_string())?;
            let reader = SerializedFileReader::new(file).map_err(|error| error.to_string())?;
            Ok(reader.metadata().file_metadata().num_rows())
        }
    })
    .await
    .map_err(|error| failed(error.to_string()))?;
    let staged = StagedPart::plaintext(to, name, staging, part.rows, sha256, bytes);
    match rows {
        Ok(rows) if u64::try_from(rows).ok() == Some(part.rows) => {}
        Ok(rows) => {
            return Err(Error::Verify {
                path,
                reason: format!("decrypts to {rows} rows, the manifest says {}", part.rows),
            });
        }
        Err(reason) => {
            return Err(Error::CorruptFile {
                file: path,
                reason: format!("decrypts to no readable Parquet file: {reason}"),
            });
        }
    }
    staged.commit().await
}

enum Written {
    Key(shamal_keys::KeyError),
    Io(std::io::Error),
}

/// Writes the decrypted stream to `file`; its SHA-256 and size.
async fn write_plaintext(
    mut stream: shamal_keys::PlaintextStream,
    file: &std::path::Path,
) -> std::result::Result<(String, u64), Written> {
    let mut out =
        tokio::io::BufWriter::new(tokio::fs::File::create(file).await.map_err(Written::Io)?);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Written::Key)?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        out.write_all(&chunk).await.map_err(Written::Io)?;
    }
    out.flush().await.map_err(Written::Io)?;
    out.into_inner().sync_all().await.map_err(Written::Io)?;
    Ok((hex::encode(hasher.finalize()), bytes))
}
