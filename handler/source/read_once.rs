//! Reading an input file once, start to end, handing its pages back to the system as it goes.
//!
//! An import reads each file once and then writes a store larger than its input. Pages it has read
//! are released every few MB, so the store's new pages come from memory just freed. On a VM whose
//! free memory the host takes back, a fresh page costs the host a fault on first touch.

use std::fs::File;
use std::io::Read;

/// Bytes read between two releases of the pages read so far.
const RELEASE_EVERY: u64 = 8 << 20;

/// A file read sequentially whose pages leave the page cache once read (and at its end).
pub struct ReadOnce {
    file: File,
    read: u64,
    released: u64,
}

impl ReadOnce {
    pub fn new(file: File) -> Self {
        Self {
            file,
            read: 0,
            released: 0,
        }
    }

    fn release_read_pages(&mut self) {
        crate::os::release_pages(&self.file, self.released, self.read - self.released);
        self.released = self.read;
    }
}

impl Read for ReadOnce {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        if self.read - self.released >= RELEASE_EVERY || (n == 0 && self.read > self.released) {
            self.release_read_pages();
        }
        Ok(n)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    use crate::os::cached_pages;

    #[test]
    fn pages_read_leave_the_cache_and_every_byte_arrives() {
        // Beside the sources rather than in /tmp, which may be a tmpfs that keeps every page.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("input.ndjson");
        let content: Vec<u8> = (0..(RELEASE_EVERY as usize * 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut file = File::create(&path).unwrap();
        file.write_all(&content).unwrap();
        file.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        let before = cached_pages(&file, content.len());
        assert!(
            before > 0,
            "the file system keeps no written pages cached, so this test shows nothing"
        );

        let mut read_back = Vec::new();
        let mut reader = ReadOnce::new(File::open(&path).unwrap());
        let mut piece = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            read_back.extend_from_slice(&piece[..n]);
        }
        assert!(
            read_back == content,
            "the bytes read differ from the file's"
        );
        assert_eq!(cached_pages(&file, content.len()), 0, "of {before} cached");
    }
}
