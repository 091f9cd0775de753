//! Output organized by patient from a source that cannot stream compartments (a FHIR server), in
//! two phases, so that each type is read once, as a plain export reads it, however many shards
//! of blocks there are.
//!
//! 1. Planning adds, beside the shards of resource blocks, a [`ShardKind::Partition`] shard per
//!    part of each block type, cut as a plain export cuts it. Such a shard reads its part (and
//!    pauses by cursor) as a plain shard does, and writes each resource, shaped, to the partition
//!    of the block shard whose patient's block holds it: files
//!    `{output folder}/_partitions/{block shard}/{stem}-{n}.part`, a line per resource: its
//!    patient's place in the block shard, a tab, the resource. A file is written whole from
//!    memory (at most [`FLUSH_AT`] of resources), then listed in the shard's state.
//! 2. The block shards wait until every partition shard is done; the last to finish queues them.
//!    Each then writes its blocks from the files its partition shards' states list (a file no
//!    state lists, left by a run that stopped, is never read).
//!
//! The partitions go when the export completes, and with its folder when it fails or is
//! cancelled.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use tokio::runtime::Handle;

use super::blocks::{load_patients, owner_of, Place};
use super::jobs::{Job, ShardKind};
use super::{ExportError, Exports};
use crate::source::SinkError;
use crate::storage::{ObjectStore, OutputFile, StorageError};

/// The folder of an export's partitions, inside its output folder.
const PARTITIONS: &str = "_partitions";

/// A partition shard writes its resources held in memory up to here: a file per block shard
/// they go to.
const FLUSH_AT: usize = 16 << 20;

/// What one write to a partition file takes at most.
const WRITE_CHUNK: usize = 1 << 20;

/// The folder of the export's partitions.
pub fn folder(job: &Job) -> String {
    format!("{}/{PARTITIONS}", job.output_folder)
}

/// The folder of block shard `shard`'s partition, with its trailing slash.
fn shard_folder(job: &Job, shard: usize) -> String {
    format!("{}/{shard}/", folder(job))
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
    Ok(!partition_shards(job).all(|index| done.contains(&index)))
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
    if !partition_shards(job).all(|index| done.contains(&index)) {
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

/// One run of a partition shard: its resources, held until [`FLUSH_AT`], then written to the
/// partitions of their block shards.
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
    held: Vec<u8>,
    /// Each held resource: its block shard, its patient's place there, where its bytes are.
    entries: Vec<(u32, u32, usize, usize)>,
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
            held: Vec::new(),
            entries: Vec::new(),
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
        self.entries
            .push((shard, at, self.held.len(), shaped.len()));
        self.held.extend_from_slice(shaped);
        if self.held.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is held: a file per block shard, in the order the resources came.
    fn flush(&mut self) -> Result<(), SinkError> {
        self.entries.sort_by_key(|&(shard, ..)| shard);
        let entries = std::mem::take(&mut self.entries);
        for group in entries.chunk_by(|a, b| a.0 == b.0) {
            let path = format!(
                "{}/{}/{}-{}.part",
                self.folder, group[0].0, self.stem, self.next_number
            );
            self.next_number += 1;
            let bytes = self.write_file(&path, group)?;
            self.files.push(OutputFile {
                resource_type: self.resource_type.clone(),
                path,
                count: group.len() as u64,
                bytes,
                continues_in: None,
                list: Default::default(),
            });
            crate::crashpoint::reached("partition-written");
        }
        self.held.clear();
        Ok(())
    }

    /// Writes one partition file of `group`'s resources; returns its size.
    fn write_file(&self, path: &str, group: &[(u32, u32, usize, usize)]) -> Result<u64, SinkError> {
        let storage = self.storage.clone();
        let runtime = &self.runtime;
        let mut writer = runtime.block_on(storage.writer(path))?;
        let mut chunk = Vec::with_capacity(WRITE_CHUNK);
        let mut bytes = 0;
        for &(_, at, start, length) in group {
            write!(chunk, "{at}\t").expect("a Vec takes any write");
            chunk.extend_from_slice(&self.held[start..start + length]);
            chunk.push(b'\n');
            if chunk.len() >= WRITE_CHUNK {
                bytes += chunk.len() as u64;
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(WRITE_CHUNK));
                runtime.block_on(writer.write(Bytes::from(full)))?;
            }
        }
        bytes += chunk.len() as u64;
        runtime.block_on(writer.write(Bytes::from(chunk)))?;
        runtime.block_on(writer.commit())?;
        Ok(bytes)
    }

    /// Writes what is still held; returns every file this run wrote.
    pub fn finish(mut self) -> Result<Vec<OutputFile>, SinkError> {
        self.flush()?;
        Ok(self.files)
    }
}

/// The partition files of block shard `shard`, each with the place of its type in `types`: in
/// type order, then as the partition shards wrote them.
pub fn files_of(
    exports: &Exports,
    runtime: &Handle,
    job: &Job,
    shard: usize,
    types: &[String],
) -> Result<Vec<(usize, String)>, SinkError> {
    let prefix = shard_folder(job, shard);
    let mut files = Vec::new();
    for partition in partition_shards(job) {
        let state = runtime
            .block_on(exports.jobs.shard(&job.id, partition))
            .map_err(|error| StorageError::Service {
                path: format!("state of shard {partition}"),
                detail: error.to_string(),
            })?;
        let done = state.filter(|s| s.status == super::state::ShardStatus::Done);
        let Some(state) = done else {
            return Err(StorageError::Service {
                path: format!("state of shard {partition}"),
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
        files.extend(
            state
                .outputs
                .into_iter()
                .filter(|file| file.path.starts_with(&prefix))
                .map(|file| (rank, file.path)),
        );
    }
    files.sort_by_key(|&(rank, _)| rank);
    Ok(files)
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
