//! A view's rows as Parquet files, through the `parquet` crate's own column writers (no Arrow:
//! a view's few flat columns need none of it, and it would double the crate's build).
//!
//! Column types follow the view's `type`: `boolean` BOOLEAN; `integer`, `positiveInt`,
//! `unsignedInt` INT32; `integer64` INT64; `decimal` DOUBLE; every other type (strings, codes,
//! ids, and `date`, `dateTime`, `instant`, `time`, kept as written, partial precision and zone
//! included) a UTF8 string. A column without a type, or with `collection: true`, is a UTF8 string
//! of the value's JSON. Every column is OPTIONAL (null for no value). Rows are buffered in row
//! groups of at most `ROW_GROUP_ROWS`; a file ends at the first row group past the size limit.

use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use serde_json::Value;

use super::{Row, View};
use crate::storage::{RollingNdjsonWriter, StorageError};

/// Where Parquet bytes go: the export's rolling files, or one local file.
pub trait ParquetSink {
    /// Appends bytes of the current file holding `rows` rows (opening one when none is).
    fn raw(&mut self, bytes: &[u8], rows: u64) -> Result<(), StorageError>;
    /// Ends the current file.
    fn roll(&mut self) -> Result<(), StorageError>;
    /// Whether the current file has reached its size.
    fn is_full(&self) -> bool;
}

impl ParquetSink for RollingNdjsonWriter {
    fn raw(&mut self, bytes: &[u8], rows: u64) -> Result<(), StorageError> {
        RollingNdjsonWriter::raw(self, bytes, rows)
    }

    fn roll(&mut self) -> Result<(), StorageError> {
        RollingNdjsonWriter::roll(self)
    }

    fn is_full(&self) -> bool {
        self.file_bytes() >= self.max_bytes()
    }
}

/// One local file (`handler view run --format parquet`).
pub struct FileSink<W: std::io::Write>(pub W);

impl<W: std::io::Write> ParquetSink for FileSink<W> {
    fn raw(&mut self, bytes: &[u8], _rows: u64) -> Result<(), StorageError> {
        self.0
            .write_all(bytes)
            .map_err(|e| StorageError::io("parquet file", e))
    }

    fn roll(&mut self) -> Result<(), StorageError> {
        self.0
            .flush()
            .map_err(|e| StorageError::io("parquet file", e))
    }

    fn is_full(&self) -> bool {
        false
    }
}

/// Rows per row group: bounds the memory a shard holds (a few MB for a view's columns).
pub const ROW_GROUP_ROWS: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int32,
    Int64,
    Double,
    Text,
}

fn kind_of(ty: Option<&str>, collection: bool) -> Kind {
    if collection {
        return Kind::Text;
    }
    match ty {
        Some("boolean") => Kind::Bool,
        Some("integer" | "positiveInt" | "unsignedInt") => Kind::Int32,
        Some("integer64") => Kind::Int64,
        Some("decimal") => Kind::Double,
        _ => Kind::Text,
    }
}

/// Writes a view's rows as Parquet files into a rolling writer.
pub struct ParquetRows {
    schema: Arc<Type>,
    kinds: Vec<Kind>,
    properties: Arc<WriterProperties>,
    file: Option<SerializedFileWriter<Vec<u8>>>,
    buffered: Vec<Row>,
}

fn parquet_error(error: parquet::errors::ParquetError) -> StorageError {
    StorageError::io("parquet", std::io::Error::other(error.to_string()))
}

impl ParquetRows {
    pub fn new(view: &View) -> ParquetRows {
        let columns = view.columns();
        let kinds: Vec<Kind> = columns
            .iter()
            .map(|c| kind_of(c.ty.as_deref(), c.collection))
            .collect();
        let fields: Vec<String> = columns
            .iter()
            .zip(&kinds)
            .map(|(column, kind)| {
                let ty = match kind {
                    Kind::Bool => "BOOLEAN",
                    Kind::Int32 => "INT32",
                    Kind::Int64 => "INT64",
                    Kind::Double => "DOUBLE",
                    Kind::Text => "BYTE_ARRAY",
                };
                let annotation = match kind {
                    Kind::Text => " (UTF8)",
                    _ => "",
                };
                format!("OPTIONAL {ty} {}{annotation};", column.name)
            })
            .collect();
        let message = format!("message view {{ {} }}", fields.join(" "));
        let schema = parquet::schema::parser::parse_message_type(&message)
            .expect("column names are checked names");
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("fhir-export".into())
            .build();
        ParquetRows {
            schema: Arc::new(schema),
            kinds,
            properties: Arc::new(properties),
            file: None,
            buffered: Vec::new(),
        }
    }

