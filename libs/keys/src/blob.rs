//! The encrypted blob format: large data encrypted and decrypted as a
//! stream, never whole in memory.
//!
//! ```text
//! header   magic "\x89SHAMBLB" (8) | version 1 (1) | key id length (1) | key id | nonce prefix (7)
//! segment  AES-256-GCM(64 KiB of plaintext) | tag (16)     repeated; the last holds 0-64 KiB
//! ```
//!
//! Segments use the STREAM construction (`aead::stream`, big-endian 32-bit
//! counter and a last-segment flag in the nonce, after the blob's random
//! nonce prefix), with the whole header and the caller's context (what the
//! blob is, e.g. the digest an artifact is stored under) as associated
//! data: a changed byte anywhere, a truncated or extended blob, reordered
//! segments, or a whole blob moved to another name fail authentication
//! instead of decrypting to garbage. The last segment is
//! only empty for an empty blob, so the plaintext length follows from the
//! file length ([`plaintext_len`]).

use std::pin::Pin;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::OsRng;
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::stream::{DecryptorBE32, EncryptorBE32};
use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::KeyError;
use crate::keyring::{KeyRing, validate_key_id};

/// First bytes of every encrypted blob. The high first byte keeps text from
/// ever matching it.
pub const MAGIC: [u8; 8] = *b"\x89SHAMBLB";
/// The format version this crate writes.
pub const VERSION: u8 = 1;
/// Plaintext bytes per segment.
pub const SEGMENT_BYTES: usize = 64 * 1024;
/// Authentication tag bytes per segment.
pub const TAG_BYTES: usize = 16;
/// Nonce prefix bytes: the 12-byte nonce less STREAM's counter and flag.
pub const NONCE_PREFIX_BYTES: usize = 7;
/// The longest header: enough bytes to read before [`BlobHeader::parse`].
pub const MAX_HEADER_BYTES: usize =
    MAGIC.len() + 2 + crate::keyring::MAX_KEY_ID_BYTES + NONCE_PREFIX_BYTES;

const CIPHERTEXT_SEGMENT: usize = SEGMENT_BYTES + TAG_BYTES;

/// Whether `prefix` (the first bytes of a blob, at least 8 of them) starts
/// an encrypted blob; plaintext written before encryption was turned on
/// does not.
pub fn is_encrypted(prefix: &[u8]) -> bool {
    prefix.starts_with(&MAGIC)
}

/// The header of an encrypted blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    key_id: String,
    nonce_prefix: [u8; NONCE_PREFIX_BYTES],
}

impl BlobHeader {
    /// The id of the key the blob is encrypted under.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Length of the header in bytes.
    pub fn len(&self) -> usize {
        MAGIC.len() + 2 + self.key_id.len() + NONCE_PREFIX_BYTES
    }

