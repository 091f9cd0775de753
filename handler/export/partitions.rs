//! Output organized by patient from a source that cannot stream compartments (a FHIR server), in
//! two phases, so that each type is read once, as a plain export reads it, however many shards
//! of blocks there are.
//!
//! 1. Planning adds, beside the shards of resource blocks, a [`ShardKind::Partition`] shard per
//!    part of each block type, cut as a plain export cuts it. Such a shard reads its part (and
//!    pauses by cursor) as a plain shard does, and sorts each resource, shaped, into the section
//!    of the block shard whose patient's block holds it: files
//!    `{output folder}/_partitions/{stem}-{n}.part` of a section per block shard, a line per
//!    resource (its patient's place in the block shard, a tab, the resource). A file is written
//!    whole from memory (at most [`FLUSH_AT`] of resources, or the export's file size when
//!    smaller) while the shard reads on, then listed, with its sections, in the shard's state.
//! 2. The block shards wait until every partition shard is done; the last to finish queues them.
//!    Each then reads its own sections (a range of each file, a few at once) of the files its
//!    partition shards' states list (a file no state lists, left by a run that stopped, is never
//!    read), checks each whole, and writes its blocks.
//!
//! The partitions go when the export completes, and with its folder when it fails or is
//! cancelled.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::runtime::Handle;

use super::blocks::{job_read_error, load_patients, owner_of, Place};
use super::jobs::{Job, ShardKind};
use super::{ExportError, Exports};
use crate::source::SinkError;
use crate::storage::{ObjectStore, OutputFile, Section, StorageError};

/// The folder of an export's partitions, inside its output folder.
const PARTITIONS: &str = "_partitions";

/// A partition shard writes its resources held in memory up to here, as one file (on a thread of
/// its own while the shard reads on: with the file in flight, gathered from its lines, up to three
/// times this in memory).
const FLUSH_AT: usize = 8 << 20;

/// What one write to a partition file takes at most.
const WRITE_CHUNK: usize = 1 << 20;

/// Sections of partition files a shard of blocks reads at once.
const READ_AHEAD: usize = 4;

/// The folder of the export's partitions.
pub fn folder(job: &Job) -> String {
    format!("{}/{PARTITIONS}", job.output_folder)
}

/// The job's partition shards.
pub fn partition_shards(job: &Job) -> impl Iterator<Item = usize> + '_ {
    job.shards
        .iter()
        .enumerate()
        .filter(|(_, shard)| shard.kind == ShardKind::Partition)
        .map(|(index, _)| index)
}

/// The job's shards of resource blocks.
pub fn block_shards(job: &Job) -> impl Iterator<Item = usize> + '_ {
    job.shards
        .iter()
        .enumerate()
        .filter(|(_, shard)| shard.patients.is_some())
        .map(|(index, _)| index)
}

/// Whether shard `shard` must wait: a shard of blocks while some partition shard is not done.
pub async fn waits(exports: &Exports, job: &Job, shard: usize) -> Result<bool, ExportError> {
    if job.shards[shard].patients.is_none() || partition_shards(job).next().is_none() {
        return Ok(false);
    }
    let done = exports.jobs.done_shards(&job.id).await?;
    Ok(!all_partitioned(job, &done))
}

/// Whether every partition shard of the job is among the `done` ones.
fn all_partitioned(job: &Job, done: &BTreeSet<usize>) -> bool {
    partition_shards(job).all(|index| done.contains(&index))
}

/// After partition shard `finished` is marked done: once every partition shard is done, queues
/// the shards of blocks not done yet. (Each partition shard that finishes asks after its own
/// marker is written, so that the last one sees them all; the sweeper sends them should that
/// one stop first.)
pub async fn queue_blocks_when_partitioned(
    exports: &Exports,
    job: &Job,
    finished: usize,
) -> Result<(), ExportError> {
    if job.shards[finished].kind != ShardKind::Partition {
        return Ok(());
    }
    let done = exports.jobs.done_shards(&job.id).await?;
    if !all_partitioned(job, &done) {
        return Ok(());
    }
    let blocks: Vec<usize> = block_shards(job)
        .filter(|index| !done.contains(index))
        .collect();
    crate::crashpoint::reached("partitioned");
    tracing::info!(shards = blocks.len(), "partitions written: blocks queued");
    Ok(crate::queue::enqueue_shards(exports.queue.as_ref(), &job.id, blocks).await?)
}

