//! Splitting a dataset into shards.

use arrow::datatypes::Schema;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::format::Format;

/// The part of one file a shard covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Span {
    /// Parquet: the row groups `first .. first + count` (whole groups).
    RowGroups { first: usize, count: usize },
    /// JSON Lines / CSV: the byte range `start .. end`. The shard owns every
    /// line that *starts* inside it: a line starts at byte 0 or right after
    /// a `\n`. A CSV file's header line belongs to no shard.
    Bytes { start: u64, end: u64 },
}

/// A unit of work: part of one file, self-contained (a worker reads it with
/// [`crate::read_shard`] and nothing else) and serialisable (JSON through
/// serde) so that it can be stored and queued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    /// Its position in the dataset's plan, from 0; names its output part.
    pub index: usize,
    /// The file, as [`crate::store_for`] takes it.
    pub file: String,
    /// The file's size in bytes when planned.
    pub file_size: u64,
    pub format: Format,
    pub span: Span,
    /// The file row number of its first row, when known (Parquet); JSON
    /// Lines and CSV rows are numbered from the start of the shard.
    pub first_row: Option<u64>,
    /// Its row count: exact for Parquet (from the footer), estimated from
    /// the average line length of the file's head for JSON Lines and CSV.
    pub rows: u64,
    /// The schema the lines are decoded with (JSON Lines, CSV): the one
    /// inferred when the dataset was opened, so that every shard of a file
    /// reads it alike. `None` for Parquet, whose files carry theirs.
    pub schema: Option<Schema>,
}

impl Shard {
    /// The shard's place in words, for errors: `file '/d/a.parquet'` when
    /// rows are numbered from the start of the file, `shard 3 ('/d/a.csv'
    /// bytes 100..200)` otherwise.
    pub fn location(&self) -> String {
        match (&self.span, self.first_row) {
            (_, Some(_)) => format!("file '{}'", self.file),
            (Span::Bytes { start, end }, None) => {
                format!(
                    "shard {} ('{}' bytes {start}..{end})",
                    self.index, self.file
                )
            }
            (Span::RowGroups { first, count }, None) => format!(
                "shard {} ('{}' row groups {first}..{})",
                self.index,
                self.file,
                first + count
            ),
        }
    }
}

impl Dataset {
    /// Splits the dataset into shards of about `target_rows` rows each,
    /// numbered from 0 across its files, in file order.
    ///
    /// Parquet: runs of whole row groups of one file, adding groups until
    /// the run has at least `target_rows` rows (a row group larger than that
    /// is a shard of its own). JSON Lines / CSV: byte ranges of one file of
    /// about `target_rows` average lines each; since a shard owns the lines
    /// that start in it, ranges need not fall on line boundaries, and a
    /// range in which no line starts (inside one very long line) simply
    /// reads no row. Every row belongs to exactly one shard.
    pub fn plan_shards(&self, target_rows: u64) -> Vec<Shard> {
        let target_rows = target_rows.max(1);
        let mut shards = Vec::new();
        for file in self.files() {
            match self.format() {
                Format::Parquet => {
                    let mut first = 0;
                    let mut first_row = 0;
                    while first < file.row_groups.len() {
                        let mut count = 0;
                        let mut rows = 0;
                        while first + count < file.row_groups.len() && rows < target_rows {
                            rows += file.row_groups[first + count];
                            count += 1;
                        }
                        shards.push(Shard {
                            index: shards.len(),
                            file: file.path.clone(),
                            file_size: file.size,
                            format: Format::Parquet,
                            span: Span::RowGroups { first, count },
                            first_row: Some(first_row),
                            rows,
                            schema: None,
                        });
                        first += count;
                        first_row += rows;
                    }
                }
                Format::JsonLines | Format::Csv => {
                    let chunk = ((target_rows as f64) * file.bytes_per_row).ceil().max(1.0) as u64;
                    let mut start = file.header_len;
                    while start < file.size {
                        let end = file.size.min(start.saturating_add(chunk));
                        shards.push(Shard {
                            index: shards.len(),
                            file: file.path.clone(),
                            file_size: file.size,
                            format: self.format(),
                            span: Span::Bytes { start, end },
                            first_row: None,
                            rows: ((end - start) as f64 / file.bytes_per_row).round() as u64,
                            schema: Some(file.schema.as_ref().clone()),
                        });
                        start = end;
                    }
                }
            }
        }
        shards
    }
}
