//! `handler view run`: a view over NDJSON files (or `.gz` of them), streamed line by line, its
//! rows written as CSV or NDJSON.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use super::parquet::{FileSink, ParquetRows};
use super::write::{self, Format};
use super::{rows_of, View};

/// What a run over files did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunSummary {
    pub resources: u64,
    pub rows: u64,
}

/// Reads the view at `view_path`, runs it over every resource of `inputs` and writes the rows to
/// `out`. An error names the file and line.
pub fn run_view_over_files(
    view_path: &Path,
    inputs: &[PathBuf],
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<RunSummary> {
    let text = std::fs::read(view_path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", view_path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", view_path.display()))?;
    let view = View::parse(&json).map_err(|e| anyhow::anyhow!("{}: {e}", view_path.display()))?;
    let names: Vec<&str> = view.columns().iter().map(|c| c.name.as_str()).collect();
    write::header(out, format, &names)?;
    let mut parquet = (format == Format::Parquet).then(|| ParquetRows::new(&view));
    let mut summary = RunSummary::default();
    for input in inputs {
        let file = std::fs::File::open(input)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", input.display()))?;
        let reader: Box<dyn BufRead> = match input.extension().is_some_and(|e| e == "gz") {
            true => Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
                file,
            ))),
            false => Box::new(std::io::BufReader::new(file)),
        };
        for (number, line) in reader.split(b'\n').enumerate() {
            let line = line?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            summary.resources += 1;
            let rows = rows_of(&view, &line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", input.display(), number + 1))?;
            for row in rows {
                match parquet.as_mut() {
                    Some(parquet) => parquet.push(row, &mut FileSink(&mut *out))?,
                    None => write::row(out, format, &row)?,
                }
                summary.rows += 1;
            }
        }
    }
    if let Some(parquet) = parquet.as_mut() {
        parquet.finish(&mut FileSink(&mut *out))?;
    }
    out.flush()?;
    Ok(summary)
}
