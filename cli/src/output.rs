//! Aligned tables and value formatting for the registry commands.

use serde_json::Value;

/// A table printed with aligned columns.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|header| header.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (index, cell) in row.iter().enumerate().take(columns) {
                widths[index] = widths[index].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (index, width) in widths.iter().enumerate() {
                let cell = row.get(index).map(String::as_str).unwrap_or_default();
                line.push_str(cell);
                if index + 1 < columns {
                    let pad = width - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Prints `label: value` lines with the values aligned.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0);
    for (label, value) in fields {
        println!(
            "{label:<width$}  {value}",
            width = width + 1,
            label = format!("{label}:")
        );
    }
}

pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

pub fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn time(value: &Value) -> String {
    let Some(millis) = value.as_i64() else {
        return String::new();
    };
    if millis <= 0 {
        return "-".to_owned();
    }
    let seconds = millis.div_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

pub fn bytes(value: &Value) -> String {
    let Some(size) = value.as_u64() else {
        return String::new();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut amount = size as f64;
    let mut unit = 0;
    while amount >= 1024.0 && unit + 1 < units.len() {
        amount /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{size} B")
    } else {
        format!("{amount:.1} {}", units[unit])
    }
}

/// `v1:90% v2:10%`
pub fn splits(value: &Value) -> String {
    value
        .as_array()
        .map(|splits| {
            splits
                .iter()
                .map(|split| format!("v{}:{}%", text(&split["version"]), text(&split["weight"])))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub fn short_digest(value: &Value) -> String {
    text(value).chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_times_are_utc() {
        let mut table = Table::new(&["name", "latest"]);
        table.row(vec!["fraud-detector".to_owned(), "3".to_owned()]);
        table.row(vec!["a".to_owned(), "12".to_owned()]);
        assert_eq!(
            table.render(),
            "NAME            LATEST\nfraud-detector  3\na               12\n"
        );
        assert_eq!(time(&json!(0)), "-");
        assert_eq!(time(&json!(1_700_000_000_123_i64)), "2023-11-14 22:13:20");
        assert_eq!(time(&json!(951_782_400_000_i64)), "2000-02-29 00:00:00");
        assert_eq!(bytes(&json!(1536)), "1.5 KiB");
        assert_eq!(bytes(&json!(12)), "12 B");
        assert_eq!(
            splits(&json!([{"version": 1, "weight": 90}, {"version": 2, "weight": 10}])),
            "v1:90% v2:10%"
        );
    }
}