/// Removes a completed export's partitions (a failure is logged: retention removes the folder).
pub async fn remove(exports: &Exports, job: &Job) {
    if partition_shards(job).next().is_none() {
        return;
    }
    let folder = folder(job);
    if let Err(error) = exports.storage.delete_prefix(&folder).await {
        tracing::warn!(%error, %folder, "could not remove the partitions of a completed export");
    }
}

/// Every exported patient's block: its shard, and its place there.
pub struct Owners(HashMap<Box<str>, (u32, u32)>);

impl Owners {
    /// Reads the patients of every shard of blocks (about 100 bytes a patient in memory).
    pub fn load(exports: &Exports, runtime: &Handle, job: &Job) -> Result<Owners, SinkError> {
        let mut owners = HashMap::new();
        for shard in block_shards(job) {
            let patients = load_patients(&exports.jobs, runtime, &job.id, shard)?;
            for (at, id) in patients.into_iter().enumerate() {
                owners.insert(id.into_boxed_str(), (shard as u32, at as u32));
            }
        }
        Ok(Owners(owners))
    }
}

/// A partition file's writing thread, which gives back the file's sections.
type Writing = std::thread::JoinHandle<Result<Vec<Section>, SinkError>>;

/// One run of a partition shard: its resources, held until [`FLUSH_AT`] (or the export's file size
/// when smaller), then written to the partitions of their block shards.
pub struct Partitioner {
    owners: Owners,
    storage: Arc<dyn ObjectStore>,
    runtime: Handle,
    /// `{output folder}/_partitions`.
    folder: String,
    stem: String,
    resource_type: String,
    /// The number of the next file (after those of the shard's runs before).
    next_number: usize,
    /// The lines held for the next file.
    held: Held,
    /// What is held at most before it is written.
    flush_at: usize,
    /// The file being written, and its writing thread.
    writing: Option<(String, Writing)>,
    files: Vec<OutputFile>,
}

impl Partitioner {
    /// The partitioner of shard `shard` of `job`, numbering its files after `files_before`.
    pub fn new(
        exports: &Exports,
        runtime: Handle,
        job: &Job,
        shard: usize,
        files_before: usize,
    ) -> Result<Partitioner, SinkError> {
        Ok(Partitioner {
            owners: Owners::load(exports, &runtime, job)?,
            storage: exports.storage.clone(),
            runtime,
            folder: folder(job),
            stem: job.shards[shard].stem.clone(),
            resource_type: job.shards[shard].resource_type.clone(),
            next_number: files_before + 1,
            held: Held::default(),
            flush_at: FLUSH_AT.min(exports.limits.file_max_bytes as usize),
            writing: None,
            files: Vec::new(),
        })
    }

    /// Holds `shaped` (the shaped `resource`) for the block that holds `resource`, if any.
    pub fn push(&mut self, resource: &[u8], shaped: &[u8]) -> Result<(), SinkError> {
        let owners = &self.owners.0;
        let owner = owner_of(&self.resource_type, resource, &mut |id| {
            Ok(match owners.get(id) {
                Some(&owner) => Place::Here(owner),
                None => Place::Outside,
            })
        })?;
        let Some((shard, at)) = owner else {
            return Ok(());
        };
        if self.held.lines.is_empty() {
            self.held.bytes = super::spare::take(self.flush_at + shaped.len() + 16);
        }
        self.held.push(shard, at, shaped);
        if self.held.bytes.len() >= self.flush_at {
            self.flush()?;
        }
        Ok(())
    }

    /// Starts writing what is held, once the file before is written: one file, a section per
    /// shard of blocks (each in the order the resources came).
    fn flush(&mut self) -> Result<(), SinkError> {
        if self.held.lines.is_empty() {
            return Ok(());
        }
        self.wait_for_write()?;
        let path = format!("{}/{}-{}.part", self.folder, self.stem, self.next_number);
        self.next_number += 1;
        let held = std::mem::take(&mut self.held);
        let (storage, runtime, file) = (self.storage.clone(), self.runtime.clone(), path.clone());
        let writing = std::thread::Builder::new()
            .name("partition-writer".into())
            .spawn(move || {
                crate::os::lower_this_threads_priority();
                write_file(&*storage, &runtime, &file, held)
            })
            .map_err(|e| SinkError::Permanent(format!("no thread to write a partition: {e}")))?;
        self.writing = Some((path, writing));
        Ok(())
    }