    /// Never: a header always holds the magic.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.push(VERSION);
        // validate_key_id bounds the id to 64 bytes.
        bytes.push(self.key_id.len() as u8);
        bytes.extend_from_slice(self.key_id.as_bytes());
        bytes.extend_from_slice(&self.nonce_prefix);
        bytes
    }

    /// Parses the header at the start of `bytes`: `Ok(None)` when `bytes`
    /// is not an encrypted blob (no magic), an error when it is one this
    /// crate cannot read or `bytes` stops inside the header.
    pub fn parse(bytes: &[u8]) -> Result<Option<BlobHeader>, KeyError> {
        // Shorter than the magic: plaintext (no encrypted blob is that short).
        if !is_encrypted(bytes) {
            return Ok(None);
        }
        let rest = &bytes[MAGIC.len()..];
        let [version, id_len, rest @ ..] = rest else {
            return Err(KeyError::Header("truncated inside the header".to_owned()));
        };
        if *version != VERSION {
            return Err(KeyError::Header(format!(
                "format version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let id_len = usize::from(*id_len);
        if rest.len() < id_len + NONCE_PREFIX_BYTES {
            return Err(KeyError::Header("truncated inside the header".to_owned()));
        }
        let key_id = std::str::from_utf8(&rest[..id_len])
            .map_err(|_| KeyError::Header("the key id is not UTF-8".to_owned()))?;
        validate_key_id(key_id).map_err(KeyError::Header)?;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_BYTES];
        nonce_prefix.copy_from_slice(&rest[id_len..id_len + NONCE_PREFIX_BYTES]);
        Ok(Some(BlobHeader {
            key_id: key_id.to_owned(),
            nonce_prefix,
        }))
    }

    /// Reads the header from the start of `reader`: `Ok(None)` (with the
    /// bytes read so far) when it is not an encrypted blob.
    pub async fn read<R: AsyncRead + Unpin>(
        reader: &mut R,
    ) -> Result<Result<BlobHeader, Vec<u8>>, KeyError> {
        let mut prefix = Vec::with_capacity(MAX_HEADER_BYTES);
        read_up_to(reader, &mut prefix, MAGIC.len() + 2).await?;
        if !is_encrypted(&prefix) {
            return Ok(Err(prefix));
        }
        let id_len = prefix.get(MAGIC.len() + 1).copied().unwrap_or(0);
        let full = MAGIC.len() + 2 + usize::from(id_len) + NONCE_PREFIX_BYTES;
        read_up_to(reader, &mut prefix, full).await?;
        match BlobHeader::parse(&prefix)? {
            Some(header) if header.len() == prefix.len() => Ok(Ok(header)),
            _ => Err(KeyError::Header("truncated inside the header".to_owned())),
        }
    }
}

/// Reads from `reader` until `buffer` holds `target` bytes or it ends.
async fn read_up_to<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
    target: usize,
) -> std::io::Result<()> {
    while buffer.len() < target {
        let start = buffer.len();
        buffer.resize(target, 0);
        let read = reader.read(&mut buffer[start..]).await;
        let read = match read {
            Ok(read) => read,
            Err(error) => {
                buffer.truncate(start);
                return Err(error);
            }
        };
        buffer.truncate(start + read);
        if read == 0 {
            break;
        }
    }
    Ok(())
}

/// The plaintext length of an encrypted blob of `blob_len` bytes whose
/// header is `header_len` bytes long, or an error when no blob of this
/// format has that length (it was truncated inside a tag).
pub fn plaintext_len(header_len: usize, blob_len: u64) -> Result<u64, KeyError> {
    let body = blob_len
        .checked_sub(header_len as u64)
        .filter(|body| *body >= TAG_BYTES as u64)
        .ok_or_else(|| KeyError::Header("truncated before its first segment".to_owned()))?;
    let segments = body.div_ceil(CIPHERTEXT_SEGMENT as u64);
    let last = body - (segments - 1) * CIPHERTEXT_SEGMENT as u64;
    if last < TAG_BYTES as u64 || (last == TAG_BYTES as u64 && segments > 1) {
        return Err(KeyError::Header(format!(
            "{blob_len} bytes is not the length of a blob of this format (truncated?)"
        )));
    }
    Ok(body - segments * TAG_BYTES as u64)
}

/// Encrypts data written to it into `writer` under one key: write the
/// plaintext in pieces of any size, then [`BlobEncryptor::finish`]. At most
/// one segment is buffered.
pub struct BlobEncryptor<W> {
    writer: W,
    aad: Vec<u8>,
    stream: Option<EncryptorBE32<Aes256Gcm>>,
    buffer: Vec<u8>,
    plaintext: u64,
}

impl<W: AsyncWrite + Unpin> BlobEncryptor<W> {
    /// Starts a blob under the ring's active key, writing its header.
    /// `context` says what the blob is (it must be the same to decrypt it)
    /// and is not stored.
    pub async fn new(
        ring: &KeyRing,
        context: &[u8],
        writer: W,
    ) -> Result<BlobEncryptor<W>, KeyError> {
        BlobEncryptor::with_key(ring, ring.active_id(), context, writer).await
    }

    /// Starts a blob under key `key_id` of the ring, writing its header.
    pub async fn with_key(
        ring: &KeyRing,
        key_id: &str,
        context: &[u8],
        mut writer: W,
    ) -> Result<BlobEncryptor<W>, KeyError> {
        let cipher = ring.cipher(key_id)?;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_BYTES];
        OsRng.fill_bytes(&mut nonce_prefix);
        let header = BlobHeader {
            key_id: key_id.to_owned(),
            nonce_prefix,
        }
        .to_bytes();
        writer.write_all(&header).await?;
        let mut aad = header;
        aad.extend_from_slice(context);
        Ok(BlobEncryptor {
            writer,
            aad,
            stream: Some(EncryptorBE32::from_aead(
                cipher,
                GenericArray::from_slice(&nonce_prefix),
            )),
            buffer: Vec::with_capacity(CIPHERTEXT_SEGMENT),
            plaintext: 0,
        })
    }

    /// Encrypts `data`, writing each segment once the next byte shows it is
    /// not the last.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), KeyError> {
        while !data.is_empty() {
            if self.buffer.len() == SEGMENT_BYTES {
                let stream = self.stream.as_mut().ok_or(KeyError::TooLarge)?;
                stream
                    .encrypt_next_in_place(&self.aad, &mut self.buffer)
                    .map_err(|_| KeyError::TooLarge)?;
                self.writer.write_all(&self.buffer).await?;
                self.buffer.clear();
            }
            let take = (SEGMENT_BYTES - self.buffer.len()).min(data.len());
            self.buffer.extend_from_slice(&data[..take]);
            self.plaintext += take as u64;
            data = &data[take..];
        }
        Ok(())
    }

    /// Encrypts the last segment and flushes; returns the writer (to sync a
    /// file) and the plaintext length.
    pub async fn finish(mut self) -> Result<(W, u64), KeyError> {
        let stream = self.stream.take().ok_or(KeyError::TooLarge)?;
        stream
            .encrypt_last_in_place(&self.aad, &mut self.buffer)
            .map_err(|_| KeyError::TooLarge)?;
        self.writer.write_all(&self.buffer).await?;
        self.writer.flush().await?;
        Ok((self.writer, self.plaintext))
    }
}

