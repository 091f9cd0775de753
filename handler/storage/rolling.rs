//! The rolling NDJSON writer: one resource a line, a new file before a line would pass the size limit.
//!
//! It runs on a shard's own thread (next to the source's reader) and drives the async store through
//! a runtime handle, blocking on each call. Lines are gathered into pooled blocks of exactly
//! `BLOCK_BYTES` (a line may span two) that the store takes as they are, without a copy.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::blocks::Block;
use super::{ObjectStore, ObjectWriter, StorageError};

/// A committed export file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    #[serde(rename = "type")]
    pub resource_type: String,
    /// Storage path: `container/folder/Patient-1.ndjson`.
    pub path: String,
    pub count: u64,
    pub bytes: u64,
    /// The file a resource block cut at this file's end goes on in (`organizeOutputBy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues_in: Option<String>,
    /// The manifest list that names the file.
    #[serde(default, skip_serializing_if = "ManifestList::is_output")]
    pub list: ManifestList,
    /// A partition file's sections (organized output's first phase), one per shard of blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sections: Vec<Section>,
}

/// The lines of a partition file for one shard of blocks: bytes `start..end`, `count` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub shard: u32,
    pub start: u64,
    pub end: u64,
    pub count: u64,
}

/// The lists of a manifest a file goes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ManifestList {
    /// Resources.
    #[default]
    Output,
    /// Transaction Bundles deleting the resources deleted since `_since`.
    Deleted,
    /// OperationOutcomes.
    Error,
}

impl ManifestList {
    pub fn is_output(&self) -> bool {
        *self == ManifestList::Output
    }
}

pub struct RollingNdjsonWriter {
    store: Arc<dyn ObjectStore>,
    runtime: Handle,
    folder: String,
    stem: String,
    resource_type: String,
    max_bytes: u64,
    current: Option<Box<dyn ObjectWriter>>,
    file_number: u32,
    file_bytes: u64,
    file_count: u64,
    /// The block being filled; taken from the pool at the first line after a hand-over.
    block: Option<Block>,
    finished: Vec<OutputFile>,
    /// The header line of the resource block being written (`organizeOutputBy`), repeated at the
    /// start of a file the block goes on in.
    block_header: Option<Vec<u8>>,
    /// Files are stored gzip-compressed (`EXPORT_COMPRESSION=gzip`).
    gzip: bool,
    /// The manifest list its files go in.
    list: ManifestList,
    /// The files' extension (`ndjson`, `csv`), a line's end, and a line each file starts with
    /// (not counted: a CSV header).
    extension: &'static str,
    line_end: &'static [u8],
    file_header: Option<Vec<u8>>,
    /// The open file's compressor, when files are compressed.
    encoder: Option<flate2::write::GzEncoder<Vec<u8>>>,
}

/// Compressed bytes gathered before they go into a block.
const COMPRESSED_CHUNK: usize = 256 << 10;

