//! The local folder's journal: whole-object writes (and the deletions that cancel them) appended
//! to one of two files before the objects are published as files, and replayed after a crash.
//!
//! A record is `kind u8, seq u64, path len u32, path, data len u32, data, xxh3 u64` (little
//! endian), the checksum over everything before it. Reading stops at the first record that is
//! cut short or does not add up: a write torn by the process dying.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

const PUT: u8 = 1;
const CANCEL: u8 = 2;
const FILES: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The whole object at `path` is `data`.
    Put { path: String, data: Bytes },
    /// Earlier puts of `path` and of everything under `path/` are not to be published.
    Cancel { path: String },
}

impl Record {
    fn encode(&self, seq: u64) -> Vec<u8> {
        let (kind, path, data): (u8, &str, &[u8]) = match self {
            Record::Put { path, data } => (PUT, path, data),
            Record::Cancel { path } => (CANCEL, path, &[]),
        };
        let mut out = Vec::with_capacity(29 + path.len() + data.len());
        out.push(kind);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }
}

/// The records of one journal file, up to the first one that is incomplete or damaged.
fn decode_all(bytes: &[u8]) -> Vec<(u64, Record)> {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((seq, record, next)) = decode(bytes, at) {
        records.push((seq, record));
        at = next;
    }
    records
}

fn decode(bytes: &[u8], start: usize) -> Option<(u64, Record, usize)> {
    let take = |at: usize, n: usize| bytes.get(at..at.checked_add(n)?);
    let u32_at = |at| Some(u32::from_le_bytes(take(at, 4)?.try_into().ok()?) as usize);
    let kind = *bytes.get(start)?;
    let seq = u64::from_le_bytes(take(start + 1, 8)?.try_into().ok()?);
    let path_len = u32_at(start + 9)?;
    let path = take(start + 13, path_len)?;
    let data_at = start + 13 + path_len;
    let data_len = u32_at(data_at)?;
    let data = take(data_at + 4, data_len)?;
    let end = data_at + 4 + data_len;
    let sum = u64::from_le_bytes(take(end, 8)?.try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(&bytes[start..end]) != sum {
        return None;
    }
    let path = String::from_utf8(path.to_vec()).ok()?;
    let record = match kind {
        PUT => Record::Put {
            path,
            data: Bytes::copy_from_slice(data),
        },
        CANCEL => Record::Cancel { path },
        _ => return None,
    };
    Some((seq, record, end + 8))
}

/// Two append-only files: records go to the current one; the other, once retired and all it
/// holds published, is emptied.
pub struct Journal {
    files: Arc<[File; 2]>,
    current: usize,
    /// Bytes appended to the current file since it became current.
    appended: u64,
}

impl Journal {
    /// Opens (creating) the journal in `dir`; returns it with every record left in it, oldest first.
    pub fn open(dir: &Path) -> std::io::Result<(Self, Vec<(u64, Record)>)> {
        std::fs::create_dir_all(dir)?;
        let mut records = Vec::new();
        let mut files = Vec::new();
        for name in FILES {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(dir.join(name))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            records.extend(decode_all(&bytes));
            files.push(file);
        }
        records.sort_by_key(|(seq, _)| *seq);
        let files: [File; 2] = files.try_into().expect("two journal files");
        Ok((
            Self {
                files: Arc::new(files),
                current: 0,
                appended: 0,
            },
            records,
        ))
    }

    /// Appends `record`, or leaves the file as it was: a record cut short (the disk full midway)
    /// is cut off again, so that records appended after it are read back.
    pub fn append(&mut self, seq: u64, record: &Record) -> std::io::Result<()> {
        let encoded = record.encode(seq);
        let mut file = &self.files[self.current];
        let before = file.metadata()?.len();
        if let Err(error) = file.write_all(&encoded) {
            let _ = file.set_len(before);
            return Err(error);
        }
        self.appended += encoded.len() as u64;
        Ok(())
    }

    /// True when something was appended since the current file became current.
    pub fn has_records(&self) -> bool {
        self.appended > 0
    }

    /// Sends later appends to the other file; returns the retired one, to empty once what it
    /// holds is published.
    pub fn retire_current(&mut self) -> RetiredFile {
        let retired = self.current;
        self.current = 1 - retired;
        self.appended = 0;
        RetiredFile {
            files: self.files.clone(),
            index: retired,
        }
    }

    /// Empties both files (after a replay has published everything).
    pub fn clear_all(&mut self) -> std::io::Result<()> {
        for file in self.files.iter() {
            file.set_len(0)?;
        }
        self.appended = 0;
        Ok(())
    }
}

/// A journal file no longer appended to.
pub struct RetiredFile {
    files: Arc<[File; 2]>,
    index: usize,
}

impl RetiredFile {
    pub fn clear(&self) -> std::io::Result<()> {
        self.files[self.index].set_len(0)
    }
}

#[cfg(test)]
impl Record {
    /// A put of static bytes.
    pub fn put(path: &str, data: &'static [u8]) -> Self {
        Record::Put {
            path: path.into(),
            data: Bytes::from_static(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_across_both_files_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut journal, left) = Journal::open(dir.path()).unwrap();
            assert!(left.is_empty());
            journal.append(0, &Record::put("c/a.json", b"1")).unwrap();
            let retired = journal.retire_current();
            journal.append(1, &Record::put("c/a.json", b"2")).unwrap();
            journal
                .append(2, &Record::Cancel { path: "c".into() })
                .unwrap();
            drop(retired);
        }
        let (_, records) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            records,
            [
                (0, Record::put("c/a.json", b"1")),
                (1, Record::put("c/a.json", b"2")),
                (2, Record::Cancel { path: "c".into() }),
            ]
        );
        // A record cut short, then one with a wrong checksum: neither is read, nor what follows.
        let b = dir.path().join("b");
        let whole = std::fs::read(&b).unwrap();
        std::fs::write(&b, &whole[..whole.len() - 3]).unwrap();
        let (_, records) = Journal::open(dir.path()).unwrap();
        assert_eq!(records.len(), 2);
        let mut damaged = whole.clone();
        damaged[20] ^= 1;
        std::fs::write(&b, &damaged).unwrap();
        let (_, records) = Journal::open(dir.path()).unwrap();
        assert_eq!(records, [(0, Record::put("c/a.json", b"1"))]);
    }

    #[test]
    fn a_retired_file_is_emptied_and_the_current_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path()).unwrap();
        journal.append(0, &Record::put("c/a.json", b"1")).unwrap();
        assert!(journal.has_records());
        let retired = journal.retire_current();
        assert!(!journal.has_records());
        journal.append(1, &Record::put("c/b.json", b"2")).unwrap();
        retired.clear().unwrap();
        drop(journal);
        let (_, records) = Journal::open(dir.path()).unwrap();
        assert_eq!(records, [(1, Record::put("c/b.json", b"2"))]);
    }
}