/// Encrypts everything `reader` yields into `writer` under the ring's
/// active key, bound to `context` (see [`BlobEncryptor::new`]); returns
/// the plaintext length.
pub async fn encrypt<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    ring: &KeyRing,
    context: &[u8],
    mut reader: R,
    writer: W,
) -> Result<u64, KeyError> {
    let mut encryptor = BlobEncryptor::new(ring, context, writer).await?;
    let mut chunk = vec![0u8; SEGMENT_BYTES];
    loop {
        let read = reader.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        encryptor.write(&chunk[..read]).await?;
    }
    Ok(encryptor.finish().await?.1)
}

/// Decrypted plaintext, one segment per chunk.
pub type PlaintextStream = Pin<Box<dyn Stream<Item = Result<Bytes, KeyError>> + Send>>;

struct Decrypting<R> {
    reader: R,
    stream: Option<DecryptorBE32<Aes256Gcm>>,
    aad: Vec<u8>,
    key_id: String,
    buffer: Vec<u8>,
    segment: u64,
    ended: bool,
}

impl<R: AsyncRead + Unpin> Decrypting<R> {
    async fn next_segment(&mut self) -> Result<Option<Bytes>, KeyError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        // One byte past a full segment shows it is not the last.
        if !self.ended && self.buffer.len() <= CIPHERTEXT_SEGMENT {
            read_up_to(&mut self.reader, &mut self.buffer, 2 * CIPHERTEXT_SEGMENT).await?;
            // read_up_to stops short only at the end of the blob.
            self.ended = self.buffer.len() < 2 * CIPHERTEXT_SEGMENT;
        }
        let failed = |segment| KeyError::Authentication {
            key_id: self.key_id.clone(),
            segment,
        };
        if self.buffer.len() > CIPHERTEXT_SEGMENT {
            let rest = self.buffer.split_off(CIPHERTEXT_SEGMENT);
            let mut segment = std::mem::replace(&mut self.buffer, rest);
            stream
                .decrypt_next_in_place(&self.aad, &mut segment)
                .map_err(|_| failed(self.segment))?;
            self.segment += 1;
            return Ok(Some(Bytes::from(segment)));
        }
        let Some(stream) = self.stream.take() else {
            return Ok(None);
        };
        let mut segment = std::mem::take(&mut self.buffer);
        stream
            .decrypt_last_in_place(&self.aad, &mut segment)
            .map_err(|_| failed(self.segment))?;
        self.segment += 1;
        Ok((!segment.is_empty()).then(|| Bytes::from(segment)))
    }
}

