//! Test datasets: the same rows written as Parquet, JSON Lines and CSV.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, Int64Array, ListBuilder, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// One input row: a key, a 4-vector and a text.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub id: i64,
    pub x: Vec<f32>,
    pub text: String,
}

/// `count` rows with varied values (vectors of exactly representable
/// floats, texts with commas and quotes).
pub fn rows(count: usize) -> Vec<Row> {
    (0..count)
        .map(|index| {
            let i = index as f32;
            Row {
                id: 1000 + index as i64,
                x: vec![i, i * 0.5, -i, 1.25],
                text: format!("row {index}, \"quoted\" {}", "ü".repeat(index % 5)),
            }
        })
        .collect()
}

pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "x",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            true,
        ),
        Field::new("text", DataType::Utf8, true),
    ]))
}

pub fn batch(rows: &[Row]) -> RecordBatch {
    let mut x = ListBuilder::new(Float32Builder::new());
    for row in rows {
        for value in &row.x {
            x.values().append_value(*value);
        }
        x.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|row| row.id))),
        Arc::new(x.finish()),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|row| row.text.as_str()),
        )),
    ];
    RecordBatch::try_new(schema(), columns).expect("batch")
}

/// Writes `batch` as Parquet with row groups of `group_rows` rows.
pub fn write_parquet(path: &Path, batch: &RecordBatch, group_rows: usize) {
    let file = std::fs::File::create(path).expect("create");
    let properties = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group_rows.max(1)))
        .build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties)).expect("writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
}

pub fn write_jsonl(path: &Path, rows: &[Row]) {
    let mut text = String::new();
    for row in rows {
        let line = serde_json::json!({"id": row.id, "x": row.x, "text": row.text});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).expect("write jsonl");
}

/// CSV quoting: fields in double quotes, quotes doubled.
pub fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

pub fn write_csv(path: &Path, rows: &[Row]) {
    let mut text = String::from("id,x,text\n");
    for row in rows {
        let vector = format!(
            "[{}]",
            row.x
                .iter()
                .map(|value| value.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        text.push_str(&format!(
            "{},{},{}\n",
            row.id,
            quote(&vector),
            quote(&row.text)
        ));
    }
    std::fs::write(path, text).expect("write csv");
}
