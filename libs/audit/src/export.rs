//! The export file: JSON Lines, one [`Line`] per line.

use serde::{Deserialize, Serialize};

use crate::{Checkpoint, Record, Seal, Tombstone};

/// One line of an export file: a JSON object whose `"type"` member says
/// which (`"record"`, `"checkpoint"`, `"tombstone"`, `"seal"`), the other
/// members being that item's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one line at a time: boxing would buy nothing
pub enum Line {
    /// A record.
    Record(Record),
    /// A checkpoint, right after the record it covers.
    Checkpoint(Checkpoint),
    /// A tombstone, where the removed range was.
    Tombstone(Tombstone),
    /// The seal: always the last line.
    Seal(Seal),
}

/// Writes `line` as one JSON object followed by `\n`.
pub fn write_line(w: &mut impl std::io::Write, line: &Line) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, line)?;
    w.write_all(b"\n")
}

/// Parses one line (without its `\n`).
pub fn parse_line(text: &str) -> Result<Line, serde_json::Error> {
    serde_json::from_str(text)
}
