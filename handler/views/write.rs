//! Rows written as CSV (RFC 4180, with or without a header) or NDJSON (one object a row).

use std::io::Write;

use serde_json::Value;

use super::Row;

/// The formats a view's rows are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv {
        header: bool,
    },
    Ndjson,
    /// Parquet files (see `parquet`): not lines, written by `parquet::ParquetRows`.
    Parquet,
}

impl Format {
    /// `csv`, `ndjson`, `parquet` or their media types (`text/csv`, `application/x-ndjson`,
    /// `application/ndjson`, `application/fhir+ndjson`, `application/vnd.apache.parquet`).
    pub fn parse(text: &str) -> Option<Format> {
        Some(match text {
            "csv" | "text/csv" => Format::Csv { header: true },
            "ndjson"
            | "application/x-ndjson"
            | "application/ndjson"
            | "application/fhir+ndjson" => Format::Ndjson,
            "parquet" | "application/vnd.apache.parquet" => Format::Parquet,
            _ => return None,
        })
    }
}

/// The file extension and line end of a format's files.
pub fn file_kind(format: Format) -> (&'static str, &'static [u8]) {
    match format {
        Format::Csv { .. } => ("csv", b"\r\n"),
        Format::Ndjson => ("ndjson", b"\n"),
        Format::Parquet => ("parquet", b""),
    }
}

/// The line a file of the format starts with (CSV's column names), without its end.
pub fn header_line(format: Format, columns: &[&str]) -> Option<Vec<u8>> {
    match format {
        Format::Csv { header: true } => {
            let cells: Vec<String> = columns.iter().map(|c| csv_field(c)).collect();
            Some(cells.join(",").into_bytes())
        }
        _ => None,
    }
}

/// One row as a line of the format, without its end.
pub fn line(format: Format, row: &Row) -> Vec<u8> {
    match format {
        Format::Ndjson => {
            let object: serde_json::Map<String, Value> = row.iter().cloned().collect();
            serde_json::to_vec(&object).expect("JSON")
        }
        Format::Csv { .. } => {
            let cells: Vec<String> = row.iter().map(|(_, value)| csv_cell(value)).collect();
            cells.join(",").into_bytes()
        }
        Format::Parquet => unreachable!("Parquet rows are written by ParquetRows, not as lines"),
    }
}

/// Writes the header line a format has (CSV's column names).
pub fn header(
    out: &mut (impl Write + ?Sized),
    format: Format,
    columns: &[&str],
) -> std::io::Result<()> {
    if let Some(header) = header_line(format, columns) {
        out.write_all(&header)?;
        out.write_all(file_kind(format).1)?;
    }
    Ok(())
}

/// Writes one row, with its line end.
pub fn row(out: &mut (impl Write + ?Sized), format: Format, row: &Row) -> std::io::Result<()> {
    out.write_all(&line(format, row))?;
    out.write_all(file_kind(format).1)
}

/// A value as a CSV field: null empty, a string as itself, a list or object as its JSON.
fn csv_cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => csv_field(text),
        other => csv_field(&other.to_string()),
    }
}

/// RFC 4180: a field with a comma, a quote or a line break is quoted, its quotes doubled.
fn csv_field(text: &str) -> String {
    match text.contains([',', '"', '\n', '\r']) {
        true => format!("\"{}\"", text.replace('"', "\"\"")),
        false => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_rfc_4180_asks_and_ndjson_keeps_types() {
        let row: Row = vec![
            ("id".into(), "a,b".into()),
            ("n".into(), Value::from(2)),
            ("q".into(), "say \"hi\"".into()),
            ("none".into(), Value::Null),
        ];
        let mut csv = Vec::new();
        header(
            &mut csv,
            Format::Csv { header: true },
            &["id", "n", "q", "none"],
        )
        .unwrap();
        super::row(&mut csv, Format::Csv { header: true }, &row).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "id,n,q,none\r\n\"a,b\",2,\"say \"\"hi\"\"\",\r\n"
        );
        let mut ndjson = Vec::new();
        super::row(&mut ndjson, Format::Ndjson, &row).unwrap();
        assert_eq!(
            String::from_utf8(ndjson).unwrap(),
            "{\"id\":\"a,b\",\"n\":2,\"q\":\"say \\\"hi\\\"\",\"none\":null}\n"
        );
    }
}
