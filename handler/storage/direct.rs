//! Export files written past the page cache (`O_DIRECT`), where the file system allows it.
//!
//! A buffered write copies every byte into page-cache memory, in the kernel, on the writing thread:
//! on a VM whose fresh memory is slow to fault in, that copy was most of an export's CPU time, and
//! a kernel without preemption does not give the core to a request while it runs. A direct write
//! hands the disk the rolling writer's own pooled block and sleeps until it is written. Where a
//! file system refuses direct I/O, the file is written through the page cache as before.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use super::blocks::{is_aligned, ALIGNMENT};
use crate::os::{buffer_from_now, open_direct, refuses_direct_io};

/// Bytes per buffered `write` call. A kernel without preemption (`preempt=none`, common on VMs)
/// lets no other thread have the core while one copies into the page cache: a 4 MB write held it
/// for milliseconds, and 256 KB writes for 3-8 ms in memory the VM had not touched yet.
const BUFFERED_WRITE_BYTES: usize = 64 << 10;

/// A new file written directly to disk while what it is given is aligned (the rolling writer's
/// full blocks), through the page cache from the first piece that is not (the last block's tail).
pub(super) struct DirectFile {
    file: File,
    /// Writes still go past the page cache.
    direct: bool,
    /// Bytes in the file: where a direct write turned down part way is taken up again.
    written: u64,
}

impl DirectFile {
    pub(super) fn create(path: &Path) -> std::io::Result<Self> {
        let (file, direct) = match open_direct(path) {
            Ok(file) => (file, true),
            Err(_) => (File::create(path)?, false),
        };
        Ok(Self {
            file,
            direct,
            written: 0,
        })
    }

    pub(super) fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !self.direct {
            return self.write_buffered(data);
        }
        let start_aligned = (data.as_ptr() as usize).is_multiple_of(ALIGNMENT);
        let head = match start_aligned {
            true => data.len() - data.len() % ALIGNMENT,
            false => 0,
        };
        if head > 0 {
            self.write_aligned(&data[..head])?;
        }
        let tail = &data[head..];
        if tail.is_empty() {
            return Ok(());
        }
        if self.direct {
            buffer_from_now(&self.file)?;
            self.direct = false;
        }
        self.write_buffered(tail)
    }

    /// Waits until the file's data is on disk.
    pub(super) fn finish(self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes aligned bytes directly; if the file system turns that down, writes them (and, from
    /// then on, the rest of the file) through the page cache.
    fn write_aligned(&mut self, aligned: &[u8]) -> std::io::Result<()> {
        debug_assert!(is_aligned(aligned));
        match self.file.write_all(aligned) {
            Ok(()) => {
                self.written += aligned.len() as u64;
                Ok(())
            }
            Err(e) if refuses_direct_io(&e) => {
                self.file.seek(SeekFrom::Start(self.written))?;
                buffer_from_now(&self.file)?;
                self.direct = false;
                self.write_buffered(aligned)
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::blocks::{Block, BLOCK_BYTES};

    #[test]
    fn blocks_then_a_tail_arrive_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..(BLOCK_BYTES * 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let path = dir.path().join("blocks.ndjson");
        let mut file = DirectFile::create(&path).unwrap();
        for part in content.chunks(BLOCK_BYTES) {
            let mut block = Block::take();
            assert_eq!(block.fill(part), part.len());
            file.write(&block.into_bytes()).unwrap();
        }
        file.finish().unwrap();
        assert!(std::fs::read(&path).unwrap() == content);
    }

    #[test]
    fn every_byte_arrives_in_order_whatever_the_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..(BLOCK_BYTES * 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        for piece in [1, 4095, 4096, 70_000, BLOCK_BYTES + 3] {
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