    /// Waits for the file being written, then lists it.
    fn wait_for_write(&mut self) -> Result<(), SinkError> {
        let Some((path, writing)) = self.writing.take() else {
            return Ok(());
        };
        let sections = writing.join().map_err(|_| {
            SinkError::Permanent(format!("the writing of partition file {path} panicked"))
        })??;
        self.files.push(OutputFile {
            resource_type: self.resource_type.clone(),
            path,
            count: sections.iter().map(|section| section.count).sum(),
            bytes: sections.last().map_or(0, |section| section.end),
            continues_in: None,
            list: Default::default(),
            sections,
        });
        crate::crashpoint::reached("partition-written");
        Ok(())
    }

    /// Writes what is still held; returns every file this run wrote.
    pub fn finish(mut self) -> Result<Vec<OutputFile>, SinkError> {
        self.flush()?;
        self.wait_for_write()?;
        Ok(std::mem::take(&mut self.files))
    }
}

impl Drop for Partitioner {
    /// A run that stops waits for its file being written: no write of it outlives the run, to
    /// land over a file of the same name that the shard's next run writes.
    fn drop(&mut self) {
        if let Some((_, writing)) = self.writing.take() {
            let _ = writing.join();
        }
    }
}

/// The lines held for a partition file, in the order they came, in memory kept from one file
/// (and shard) to the next.
#[derive(Default)]
struct Held {
    /// Each line: the patient's place, a tab, the resource.
    bytes: Vec<u8>,
    /// Each line's block shard, and where it lies in `bytes`.
    lines: Vec<(u32, usize, usize)>,
}

impl Held {
    fn push(&mut self, shard: u32, place: u32, resource: &[u8]) {
        let start = self.bytes.len();
        write!(self.bytes, "{place}\t").expect("a Vec takes any write");
        self.bytes.extend_from_slice(resource);
        self.bytes.push(b'\n');
        self.lines.push((shard, start, self.bytes.len()));
    }
}

/// Writes the `held` lines as one partition file, block shard by block shard (each shard's in the
/// order they came); returns its sections.
fn write_file(
    storage: &dyn ObjectStore,
    runtime: &Handle,
    path: &str,
    held: Held,
) -> Result<Vec<Section>, SinkError> {
    let Held { bytes, mut lines } = held;
    // Stable: a shard's lines stay in the order they came.
    lines.sort_by_key(|&(shard, ..)| shard);
    let mut file = super::spare::take(bytes.len());
    let mut sections: Vec<Section> = Vec::new();
    for (shard, start, end) in lines {
        let (at, length) = (file.len() as u64, (end - start) as u64);
        match sections.last_mut() {
            Some(section) if section.shard == shard => {
                section.end += length;
                section.count += 1;
            }
            _ => sections.push(Section {
                shard,
                start: at,
                end: at + length,
                count: 1,
            }),
        }
        file.extend_from_slice(&bytes[start..end]);
    }
    super::spare::give_back(bytes);
    let file = super::spare::into_bytes(file);
    let mut writer = runtime.block_on(storage.writer(path))?;
    for at in (0..file.len()).step_by(WRITE_CHUNK) {
        let part = file.slice(at..(at + WRITE_CHUNK).min(file.len()));
        runtime.block_on(writer.write(part))?;
    }
    runtime.block_on(writer.commit())?;
    Ok(sections)
}

