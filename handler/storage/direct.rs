//! Export files written past the page cache (`O_DIRECT`), where the file system allows it.
//!
//! A buffered write copies every byte into page-cache memory, in the kernel, on the writing thread:
//! on a VM whose fresh memory is slow to fault in, that copy was most of an export's CPU time, and
//! a kernel without preemption does not give the core to a request while it runs. A direct write
//! hands the disk the writer's own (reused) buffer and sleeps until it is written. Where a file
//! system refuses direct I/O, the file is written through the page cache as before.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::os::{buffer_from_now, open_direct, refuses_direct_io, AlignedBuffer};

/// Direct I/O wants the buffer, the file offset and the length aligned to the logical block size;
/// 4096 covers every common one.
const ALIGNMENT: usize = 4096;

/// Bytes gathered before each direct write (a multiple of `ALIGNMENT`).
const CHUNK_BYTES: usize = 4 << 20;

/// Bytes per buffered `write` call. A kernel without preemption (`preempt=none`, common on VMs)
/// lets no other thread have the core while one copies into the page cache: a 4 MB write held it
/// for milliseconds, and 256 KB writes for 3-8 ms in memory the VM had not touched yet.
const BUFFERED_WRITE_BYTES: usize = 64 << 10;

/// At most this many spare chunk buffers are kept between files (16 MB).
const MAX_SPARE_CHUNKS: usize = 4;

/// Chunk buffers of finished files: a new one's pages would be faulted in one by one.
static SPARE_CHUNKS: std::sync::Mutex<Vec<Chunk>> = std::sync::Mutex::new(Vec::new());

/// `CHUNK_BYTES` of memory aligned for direct I/O, and how much of it is filled.
struct Chunk(AlignedBuffer);

impl Chunk {
    fn take() -> Self {
        let spare = SPARE_CHUNKS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| Chunk(AlignedBuffer::new(CHUNK_BYTES, ALIGNMENT)))
    }

    fn give_back(mut self) {
        self.0.clear();
        let mut spare = SPARE_CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE_CHUNKS {
            spare.push(self);
        }
    }

    fn filled(&self) -> &[u8] {
        self.0.filled()
    }

    /// Copies as much of `data` as fits; returns how much that was.
    fn fill(&mut self, data: &[u8]) -> usize {
        self.0.fill(data)
    }

    fn is_full(&self) -> bool {
        self.0.is_full()
    }
}

/// A new file written directly to disk in aligned chunks, the unaligned tail buffered at the end.
pub(super) struct DirectFile {
    file: File,
    /// Gathers bytes for the next direct write; `None` once the file goes through the page cache.
    chunk: Option<Chunk>,
    /// Bytes in the file: where a direct write turned down part way is taken up again.
    written: u64,
}

impl DirectFile {
    pub(super) fn create(path: &Path) -> std::io::Result<Self> {
        let (file, chunk) = match open_direct(path) {
            Ok(file) => (file, Some(Chunk::take())),
            Err(_) => (File::create(path)?, None),
        };
        Ok(Self {
            file,
            chunk,
            written: 0,
        })
    }

    pub(super) fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let Some(chunk) = self.chunk.as_mut() else {
                return self.write_buffered(data);
            };
            data = &data[chunk.fill(data)..];
            if chunk.is_full() {
                self.write_chunk()?;
            }
        }
        Ok(())
    }

    /// Writes what is left and waits until the file's data is on disk.
    pub(super) fn finish(mut self) -> std::io::Result<()> {
        if let Some(chunk) = self.chunk.take() {
            let aligned = chunk.filled().len() - chunk.filled().len() % ALIGNMENT;
            let (head, tail) = chunk.filled().split_at(aligned);
            let written = self.write_aligned(head).and_then(|direct| {
                // Turned off already where the direct write was turned down.
                if direct {
                    buffer_from_now(&self.file)?;
                }
                self.write_buffered(tail)
            });
            chunk.give_back();
            written?;
        }
        self.file.sync_data()
    }

    fn write_chunk(&mut self) -> std::io::Result<()> {
        let mut chunk = self.chunk.take().expect("called with a full chunk");
        match self.write_aligned(chunk.filled()) {
            Ok(true) => {
                chunk.0.clear();
                self.chunk = Some(chunk);
                Ok(())
            }
            done => {
                chunk.give_back();
                done.map(|_| ())
            }
        }
    }

    /// Writes aligned bytes directly; if the file system turns that down, writes them (and, from
    /// then on, the rest of the file) through the page cache, and answers `false`.
    fn write_aligned(&mut self, aligned: &[u8]) -> std::io::Result<bool> {
        match self.file.write_all(aligned) {
            Ok(()) => {
                self.written += aligned.len() as u64;
                Ok(true)
            }
            Err(e) if refuses_direct_io(&e) => {
                self.file.seek(SeekFrom::Start(self.written))?;
                buffer_from_now(&self.file)?;
                self.write_buffered(aligned)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn write_buffered(&mut self, data: &[u8]) -> std::io::Result<()> {
        for piece in data.chunks(BUFFERED_WRITE_BYTES) {
            self.file.write_all(piece)?;
        }
        self.written += data.len() as u64;
        Ok(())
    }
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            chunk.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_arrives_in_order_whatever_the_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..(CHUNK_BYTES * 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        for piece in [1, 4095, 4096, 70_000, CHUNK_BYTES + 3] {
            let path = dir.path().join(format!("{piece}.ndjson"));
            let mut file = DirectFile::create(&path).unwrap();
            for part in content.chunks(piece) {
                file.write(part).unwrap();
            }
            file.finish().unwrap();
            assert!(
                std::fs::read(&path).unwrap() == content,
                "pieces of {piece}"
            );
        }
        let path = dir.path().join("empty.ndjson");
        DirectFile::create(&path).unwrap().finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}
