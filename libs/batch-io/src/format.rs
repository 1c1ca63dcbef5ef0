//! Dataset file formats.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The format of a dataset's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Apache Parquet (`.parquet`).
    Parquet,
    /// JSON Lines: one JSON object per line (`.jsonl`, `.ndjson`).
    JsonLines,
    /// CSV with a header line, comma separated (`.csv`).
    Csv,
}

impl Format {
    /// The format of a file name, from its extension (case-insensitive);
    /// `None` for any other extension.
    pub fn from_path(path: &str) -> Option<Format> {
        let extension = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match extension.as_str() {
            "parquet" => Some(Format::Parquet),
            "jsonl" | "ndjson" => Some(Format::JsonLines),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    /// Parses a format name: `parquet`, `jsonl` (or `ndjson`, `jsonlines`),
    /// `csv`.
    pub fn parse(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "parquet" => Some(Format::Parquet),
            "jsonl" | "ndjson" | "jsonlines" => Some(Format::JsonLines),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    /// The format's short name (`parquet`, `jsonl`, `csv`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::JsonLines => "jsonl",
            Format::Csv => "csv",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_extensions_and_names() {
        assert_eq!(Format::from_path("a/b.parquet"), Some(Format::Parquet));
        assert_eq!(Format::from_path("b.JSONL"), Some(Format::JsonLines));
        assert_eq!(Format::from_path("b.ndjson"), Some(Format::JsonLines));
        assert_eq!(Format::from_path("x.csv"), Some(Format::Csv));
        assert_eq!(Format::from_path("x.txt"), None);
        assert_eq!(Format::from_path("csv"), None);
        for format in [Format::Parquet, Format::JsonLines, Format::Csv] {
            assert_eq!(Format::parse(format.as_str()), Some(format));
        }
        assert_eq!(Format::parse("orc"), None);
    }
}