/// The sections of the partition files that hold block shard `shard`'s resources, each with its
/// file and the place of its type in `types`: in type order, then as the partition shards wrote
/// them.
pub fn sections_of(
    exports: &Exports,
    runtime: &Handle,
    job: &Job,
    shard: usize,
    types: &[String],
) -> Result<Vec<(usize, String, Section)>, SinkError> {
    let mut sections = Vec::new();
    for partition in partition_shards(job) {
        let path = format!("state of shard {partition}");
        let state = runtime
            .block_on(exports.jobs.shard(&job.id, partition))
            .map_err(|error| job_read_error(path.clone(), error))?;
        let done = state.filter(|s| s.status == super::state::ShardStatus::Done);
        let Some(state) = done else {
            return Err(StorageError::Service {
                path,
                detail: "a partition shard is not done, yet its blocks were asked for".into(),
            }
            .into());
        };
        let resource_type = &job.shards[partition].resource_type;
        let Some(rank) = types.iter().position(|t| t == resource_type) else {
            return Err(SinkError::Permanent(format!(
                "{resource_type} was partitioned, but is not a type of the blocks"
            )));
        };
        for file in state.outputs {
            let section = file.sections.iter().find(|s| s.shard as usize == shard);
            if let Some(&section) = section {
                sections.push((rank, file.path.clone(), section));
            }
        }
    }
    sections.sort_by_key(|&(rank, ..)| rank);
    Ok(sections)
}

/// The `sections`, in order, each checked whole: up to [`READ_AHEAD`] read at once (from Azure
/// Blob, a ranged download each), so that the shard does not wait on one round trip per section.
pub fn read_sections<'a>(
    storage: &Arc<dyn ObjectStore>,
    runtime: &'a Handle,
    sections: &[(usize, String, Section)],
) -> impl Iterator<Item = Result<Bytes, SinkError>> + 'a {
    let reads: Vec<_> = sections
        .iter()
        .map(|(_, path, section)| (storage.clone(), path.clone(), *section))
        .collect();
    let spawned = reads.into_iter().map(|(storage, path, section)| {
        runtime.spawn(async move { read_section(&*storage, &path, &section).await })
    });
    let mut ahead = futures_util::stream::iter(spawned).buffered(READ_AHEAD);
    std::iter::from_fn(move || {
        let joined = runtime.block_on(ahead.next())?;
        Some(joined.unwrap_or_else(|stopped| {
            Err(SinkError::Permanent(format!(
                "the read of a partition's section stopped: {stopped}"
            )))
        }))
    })
}

/// Reads one section of a partition file, checked whole: as many lines as it was written with.
async fn read_section(
    storage: &dyn ObjectStore,
    path: &str,
    section: &Section,
) -> Result<Bytes, SinkError> {
    let read = storage.get_range(path, section.start..section.end).await?;
    let Some(bytes) = read else {
        return Err(StorageError::NotFound(path.to_string()).into());
    };
    let whole = bytes.len() as u64 == section.end - section.start
        && memchr::memchr_iter(b'\n', &bytes).count() as u64 == section.count;
    if !whole {
        // A partition cut short never makes blocks that lack a resource.
        return Err(StorageError::Service {
            path: path.to_string(),
            detail: format!(
                "the partition's section of shard {} is not as written ({} lines, {} bytes)",
                section.shard,
                section.count,
                section.end - section.start
            ),
        }
        .into());
    }
    Ok(bytes)
}

/// Each line of a partition file: its patient's place in the shard, and the resource.
pub fn lines(file: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), SinkError>> {
    let ends = memchr::memchr_iter(b'\n', file).chain(std::iter::once(file.len()));
    let mut start = 0;
    ends.map(move |end| {
        let line = &file[start..end];
        start = end + 1;
        line
    })
    .filter(|line| !line.is_empty())
    .map(|line| {
        let tab = memchr::memchr(b'\t', line);
        let place = tab.and_then(|tab| std::str::from_utf8(&line[..tab]).ok()?.parse().ok());
        match (tab, place) {
            (Some(tab), Some(place)) => Ok((place, &line[tab + 1..])),
            _ => Err(SinkError::Permanent(
                "a partition file holds a line without its patient's place".into(),
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_line_gives_back_its_place_and_resource() {
        let file = b"3\t{\"id\":\"a\"}\n12\t{\"id\":\"b\\tc\"}\n";
        let read: Vec<_> = lines(file).map(Result::unwrap).collect();
        assert_eq!(
            read,
            [
                (3, &b"{\"id\":\"a\"}"[..]),
                (12, &b"{\"id\":\"b\\tc\"}"[..])
            ]
        );
        assert!(lines(b"{\"id\":\"a\"}\n").next().unwrap().is_err());
        assert_eq!(lines(b"7\t{}").count(), 1, "a last line without its end");
    }
}
