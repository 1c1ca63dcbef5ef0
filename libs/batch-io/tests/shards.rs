//! Every row belongs to exactly one shard, whatever the file and the shard
//! size.

mod common;

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use futures::StreamExt;
use proptest::prelude::*;
use shamal_batch_io::{Dataset, Format, Shard, Span, read_shard};

/// The ids of every shard's rows, concatenated in shard order.
async fn ids_by_shard(path: &Path, target_rows: u64, batch_size: usize) -> (Vec<i64>, Vec<Shard>) {
    let dataset = Dataset::open(path.to_str().expect("utf-8"), None)
        .await
        .expect("open");
    let shards = dataset.plan_shards(target_rows);
    let mut ids = Vec::new();
    let columns = vec!["id".to_owned(), "text".to_owned()];
    for (index, shard) in shards.iter().enumerate() {
        assert_eq!(shard.index, index);
        let mut stream = read_shard(shard, &columns, batch_size).await.expect("read");
        while let Some(batch) = stream.next().await {
            let batch = batch.expect("batch").batch;
            let column = batch.column(0).as_primitive::<Int64Type>();
            assert_eq!(column.null_count(), 0);
            ids.extend(column.values().iter().copied());
        }
    }
    (ids, shards)
}

fn text_rows() -> impl Strategy<Value = Vec<(i64, String)>> {
    // Lines from a few bytes to a few hundred, with commas and quotes.
    prop::collection::vec(("[a-z ,\"]{0,40}", 0usize..4), 0..60).prop_map(|cells| {
        cells
            .into_iter()
            .enumerate()
            .map(|(index, (text, repeat))| {
                (index as i64, format!("t{}", text.repeat(repeat * 3 + 1)))
            })
            .collect()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn byte_range_shards_cover_every_line_once(
        rows in text_rows(),
        csv in any::<bool>(),
        target_rows in 1u64..20,
        batch_size in 1usize..9,
        trailing_newline in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::new();
        let path = if csv {
            text.push_str("id,text\n");
            for (id, cell) in &rows {
                text.push_str(&format!("{id},{}\n", common::quote(cell)));
            }
            dir.path().join("in.csv")
        } else {
            for (id, cell) in &rows {
                text.push_str(&serde_json::json!({"id": id, "text": cell}).to_string());
                text.push('\n');
            }
            dir.path().join("in.jsonl")
        };
        if !trailing_newline && !rows.is_empty() {
            text.pop();
        }
        if rows.is_empty() && !csv {
            // An empty JSON Lines file has no schema to infer; skip.
            return Ok(());
        }
        std::fs::write(&path, &text).expect("write");
        let (ids, shards) = runtime().block_on(ids_by_shard(&path, target_rows, batch_size));
        let expected: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        prop_assert_eq!(ids, expected);
        // The ranges tile the file after the header, in order.
        let mut position = if csv { "id,text\n".len() as u64 } else { 0 };
        for shard in &shards {
            prop_assert_eq!(shard.format, if csv { Format::Csv } else { Format::JsonLines });
            let Span::Bytes { start, end } = shard.span else { panic!("byte shard") };
            prop_assert_eq!(start, position);
            prop_assert!(end > start);
            position = end;
        }
        if !shards.is_empty() {
            prop_assert_eq!(position, text.len() as u64);
        }
    }

    #[test]
    fn row_group_shards_cover_every_row_once(
        count in 0usize..80,
        group_rows in 1usize..17,
        target_rows in 1u64..40,
        batch_size in 1usize..9,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows = common::rows(count);
        let path = dir.path().join("in.parquet");
        common::write_parquet(&path, &common::batch(&rows), group_rows);
        let (ids, shards) = runtime().block_on(ids_by_shard(&path, target_rows, batch_size));
        let expected: Vec<i64> = rows.iter().map(|row| row.id).collect();
        prop_assert_eq!(ids, expected);
        let mut first_row = 0;
        for shard in &shards {
            prop_assert_eq!(shard.first_row, Some(first_row));
            first_row += shard.rows;
        }
        prop_assert_eq!(first_row, count as u64);
    }
}

#[test]
fn a_line_longer_than_several_shards_is_read_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.jsonl");
    let mut text = String::new();
    for id in 0..20 {
        text.push_str(&serde_json::json!({"id": id, "text": "t"}).to_string());
        text.push('\n');
    }
    // One line of 200 kB among short ones: several of the planned byte
    // ranges fall inside it and own no line start.
    text.push_str(&serde_json::json!({"id": 20, "text": "x".repeat(200_000)}).to_string());
    text.push('\n');
    text.push_str(&serde_json::json!({"id": 21, "text": "t"}).to_string());
    std::fs::write(&path, &text).expect("write");
    let (ids, shards) = runtime().block_on(ids_by_shard(&path, 2, 4));
    assert_eq!(ids, (0..22).collect::<Vec<i64>>());
    assert!(shards.len() > 5, "{} shards", shards.len());
}
