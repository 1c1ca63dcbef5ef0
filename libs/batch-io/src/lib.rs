//! The data layer of batch inference: reading datasets, checking them
//! against a model, splitting them into shards, turning rows into KServe v2
//! tensors and back, and writing the output parts and their manifest.
//!
//! The batch coordinator and the workers' batch role are built on it; this
//! crate knows nothing about either.
//!
//! # Flow
//!
//! 1. [`Dataset::open`] a location: a file, or a directory of files of one
//!    [`Format`] (Parquet, JSON Lines, CSV), read through the `object_store`
//!    crate's [`ObjectStore`](object_store::ObjectStore) trait: local paths
//!    and S3-compatible object storage (`s3://bucket/prefix`, settings from
//!    the environment and [`configure_s3`]), mapped at [`store_for`].
//!    CSV and JSON Lines schemas are inferred from the first rows.
//! 2. [`Dataset::check`] the schema against the model's inputs
//!    ([`ModelInput`]) and the key columns, before any work is done: errors
//!    name the column, what was expected and what was found.
//! 3. [`Dataset::plan_shards`] splits it into self-contained, serialisable
//!    [`Shard`]s: runs of whole Parquet row groups, or byte ranges of JSON
//!    Lines / CSV files where a shard owns every line that *starts* inside
//!    its range. Every row belongs to exactly one shard.
//! 4. [`read_shard`] streams a shard's rows as Arrow record batches, only the
//!    columns asked for.
//! 5. [`to_infer_request`] turns a batch's input columns into a
//!    `ModelInferRequest` (raw little-endian contents), and
//!    [`outputs_to_columns`] a `ModelInferResponse` back into Arrow columns;
//!    [`input_tensors`] and [`tensors_to_columns`] do the same for a caller
//!    that runs the model in process (no request to encode and decode).
//! 6. [`PartWriter`] writes one Parquet part per shard (`part-000042.parquet`)
//!    in an [`Output`] (a local directory or an object-store prefix),
//!    atomically replaced on a re-run, and [`Manifest`] records the parts,
//!    their row counts and SHA-256 checksums, written last with `_SUCCESS`.
//!    Parts may be encrypted at rest ([`PartEncryption`]: AES-256-GCM in the
//!    `shamal-keys` blob format, `part-000042.parquet.enc`), and
//!    [`decrypt_dataset`] turns such an output back into plain Parquet.
//!
//! See `docs/batch.md` ("Formats and column mapping") for the rules a
//! dataset has to follow.

mod convert;
mod dataset;
mod decrypt;
mod error;
mod format;
mod location;
mod output;
mod parquet_store;
mod read;
mod schema;
mod shard;

pub use convert::{
    RowOrigin, input_tensors, outputs_to_columns, tensors_to_columns, to_infer_request,
};
pub use dataset::{DataFile, Dataset};
pub use decrypt::decrypt_dataset;
pub use error::{Error, Result};
pub use format::Format;
pub use location::{
    Output, S3Options, check_location, configure_s3, is_object_store_url, store_for,
};
pub use output::{
    CommitFence, ENCRYPTED_SUFFIX, MANIFEST_FILE, MANIFEST_FORMAT_VERSION, Manifest,
    ManifestEncryption, PartEncryption, PartInfo, PartWriter, SUCCESS_FILE, StagedPart,
    encrypted_part_name, is_part_name, is_temporary_part_name, part_context, part_name,
    part_writer_properties, remove_temporary_parts,
};
pub use read::{ShardBatch, ShardStream, read_shard};
pub use schema::{InputKind, ModelInput};
/// The key ring parts are encrypted under (`shamal-keys`, the key provider
/// of the registry's artifact store).
pub use shamal_keys::{KeyError, KeyRing};
pub use shard::{Shard, Span};
