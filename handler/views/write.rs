//! Rows written as CSV (RFC 4180, with or without a header) or NDJSON (one object a row).

use std::io::Write;

use serde_json::Value;

use super::Row;

/// The formats a view's rows are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv { header: bool },
    Ndjson,
}

impl Format {
    /// `csv`, `ndjson` or their media types (`text/csv`, `application/x-ndjson`,
    /// `application/ndjson`, `application/fhir+ndjson`).
    pub fn parse(text: &str) -> Option<Format> {
        Some(match text {
            "csv" | "text/csv" => Format::Csv { header: true },
            "ndjson"
            | "application/x-ndjson"
            | "application/ndjson"
            | "application/fhir+ndjson" => Format::Ndjson,
            _ => return None,
        })
    }
}

/// Writes the header line a format has (CSV's column names).
pub fn header(
    out: &mut (impl Write + ?Sized),
    format: Format,
    columns: &[&str],
) -> std::io::Result<()> {
    if let Format::Csv { header: true } = format {
        let cells: Vec<String> = columns.iter().map(|c| csv_field(c)).collect();
        out.write_all(cells.join(",").as_bytes())?;
        out.write_all(b"\r\n")?;
    }
    Ok(())
}

/// Writes one row.
pub fn row(out: &mut (impl Write + ?Sized), format: Format, row: &Row) -> std::io::Result<()> {
    match format {
        Format::Ndjson => {
            let object: serde_json::Map<String, Value> = row.iter().cloned().collect();
            serde_json::to_writer(&mut *out, &object)?;
            out.write_all(b"\n")
        }
        Format::Csv { .. } => {
            let cells: Vec<String> = row.iter().map(|(_, value)| csv_cell(value)).collect();
            out.write_all(cells.join(",").as_bytes())?;
            out.write_all(b"\r\n")
        }
    }
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
