//! The rolling NDJSON writer: one resource a line, a new file before a line would pass the size limit.
//!
//! It runs on a blocking thread (next to the source's reader) and drives the async store through a
//! runtime handle, handing it large blocks.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::{ObjectStore, ObjectWriter, StorageError};

/// Bytes gathered before they are handed to the store.
const BLOCK_BYTES: usize = 4 << 20;

/// Room for a block and the line that takes it past `BLOCK_BYTES`.
const BUFFER_BYTES: usize = BLOCK_BYTES + (64 << 10);

/// Block buffers of finished writers, for the next ones: a new buffer's pages are faulted in
/// one by one as it fills (16k faults per 1x export, 18 shards, when each made its own).
static SPARE_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// At most this many spare buffers are kept (16 MB).
const MAX_SPARE_BUFFERS: usize = 4;

fn spare_buffer() -> Vec<u8> {
    let spare = SPARE_BUFFERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop();
    spare.unwrap_or_else(|| Vec::with_capacity(BUFFER_BYTES))
}

fn return_buffer(mut buffer: Vec<u8>) {
    if buffer.capacity() < BUFFER_BYTES {
        return;
    }
    buffer.clear();
    let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < MAX_SPARE_BUFFERS {
        spare.push(buffer);
    }
}

/// A committed export file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    #[serde(rename = "type")]
    pub resource_type: String,
    /// Storage path: `container/folder/Patient-1.ndjson`.
    pub path: String,
    pub count: u64,
    pub bytes: u64,
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
    buffer: Vec<u8>,
    finished: Vec<OutputFile>,
}

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
            buffer: spare_buffer(),
            finished: Vec::new(),
        }
    }

    /// Appends one resource (compact JSON, no newline) as a line.
    pub fn push(&mut self, resource: &[u8]) -> Result<(), StorageError> {
        let line_bytes = resource.len() as u64 + 1;
        if self.file_count > 0 && self.file_bytes + line_bytes > self.max_bytes {
            self.close_file()?;
        }
        if self.current.is_none() {
            self.file_number += 1;
            let path = self.current_path();
            self.current = Some(self.runtime.block_on(self.store.writer(&path))?);
        }
        self.buffer.extend_from_slice(resource);
        self.buffer.push(b'\n');
        self.file_bytes += line_bytes;
        self.file_count += 1;
        if self.buffer.len() >= BLOCK_BYTES {
            self.flush()?;
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
        if let Some(writer) = self.current.take() {
            let _ = self.runtime.block_on(writer.abort());
        }
        std::mem::take(&mut self.finished)
    }

    fn current_path(&self) -> String {
        format!("{}/{}-{}.ndjson", self.folder, self.stem, self.file_number)
    }

    fn flush(&mut self) -> Result<(), StorageError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let writer = self
            .current
            .as_mut()
            .expect("a file is open while bytes are buffered");
        // The buffer itself is handed over, not a copy; once the store is done with it, it comes
        // back to be filled again (the store keeps no reference after `write` returns).
        let block = Bytes::from(std::mem::take(&mut self.buffer));
        self.runtime.block_on(writer.write(block.clone()))?;
        self.buffer = match block.try_into_mut() {
            Ok(reclaimed) => {
                let mut reclaimed = Vec::from(reclaimed);
                reclaimed.clear();
                reclaimed
            }
            Err(_) => spare_buffer(),
        };
        crate::crashpoint::reached("file-block-written");
        Ok(())
    }

    fn close_file(&mut self) -> Result<(), StorageError> {
        if self.current.is_none() {
            return Ok(());
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
        });
        self.file_bytes = 0;
        self.file_count = 0;
        Ok(())
    }
}

impl Drop for RollingNdjsonWriter {
    fn drop(&mut self) {
        return_buffer(std::mem::take(&mut self.buffer));
    }
}
