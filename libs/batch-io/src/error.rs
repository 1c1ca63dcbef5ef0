//! The one error type of the crate.

/// A batch data failure. Every variant names what is at fault (a column and
/// a row, a file, a path) so that the job's owner learns what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path that cannot be read (missing, no permission, ...), with the
    /// operating system's error.
    #[error("cannot read '{path}': {source}")]
    UnreadablePath {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A location the object store could not list or read.
    #[error("cannot read '{path}': {reason}")]
    Store { path: String, reason: String },
    /// A location whose format cannot be told, or that holds no data file.
    #[error("'{path}': {reason}")]
    Format { path: String, reason: String },
    /// A column the model or the job needs is not in the dataset.
    #[error("column '{column}' (needed for {needed_for}) not found in {file}; its columns are: {}", available.join(", "))]
    MissingColumn {
        column: String,
        needed_for: String,
        file: String,
        available: Vec<String>,
    },
    /// A column of a type the input cannot be read from.
    #[error("column '{column}': expected {expected}, found {found}")]
    WrongType {
        column: String,
        expected: String,
        found: String,
    },
    /// A model input batch inference cannot feed (shape, datatype).
    #[error("input '{input}': {reason}")]
    UnsupportedInput { input: String, reason: String },
    /// One row's value does not fit its input (null, wrong vector length,
    /// out of range). `row` counts from 0 at the start of `location`.
    #[error("column '{column}', row {row} of {location}: {reason}")]
    BadRow {
        column: String,
        row: u64,
        location: String,
        reason: String,
    },
    /// A file that cannot be decoded: corrupt or truncated Parquet, invalid
    /// JSON or UTF-8, a malformed CSV record.
    #[error("corrupt file '{file}': {reason}")]
    CorruptFile { file: String, reason: String },
    /// A model response that does not fit the batch it answers.
    #[error("output '{output}': {reason}")]
    BadOutput { output: String, reason: String },
    /// Writing the output (part files, manifest) failed.
    #[error("cannot write '{path}': {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A part that cannot be encrypted or decrypted: no such key, the
    /// wrong key, changed bytes.
    #[error("cannot encrypt or decrypt '{path}': {reason}")]
    Encryption { path: String, reason: String },
    /// An output directory that does not match its manifest.
    #[error("output '{path}' does not match its manifest: {reason}")]
    Verify { path: String, reason: String },
}

/// `text` on one line: an object store's error may carry the server's
/// multi-line XML answer.
pub(crate) fn one_line(text: impl ToString) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The error of a Parquet read: the store's (the object is gone, the
/// endpoint does not answer) as [`Error::Store`], anything else as the
/// file being corrupt.
pub(crate) fn parquet_error(file: &str, error: parquet::errors::ParquetError) -> Error {
    match error {
        parquet::errors::ParquetError::External(inner)
            if inner.downcast_ref::<object_store::Error>().is_some() =>
        {
            Error::Store {
                path: file.to_owned(),
                reason: one_line(inner),
            }
        }
        other => Error::CorruptFile {
            file: file.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
