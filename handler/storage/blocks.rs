//! The one pool of write blocks. The rolling writer fills a block, hands it to the store as
//! `Bytes` without a copy, and the block comes back to the pool when the store lets go of it:
//! after a direct write to a local file, or once Azure has the staged block. A block is memory
//! aligned for direct I/O, so a full one goes to disk as it is.
//!
//! Pooled because a new block's pages are faulted in one by one as it fills (16k faults per 1x
//! export, 18 shards, when each writer made its own).

use bytes::Bytes;

use crate::os::AlignedBuffer;

/// A block's size; a multiple of `ALIGNMENT`.
pub const BLOCK_BYTES: usize = 4 << 20;

/// Direct I/O wants the buffer, the file offset and the length aligned to the logical block size;
/// 4096 covers every common one.
pub const ALIGNMENT: usize = 4096;

/// At most this many spare blocks are kept (16 MB).
const MAX_SPARE: usize = 4;

static SPARE: std::sync::Mutex<Vec<AlignedBuffer>> = std::sync::Mutex::new(Vec::new());

/// A pooled block, back in the pool when dropped.
pub struct Block(Option<AlignedBuffer>);

impl Block {
    /// A block from the pool, or a new one.
    pub fn take() -> Block {
        let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Block(Some(spare.unwrap_or_else(|| {
            AlignedBuffer::new(BLOCK_BYTES, ALIGNMENT)
        })))
    }

    fn buffer(&mut self) -> &mut AlignedBuffer {
        self.0
            .as_mut()
            .expect("a block holds its buffer until dropped")
    }

    /// Copies as much of `data` as fits; returns how much that was.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        self.buffer().fill(data)
    }

    pub fn is_full(&self) -> bool {
        self.0.as_ref().is_some_and(AlignedBuffer::is_full)
    }

    pub fn is_empty(&self) -> bool {
        self.as_ref().is_empty()
    }

    /// The filled part, as `Bytes` that own the block.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], AlignedBuffer::filled)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let Some(mut buffer) = self.0.take() else {
            return;
        };
        buffer.clear();
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE {
            spare.push(buffer);
        }
    }
}

/// Whether `data` can be written directly: its start and length aligned.
pub fn is_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(ALIGNMENT) && data.len().is_multiple_of(ALIGNMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_becomes_aligned_bytes_holding_what_it_was_filled_with() {
        let mut block = Block::take();
        let mut expected = Vec::new();
        let mut n = 0u32;
        while !block.is_full() {
            let line = format!("{{\"n\":{n}}}\n");
            let taken = block.fill(line.as_bytes());
            expected.extend_from_slice(&line.as_bytes()[..taken]);
            n += 1;
        }
        let bytes = block.into_bytes();
        assert_eq!(bytes.len(), BLOCK_BYTES);
        assert!(is_aligned(&bytes));
        assert!(bytes[..] == expected[..]);
        let mut partial = Block::take();
        partial.fill(b"tail");
        assert_eq!(&partial.into_bytes()[..], b"tail");
    }
}