    /// Adds a row; a full row group is written.
    pub fn push(&mut self, row: Row, out: &mut dyn ParquetSink) -> Result<(), StorageError> {
        self.buffered.push(row);
        if self.buffered.len() >= ROW_GROUP_ROWS {
            self.write_group(out)?;
        }
        Ok(())
    }

    /// Writes what is buffered and ends the file (at a scan's end or pause).
    pub fn finish(&mut self, out: &mut dyn ParquetSink) -> Result<(), StorageError> {
        if !self.buffered.is_empty() {
            self.write_group(out)?;
        }
        self.end_file(out)
    }

    fn write_group(&mut self, out: &mut dyn ParquetSink) -> Result<(), StorageError> {
        let rows = std::mem::take(&mut self.buffered);
        if self.file.is_none() {
            let file =
                SerializedFileWriter::new(Vec::new(), self.schema.clone(), self.properties.clone())
                    .map_err(parquet_error)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        let mut group = file.next_row_group().map_err(parquet_error)?;
        let mut index = 0;
        while let Some(mut column) = group.next_column().map_err(parquet_error)? {
            let cells = rows.iter().map(|row| &row[index].1);
            let levels: Vec<i16> = rows
                .iter()
                .map(|row| i16::from(!row[index].1.is_null()))
                .collect();
            match self.kinds[index] {
                Kind::Bool => {
                    let values: Vec<bool> = cells.filter_map(Value::as_bool).collect();
                    column
                        .typed::<BoolType>()
                        .write_batch(&values, Some(&levels), None)
                }
                Kind::Int32 => {
                    let values: Vec<i32> = cells
                        .filter(|v| !v.is_null())
                        .map(|v| {
                            v.as_i64()
                                .and_then(|n| i32::try_from(n).ok())
                                .unwrap_or_default()
                        })
                        .collect();
                    column
                        .typed::<Int32Type>()
                        .write_batch(&values, Some(&levels), None)
                }
                Kind::Int64 => {
                    let values: Vec<i64> = cells
                        .filter(|v| !v.is_null())
                        .map(|v| v.as_i64().unwrap_or_default())
                        .collect();
                    column
                        .typed::<Int64Type>()
                        .write_batch(&values, Some(&levels), None)
                }
                Kind::Double => {
                    let values: Vec<f64> = cells
                        .filter(|v| !v.is_null())
                        .map(|v| v.as_f64().unwrap_or_default())
                        .collect();
                    column
                        .typed::<DoubleType>()
                        .write_batch(&values, Some(&levels), None)
                }
                Kind::Text => {
                    let values: Vec<ByteArray> = cells
                        .filter(|v| !v.is_null())
                        .map(|v| match v {
                            Value::String(text) => ByteArray::from(text.as_str()),
                            other => ByteArray::from(other.to_string().as_str()),
                        })
                        .collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, Some(&levels), None)
                }
            }
            .map_err(parquet_error)?;
            column.close().map_err(parquet_error)?;
            index += 1;
        }
        group.close().map_err(parquet_error)?;
        let bytes = std::mem::take(file.inner_mut());
        out.raw(&bytes, rows.len() as u64)?;
        if out.is_full() {
            self.end_file(out)?;
        }
        Ok(())
    }

    fn end_file(&mut self, out: &mut dyn ParquetSink) -> Result<(), StorageError> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        file.finish().map_err(parquet_error)?;
        let footer = std::mem::take(file.inner_mut());
        out.raw(&footer, 0)?;
        out.roll()
    }
}