impl RollingNdjsonWriter {
    /// Files are named `{folder}/{stem}-{n}.ndjson`, n from 1.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        runtime: Handle,
        folder: &str,
        stem: &str,
        resource_type: &str,
        max_bytes: u64,
    ) -> Self {
        Self {
            store,
            runtime,
            folder: folder.to_string(),
            stem: stem.to_string(),
            resource_type: resource_type.to_string(),
            max_bytes,
            current: None,
            file_number: 0,
            file_bytes: 0,
            file_count: 0,
            block: None,
            finished: Vec::new(),
            block_header: None,
            gzip: false,
            list: ManifestList::Output,
            extension: "ndjson",
            line_end: b"\n",
            file_header: None,
            encoder: None,
        }
    }

    /// Files of table rows: `extension`, lines ended by `line_end`, each file starting with
    /// `header` when given.
    pub fn as_table(
        mut self,
        extension: &'static str,
        line_end: &'static [u8],
        header: Option<Vec<u8>>,
    ) -> Self {
        self.extension = extension;
        self.line_end = line_end;
        self.file_header = header;
        self
    }

    /// The manifest list the files go in, and the type they hold.
    pub fn listed_in(mut self, list: ManifestList, resource_type: &str) -> Self {
        self.list = list;
        self.resource_type = resource_type.to_string();
        self
    }

    /// From the next file on, the files go in `list` and hold `resource_type`: the open file is
    /// closed first.
    pub fn switch_to(
        &mut self,
        list: ManifestList,
        resource_type: &str,
    ) -> Result<(), StorageError> {
        self.close_file()?;
        self.list = list;
        self.resource_type = resource_type.to_string();
        Ok(())
    }

    /// Stores the files gzip-compressed (the limit still counts the NDJSON bytes).
    pub fn gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// Numbers the files after `files` already written (by the runs of a shard that paused).
    pub fn numbered_after(mut self, files: usize) -> Self {
        self.file_number = files as u32;
        self
    }

    /// Appends one resource (compact JSON, no newline) as a line. Within a resource block, a file
    /// that would pass the size limit is closed as continuing in the next, which starts with the
    /// block's header again.
    pub fn push(&mut self, resource: &[u8]) -> Result<(), StorageError> {
        let line_bytes = resource.len() as u64 + 1;
        // In a block, a file holds more than the header before it is closed.
        let floor = u64::from(self.block_header.is_some());
        if self.file_count > floor && self.file_bytes + line_bytes > self.max_bytes {
            self.close_file()?;
            if let Some(header) = self.block_header.take() {
                let next = self.path_of(self.file_number + 1);
                if let Some(closed) = self.finished.last_mut() {
                    closed.continues_in = Some(next);
                }
                self.line(&header)?;
                self.block_header = Some(header);
            }
        }
        self.line(resource)
    }

    /// Starts a resource block of `block_bytes` (its lines with their newlines, the `header` line
    /// first): in a new file unless it fits in the room this one has left. A block larger than a
    /// file goes on in the next file (see [`Self::push`]).
    pub fn begin_block(&mut self, header: &[u8], block_bytes: u64) -> Result<(), StorageError> {
        if self.file_count > 0 && self.file_bytes + block_bytes > self.max_bytes {
            self.close_file()?;
        }
        self.line(header)?;
        self.block_header = Some(header.to_vec());
        Ok(())
    }

    /// Ends the resource block begun last.
    pub fn end_block(&mut self) {
        self.block_header = None;
    }

    /// Appends bytes of a file that is not made of lines (a Parquet file's pages), holding `rows`
    /// rows; [`Self::roll`] ends the file.
    pub fn raw(&mut self, bytes: &[u8], rows: u64) -> Result<(), StorageError> {
        self.open_if_none()?;
        self.append(bytes)?;
        self.file_bytes += bytes.len() as u64;
        self.file_count += rows;
        Ok(())
    }

    /// Ends the open file (the next bytes go to a new one).
    pub fn roll(&mut self) -> Result<(), StorageError> {
        self.close_file()
    }

    /// The bytes the open file holds so far.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// The size past which files are rolled.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Writes one line to the open file, opening the next file first when none is.
    fn line(&mut self, resource: &[u8]) -> Result<(), StorageError> {
        let line_bytes = (resource.len() + self.line_end.len()) as u64;
        self.open_if_none()?;
        self.append(resource)?;
        self.append(self.line_end)?;
        self.file_bytes += line_bytes;
        self.file_count += 1;
        Ok(())
    }

    /// Opens the next file (with its header line, if any) when none is open.
    fn open_if_none(&mut self) -> Result<(), StorageError> {
        if self.current.is_none() {
            self.file_number += 1;
            let path = self.current_path();
            let writer = self.store.export_writer(&path, self.gzip);
            self.current = Some(self.runtime.block_on(writer)?);
            if self.gzip {
                let level = flate2::Compression::fast();
                self.encoder = Some(flate2::write::GzEncoder::new(Vec::new(), level));
            }
            if let Some(header) = self.file_header.clone() {
                self.append(&header)?;
                self.append(self.line_end)?;
                self.file_bytes += (header.len() + self.line_end.len()) as u64;
            }
        }
        Ok(())
    }

    /// Adds `bytes` to the open file: into blocks, through the compressor when files are
    /// compressed.
    fn append(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let Some(encoder) = self.encoder.as_mut() else {
            return self.fill_blocks(bytes);
        };
        std::io::Write::write_all(encoder, bytes).map_err(|e| StorageError::io("gzip", e))?;
        if encoder.get_ref().len() >= COMPRESSED_CHUNK {
            let compressed = std::mem::take(encoder.get_mut());
            self.fill_blocks(&compressed)?;
        }
        Ok(())
    }

    /// Copies `bytes` into blocks, handing each full one to the store.
    fn fill_blocks(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        while !bytes.is_empty() {
            let block = self.block.get_or_insert_with(Block::take);
            bytes = &bytes[block.fill(bytes)..];
            if block.is_full() {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Commits the open file; returns every file written, in order.
    pub fn finish(mut self) -> Result<Vec<OutputFile>, StorageError> {
        if let Err(e) = self.close_file() {
            self.abort();
            return Err(e);
        }
        Ok(std::mem::take(&mut self.finished))
    }

    /// Drops the open file unseen; returns the files already committed (a rerun overwrites them
    /// by name; a cancelled export removes them).
    pub fn abort(mut self) -> Vec<OutputFile> {
        self.encoder = None;
        if let Some(writer) = self.current.take() {
            let _ = self.runtime.block_on(writer.abort());
        }
        std::mem::take(&mut self.finished)
    }

    /// The number of the file `name` (`{stem}-{n}.ndjson`, as this writer names it) when it is one
    /// of `stem`'s.
    pub fn file_number(stem: &str, name: &str) -> Option<u64> {
        let number = name.strip_prefix(stem)?.strip_prefix('-')?;
        let number = number
            .strip_suffix(".ndjson")
            .or_else(|| number.strip_suffix(".csv"))
            .or_else(|| number.strip_suffix(".parquet"))?;
        let digits = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
        digits.then(|| number.parse().ok()).flatten()
    }

    fn current_path(&self) -> String {
        self.path_of(self.file_number)
    }

    fn path_of(&self, number: u32) -> String {
        format!(
            "{}/{}-{}.{}",
            self.folder, self.stem, number, self.extension
        )
    }

    fn flush(&mut self) -> Result<(), StorageError> {
        let Some(block) = self.block.take().filter(|block| !block.is_empty()) else {
            return Ok(());
        };
        let writer = self
            .current
            .as_mut()
            .expect("a file is open while bytes are buffered");
        self.runtime.block_on(writer.write(block.into_bytes()))?;
        crate::crashpoint::reached("file-block-written");
        Ok(())
    }

    fn close_file(&mut self) -> Result<(), StorageError> {
        if self.current.is_none() {
            return Ok(());
        }
        if let Some(encoder) = self.encoder.take() {
            let rest = encoder.finish().map_err(|e| StorageError::io("gzip", e))?;
            self.fill_blocks(&rest)?;
        }
        self.flush()?;
        let writer = self.current.take().expect("checked above");
        self.runtime.block_on(writer.commit())?;
        crate::crashpoint::reached("file-committed");
        self.finished.push(OutputFile {
            resource_type: self.resource_type.clone(),
            path: self.current_path(),
            count: self.file_count,
            bytes: self.file_bytes,
            continues_in: None,
            list: self.list,
            sections: Vec::new(),
        });
        self.file_bytes = 0;
        self.file_count = 0;
        Ok(())
    }
}