/// Decrypts an encrypted blob read from `reader` (positioned at its start)
/// with the key its header names and the `context` it was encrypted with.
/// Each chunk is authenticated before it is yielded; a wrong key or
/// context, a changed byte, truncation or reordering yields an error
/// instead of more chunks.
pub async fn decrypt<R: AsyncRead + Unpin + Send + 'static>(
    ring: &KeyRing,
    context: &[u8],
    mut reader: R,
) -> Result<PlaintextStream, KeyError> {
    let header = match BlobHeader::read(&mut reader).await? {
        Ok(header) => header,
        Err(_) => {
            return Err(KeyError::Header(
                "it does not start with the encrypted-blob magic".to_owned(),
            ));
        }
    };
    decrypt_after_header(ring, &header, context, reader)
}

/// Decrypts the segments of a blob whose header was already read from
/// `reader` (see [`BlobHeader::read`]).
pub fn decrypt_after_header<R: AsyncRead + Unpin + Send + 'static>(
    ring: &KeyRing,
    header: &BlobHeader,
    context: &[u8],
    reader: R,
) -> Result<PlaintextStream, KeyError> {
    let cipher = ring.cipher(header.key_id())?;
    let mut aad = header.to_bytes();
    aad.extend_from_slice(context);
    let state = Decrypting {
        reader,
        stream: Some(DecryptorBE32::from_aead(
            cipher,
            GenericArray::from_slice(&header.nonce_prefix),
        )),
        aad,
        key_id: header.key_id.clone(),
        buffer: Vec::with_capacity(2 * CIPHERTEXT_SEGMENT),
        segment: 0,
        ended: false,
    };
    Ok(Box::pin(futures::stream::try_unfold(
        state,
        |mut state| async move { Ok(state.next_segment().await?.map(|chunk| (chunk, state))) },
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use futures::TryStreamExt;

    use super::*;

    const CONTEXT: &[u8] = b"test blob";

    fn ring(active: &str) -> KeyRing {
        KeyRing::new(
            active,
            [("k1", [1u8; 32].as_slice()), ("k2", [2u8; 32].as_slice())],
        )
        .unwrap()
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|index| (index * 31 % 251) as u8).collect()
    }

    async fn seal(ring: &KeyRing, plaintext: &[u8]) -> Vec<u8> {
        let mut blob = Vec::new();
        let written = encrypt(ring, CONTEXT, plaintext, &mut blob).await.unwrap();
        assert_eq!(written, plaintext.len() as u64);
        blob
    }

    async fn open(ring: &KeyRing, blob: Vec<u8>) -> Result<Vec<u8>, KeyError> {
        let stream = decrypt(ring, CONTEXT, std::io::Cursor::new(blob)).await?;
        let chunks: Vec<Bytes> = stream.try_collect().await?;
        Ok(chunks.concat())
    }

    #[tokio::test]
    async fn round_trips_at_segment_boundaries() {
        let ring = ring("k1");
        for len in [
            0,
            1,
            SEGMENT_BYTES - 1,
            SEGMENT_BYTES,
            SEGMENT_BYTES + 1,
            3 * SEGMENT_BYTES,
            5 * 1024 * 1024 + 7,
        ] {
            let plaintext = data(len);
            let blob = seal(&ring, &plaintext).await;
            let header = BlobHeader::parse(&blob).unwrap().unwrap();
            assert_eq!(header.key_id(), "k1");
            assert!(is_encrypted(&blob));
            assert_eq!(
                plaintext_len(header.len(), blob.len() as u64).unwrap(),
                len as u64,
                "{len}"
            );
            let segments = len.div_ceil(SEGMENT_BYTES).max(1);
            assert_eq!(
                blob.len(),
                header.len() + len + segments * TAG_BYTES,
                "{len}"
            );
            assert_eq!(open(&ring, blob).await.unwrap(), plaintext, "{len}");
        }
    }

    #[tokio::test]
    async fn written_in_odd_pieces_is_the_same_blob_format() {
        let ring = ring("k2");
        let plaintext = data(3 * SEGMENT_BYTES + 100);
        let mut blob = Vec::new();
        let mut encryptor = BlobEncryptor::new(&ring, CONTEXT, &mut blob).await.unwrap();
        for piece in plaintext.chunks(7919) {
            encryptor.write(piece).await.unwrap();
        }
        let (_, len) = encryptor.finish().await.unwrap();
        assert_eq!(len, plaintext.len() as u64);
        assert_eq!(open(&ring, blob).await.unwrap(), plaintext);
    }

    #[tokio::test]
    async fn the_plaintext_is_not_in_the_blob() {
        let ring = ring("k1");
        let marker = b"SHAMAL-PLAINTEXT-MARKER-0123456789";
        let plaintext: Vec<u8> = marker.repeat(5000);
        let blob = seal(&ring, &plaintext).await;
        assert!(!blob.windows(marker.len()).any(|window| window == marker));
    }

    #[tokio::test]
    async fn any_changed_byte_is_refused() {
        let ring = ring("k1");
        let plaintext = data(2 * SEGMENT_BYTES + 10);
        let blob = seal(&ring, &plaintext).await;
        let header_len = BlobHeader::parse(&blob).unwrap().unwrap().len();
        let places = [
            ("magic", 0),
            ("version", 8),
            ("key id length", 9),
            ("key id", 10),
            ("nonce prefix", header_len - 1),
            ("first segment", header_len + 5),
            ("first tag", header_len + SEGMENT_BYTES + 3),
            ("middle segment", header_len + CIPHERTEXT_SEGMENT + 100),
            ("last segment", blob.len() - TAG_BYTES - 2),
            ("last tag", blob.len() - 1),
        ];
        for (place, offset) in places {
            let mut tampered = blob.clone();
            tampered[offset] ^= 0x01;
            let error = open(&ring, tampered).await.unwrap_err();
            let text = error.to_string();
            assert!(
                matches!(
                    error,
                    KeyError::Authentication { .. }
                        | KeyError::Header(_)
                        | KeyError::UnknownKey { .. }
                ),
                "{place}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn truncation_extension_and_swaps_are_refused() {
        let ring = ring("k1");
        let plaintext = data(3 * SEGMENT_BYTES + 10);
        let blob = seal(&ring, &plaintext).await;
        let header_len = BlobHeader::parse(&blob).unwrap().unwrap().len();
        let segment = |index: usize| {
            let start = header_len + index * CIPHERTEXT_SEGMENT;
            start..(start + CIPHERTEXT_SEGMENT).min(blob.len())
        };
        // Cut at a segment boundary: the new last segment was not sealed
        // as last.
        let cut = blob[..segment(2).end].to_vec();
        let error = open(&ring, cut).await.unwrap_err();
        assert!(
            matches!(error, KeyError::Authentication { segment: 2, .. }),
            "{error}"
        );
        // Cut inside a segment, or to the header alone.
        for len in [blob.len() - 1, header_len + 100, header_len, 5] {
            let error = open(&ring, blob[..len].to_vec()).await.unwrap_err();
            assert!(
                matches!(error, KeyError::Authentication { .. } | KeyError::Header(_)),
                "{len}: {error}"
            );
        }
        // Bytes appended after the last segment.
        let mut longer = blob.clone();
        longer.extend_from_slice(&[0u8; 40]);
        assert!(open(&ring, longer).await.is_err());
        // Two segments swapped.
        let mut swapped = blob[..header_len].to_vec();
        swapped.extend_from_slice(&blob[segment(1)]);
        swapped.extend_from_slice(&blob[segment(0)]);
        swapped.extend_from_slice(&blob[segment(2).start..]);
        let error = open(&ring, swapped).await.unwrap_err();
        assert!(
            matches!(error, KeyError::Authentication { segment: 0, .. }),
            "{error}"
        );
        // A segment dropped from the middle.
        let mut dropped = blob[..header_len].to_vec();
        dropped.extend_from_slice(&blob[segment(0)]);
        dropped.extend_from_slice(&blob[segment(2).start..]);
        let error = open(&ring, dropped).await.unwrap_err();
        assert!(
            matches!(error, KeyError::Authentication { segment: 1, .. }),
            "{error}"
        );
        // Segments from another blob under the same key.
        let other = seal(&ring, &plaintext).await;
        let mut spliced = blob[..header_len].to_vec();
        spliced.extend_from_slice(&other[header_len..]);
        assert!(matches!(
            open(&ring, spliced).await.unwrap_err(),
            KeyError::Authentication { segment: 0, .. }
        ));
    }

    #[tokio::test]
    async fn wrong_and_unknown_keys_are_named() {
        let plaintext = data(1000);
        let blob = seal(&ring("k1"), &plaintext).await;
        let wrong = KeyRing::new("k1", [("k1", [9u8; 32].as_slice())]).unwrap();
        let error = open(&wrong, blob.clone()).await.unwrap_err().to_string();
        assert!(
            error.contains("authentication")
                && error.contains("'k1'")
                && error.contains("wrong key"),
            "{error}"
        );
        let other = KeyRing::new("k3", [("k3", [3u8; 32].as_slice())]).unwrap();
        let error = open(&other, blob.clone()).await.unwrap_err().to_string();
        assert!(
            error.contains("key id 'k1'")
                && error.contains("does not hold")
                && error.contains("k3"),
            "{error}"
        );
        let error = open(&ring("k1"), plaintext).await.unwrap_err().to_string();
        assert!(error.contains("magic"), "{error}");
    }

    #[tokio::test]
    async fn a_blob_moved_to_another_context_is_refused() {
        let ring = ring("k1");
        let blob = seal(&ring, b"weights").await;
        let stream = decrypt(&ring, b"another blob", std::io::Cursor::new(blob))
            .await
            .unwrap();
        let error = stream.try_collect::<Vec<Bytes>>().await.unwrap_err();
        assert!(
            matches!(error, KeyError::Authentication { segment: 0, .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn blobs_under_an_old_key_stay_readable_after_rotation() {
        let plaintext = data(SEGMENT_BYTES + 3);
        let old = seal(&ring("k1"), &plaintext).await;
        let rotated = ring("k2");
        let new = seal(&rotated, &plaintext).await;
        assert_eq!(BlobHeader::parse(&old).unwrap().unwrap().key_id(), "k1");
        assert_eq!(BlobHeader::parse(&new).unwrap().unwrap().key_id(), "k2");
        assert_eq!(open(&rotated, old.clone()).await.unwrap(), plaintext);
        assert_eq!(open(&rotated, new).await.unwrap(), plaintext);
        // With k1 gone, its blobs name it.
        let only_k2 = KeyRing::new("k2", [("k2", [2u8; 32].as_slice())]).unwrap();
        let error = open(&only_k2, old).await.unwrap_err().to_string();
        assert!(error.contains("'k1'"), "{error}");
    }

    #[test]
    fn headers_and_lengths() {
        assert_eq!(BlobHeader::parse(b"").unwrap(), None);
        assert_eq!(BlobHeader::parse(b"PK\x03\x04 zip").unwrap(), None);
        assert_eq!(BlobHeader::parse(&MAGIC[..5]).unwrap(), None);
        assert!(BlobHeader::parse(&MAGIC).is_err());
        let mut future = MAGIC.to_vec();
        future.extend_from_slice(&[2, 2, b'k', b'1', 0, 0, 0, 0, 0, 0, 0]);
        let error = BlobHeader::parse(&future).unwrap_err().to_string();
        assert!(error.contains("version 2"), "{error}");
        assert!(plaintext_len(20, 19).is_err());
        assert!(plaintext_len(20, 35).is_err());
        assert_eq!(plaintext_len(20, 36).unwrap(), 0);
        // A full segment then a bare tag is not something this crate writes.
        let odd = 20 + CIPHERTEXT_SEGMENT as u64 + TAG_BYTES as u64;
        assert!(plaintext_len(20, odd).is_err());
    }
}
