//! Output organized by patient (`organizeOutputBy=Patient`, Bulk Data 3.0.0): files of resource
//! blocks, each a `Parameters` header naming a patient, then the patient, then the other resources
//! of its compartment. A resource in several exported patients' compartments is written once, in
//! the block of the first of them by id. Planning lists the exported patients in the order a scan
//! of them gives (the embedded store's: storage order) and cuts them into shards. A shard reads its
//! patients group by group where the source streams compartments (neighbours read together in
//! storage order), else from the partitions its export's first phase wrote (see `partitions`),
//! holds the resources in a spill, and writes their blocks from it in planning order.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::runtime::Handle;

use super::jobs::{Job, JobError, JobStore, PatientRange, Shard, ShardKind};
use super::kickoff;
use super::request::is_patient_level_type;
use super::shaping::Shaping;
use super::{ExportError, Exports};
use crate::fhir::compartment::patient_ids;
use crate::source::{
    CompartmentScan, Cursor, ResourceSource, RowRange, ScanError, ScanRequest, Scanned, SinkError,
};
use crate::storage::{ObjectStore, RollingNdjsonWriter, Section, StorageError};

/// A group's resources are held in memory up to this size, then in a temporary file.
const SPILL_IN_MEMORY: usize = 16 << 20;
/// The spill file's write buffer, and about the most one read of it takes back (a longer run of
/// adjacent resources is read in parts).
const SPILL_BUFFER: usize = 1 << 20;
const SPILL_RUN: u64 = 1 << 20;

/// A group's (or a shard's sections') shaped resources between their reading and their blocks: in
/// memory while they are few (a group of the embedded store holds about 16 MB), the rest in a
/// temporary file, so that memory stays bounded whatever a group (or a shard) holds.
struct Spill {
    /// What memory holds at the most.
    memory_limit: usize,
    memory: Vec<u8>,
    file: Option<BufWriter<std::fs::File>>,
    /// Bytes in the file (which starts where memory ends).
    file_bytes: u64,
    /// The file once written, to read back from.
    reader: Option<std::fs::File>,
    run: Vec<u8>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        super::spare::give_back(std::mem::take(&mut self.memory));
    }
}

impl Default for Spill {
    fn default() -> Self {
        Spill::holding_in_memory(SPILL_IN_MEMORY)
    }
}

fn spill_error(e: std::io::Error) -> SinkError {
    SinkError::from(StorageError::io("spill file", e))
}

impl Spill {
    fn holding_in_memory(memory_limit: usize) -> Spill {
        Spill {
            memory_limit,
            memory: super::spare::take(0),
            file: None,
            file_bytes: 0,
            reader: None,
            run: Vec::new(),
        }
    }

    /// Adds the shaped resource `bytes` for `owner`'s block, its type of `rank`; returns its entry.
    fn keep(&mut self, owner: u32, rank: usize, bytes: &[u8]) -> Result<Entry, SinkError> {
        Ok(Entry {
            owner,
            rank: rank as u16,
            offset: self.append(bytes)?,
            length: bytes.len() as u32,
        })
    }

    /// Adds `bytes`; returns where they start.
    fn append(&mut self, bytes: &[u8]) -> Result<u64, SinkError> {
        let offset = self.memory.len() as u64 + self.file_bytes;
        if self.file.is_none() && self.memory.len() + bytes.len() <= self.memory_limit {
            self.memory.extend_from_slice(bytes);
            return Ok(offset);
        }
        if self.file.is_none() {
            let file = tempfile::tempfile().map_err(spill_error)?;
            self.file = Some(BufWriter::with_capacity(SPILL_BUFFER, file));
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(bytes).map_err(spill_error)?;
        self.file_bytes += bytes.len() as u64;
        Ok(offset)
    }

    /// The bytes from `start` to `end`: a slice of memory, or read back from the file (a run that
    /// begins in memory and ends in the file is gathered from both).
    fn read(&mut self, start: u64, end: u64) -> Result<&[u8], SinkError> {
        let in_memory = self.memory.len() as u64;
        if end <= in_memory {
            return Ok(&self.memory[start as usize..end as usize]);
        }
        self.run.clear();
        if start < in_memory {
            self.run.extend_from_slice(&self.memory[start as usize..]);
        }
        let from_file = start.max(in_memory) - in_memory;
        let at = self.run.len();
        self.run
            .resize(at + (end - in_memory - from_file) as usize, 0);
        self.finish_writing()?;
        let reader = self.reader.as_mut().expect("finished writing");
        reader
            .seek(SeekFrom::Start(from_file))
            .map_err(spill_error)?;
        reader
            .read_exact(&mut self.run[at..])
            .map_err(spill_error)?;
        Ok(&self.run)
    }

    /// Makes room in memory, at once, for about `bytes` to come (as much of them as it holds).
    fn expect(&mut self, bytes: u64) {
        let room = (bytes as usize).min(self.memory_limit);
        self.memory
            .reserve_exact(room.saturating_sub(self.memory.len()));
    }

    /// Empties the spill for the next group, keeping its memory.
    fn clear(&mut self) {
        self.memory.clear();
        self.file = None;
        self.file_bytes = 0;
        self.reader = None;
    }

    /// Flushes the file, once all is written, to be read back from.
    fn finish_writing(&mut self) -> Result<(), SinkError> {
        if let Some(writer) = self.file.take() {
            let file = writer
                .into_inner()
                .map_err(|e| spill_error(e.into_error()))?;
            self.reader = Some(file);
        }
        match self.reader {
            Some(_) => Ok(()),
            None => Err(spill_error(std::io::Error::other("no spill file"))),
        }
    }
}

/// Patients per shard at most when the source cannot count its resources.
const PATIENTS_PER_SHARD_UNCOUNTED: usize = 1_000;

/// The types of an organized export in block order: Patient first, then the rest of the Patient
/// compartment by name (those of `_type` only, when given).
pub fn block_types(
    source: &dyn ResourceSource,
    request: &super::ExportRequest,
) -> Result<Vec<String>, crate::source::SourceError> {
    let mut types =
        source.resource_types(&|t| is_patient_level_type(t) && request.names_type(t))?;
    types.sort_by(|a, b| (a != "Patient", a).cmp(&(b != "Patient", b)));
    Ok(types)
}

/// Plans an organized export: its patients (those of its scope as at `transactionTime`, whatever
/// the window) in the order a scan gives them, cut into shards of about
/// `EXPORT_SHARD_MAX_RESOURCES` resources, each shard's ids recorded beside the job, and the
/// block types in the shards (a FHIR server counts the compartment's types, or those of `_type`,
/// to find them). From a source that cannot stream compartments, the partition shards of the
/// first phase follow. Returns the shards and the order to queue them in (the partition shards
/// alone, when there are any: they queue the shards of blocks when done).
pub async fn plan(exports: &Exports, job: &Job) -> Result<(Vec<Shard>, Vec<usize>), ExportError> {
    let (source, planned) = (exports.source.clone(), job.clone());
    let max_resources = exports.limits.shard_max_resources;
    let (patients, types) = crate::blocking::run(move || -> Result<_, ExportError> {
        let patients = exported_patients(source.as_ref(), &planned)?;
        let types = block_types(source.as_ref(), &planned.request)?;
        Ok((patients, types))
    })
    .await?;
    // A source that cannot stream compartments has a first phase read each type, cut as a
    // plain export's (its parts' counts size the shards of blocks); the shards of blocks wait.
    let (counts, partitions) = match exports.source.streams_compartments() {
        true => {
            let (source, planned, types) = (exports.source.clone(), job.clone(), types.clone());
            let counts =
                crate::blocking::run(move || counts(source.as_ref(), &planned, &types)).await?;
            (counts, None)
        }
        false => {
            let (request, scope, at) = (&job.request, &job.scope, job.transaction_time);
            let planned = kickoff::plan_types(exports, request, scope, at, Some(types.clone()));
            let planned = planned.await?;
            let sizes = planned.iter().flat_map(|(_, parts)| parts);
            let counts: Option<Vec<u64>> = sizes.map(|p| p.size.map(|s| s.resources)).collect();
            (counts, Some(kickoff::shards_of(planned)))
        }
    };
    let per_shard = patients_per_shard(counts.as_deref(), patients.len(), max_resources);
    let chunks: Vec<&[String]> = patients.chunks(per_shard.max(1)).collect();
    let split = chunks.len() > 1;
    let mut shards = Vec::new();
    for (index, chunk) in chunks.into_iter().enumerate() {
        exports.jobs.put_patients(&job.id, index, chunk).await?;
        shards.push(Shard {
            resource_type: "Patient".into(),
            stem: match split {
                true => format!("patients-{}", index + 1),
                false => "patients".into(),
            },
            since: None,
            until: None,
            rows: RowRange::default(),
            patients: Some(PatientRange {
                first: chunk[0].clone(),
                last: chunk[chunk.len() - 1].clone(),
                count: chunk.len(),
                types: types.clone(),
            }),
            kind: ShardKind::Resources,
            view: None,
        });
    }
    let Some((partitions, largest_first)) = partitions.filter(|_| !shards.is_empty()) else {
        let order = (0..shards.len()).collect();
        return Ok((shards, order));
    };
    let blocks = shards.len();
    shards.extend(partitions.into_iter().map(|shard| Shard {
        kind: ShardKind::Partition,
        ..shard
    }));
    Ok((
        shards,
        largest_first.into_iter().map(|i| blocks + i).collect(),
    ))
}

/// The ids of the patients an organized export covers: every Patient of its scope as at its
/// `transactionTime`, in the order a scan of them gives (the embedded store's is storage order
/// where the Patients lie together), so that a shard's patients, and the patients one after
/// another in it, are those whose resources lie near each other: what a shard reads, it reads
/// once. (Held in memory at planning: about 40 bytes a patient.)
fn exported_patients(source: &dyn ResourceSource, job: &Job) -> Result<Vec<String>, ExportError> {
    #[derive(Deserialize)]
    struct Id {
        id: Option<String>,
    }
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    source.scan(
        &ScanRequest::whole("Patient", &job.scope, job.transaction_time),
        &mut |resource| {
            if let Ok(Id { id: Some(id) }) = serde_json::from_slice::<Id>(resource) {
                if seen.insert(id.clone()) {
                    ids.push(id);
                }
            }
            Ok(())
        },
    )?;
    Ok(ids)
}

/// An export this large is cut into `SHARDS_AT_LEAST` shards at least, however large
/// `EXPORT_SHARD_MAX_RESOURCES` lets a shard be, so that workers share it evenly when patients'
/// sizes differ (shards of neighbouring patients do, unlike the types of a plain export).
const SHARDS_AT_LEAST: u64 = 8;
const SHARD_RESOURCES_AT_LEAST: u64 = 50_000;

/// Patients per shard: as many as hold about `max_resources` resources (fewer in a large export,
/// to make `SHARDS_AT_LEAST` shards), by the source's `counts` of the types; uncounted,
/// `SHARDS_AT_LEAST` shards of at most `PATIENTS_PER_SHARD_UNCOUNTED` patients.
fn patients_per_shard(counts: Option<&[u64]>, patients: usize, max_resources: u64) -> usize {
    let Some(counts) = counts else {
        return patients
            .div_ceil(SHARDS_AT_LEAST as usize)
            .clamp(1, PATIENTS_PER_SHARD_UNCOUNTED);
    };
    let total: u64 = counts.iter().sum();
    let per_patient = (total / patients.max(1) as u64).max(1);
    let per_shard = max_resources.min(
        total
            .div_ceil(SHARDS_AT_LEAST)
            .max(SHARD_RESOURCES_AT_LEAST),
    );
    (per_shard / per_patient).clamp(1, patients.max(1) as u64) as usize
}

/// How many resources of each of `types` the export reads, by the source's counts (`None` when
/// it cannot count one).
fn counts(
    source: &dyn ResourceSource,
    job: &Job,
    types: &[String],
) -> Result<Option<Vec<u64>>, ExportError> {
    let until = job
        .request
        .until
        .map_or(job.transaction_time, |u| u.min(job.transaction_time));
    let mut counts = Vec::new();
    for resource_type in types {
        let counted = source.count(&ScanRequest {
            since: job.request.since,
            stored_since: job.request.since,
            until,
            ..ScanRequest::whole(resource_type, &job.scope, job.transaction_time)
        })?;
        match counted {
            Some(count) => counts.push(count),
            None => return Ok(None),
        }
    }
    Ok(Some(counts))
}

/// The header line of a patient's resource block.
fn header(patient: &str) -> Vec<u8> {
    let reference = serde_json::to_string(&format!("Patient/{patient}")).expect("a string");
    format!(r#"{{"resourceType":"Parameters","parameter":[{{"name":"header","valueReference":{{"reference":{reference}}}}}]}}"#).into_bytes()
}

/// Whether a patient id is among the export's patients (planned, in shards' documents): read
/// on first need, which only a resource in several patients' compartments has.
struct Universe {
    jobs: JobStore,
    runtime: Handle,
    job_id: String,
    shards: Vec<usize>,
    loaded: Option<HashSet<String>>,
}

impl Universe {
    fn contains(&mut self, id: &str) -> Result<bool, SinkError> {
        if self.loaded.is_none() {
            let mut all = HashSet::new();
            for &shard in &self.shards {
                all.extend(load_patients(
                    &self.jobs,
                    &self.runtime,
                    &self.job_id,
                    shard,
                )?);
            }
            self.loaded = Some(all);
        }
        Ok(self.loaded.as_ref().is_some_and(|all| all.contains(id)))
    }
}

pub(super) fn load_patients(
    jobs: &JobStore,
    runtime: &Handle,
    job_id: &str,
    shard: usize,
) -> Result<Vec<String>, SinkError> {
    let path = format!("patients of shard {shard}");
    match runtime.block_on(jobs.patients(job_id, shard)) {
        Ok(Some(ids)) => Ok(ids),
        Ok(None) => Err(StorageError::NotFound(path).into()),
        Err(error) => Err(job_read_error(path, error)),
    }
}

/// A job document (`path`) a shard's thread could not read, as the error of its writing: a
/// storage failure as it is, any other as the storage service's.
pub(super) fn job_read_error(path: String, error: JobError) -> SinkError {
    match error {
        JobError::Storage(error) => error.into(),
        other => StorageError::Service {
            path,
            detail: other.to_string(),
        }
        .into(),
    }
}

/// What one shard of an organized export reads and writes.
pub struct BlockShard {
    /// This shard's patients still to write, in order.
    patients: Vec<String>,
    types: Vec<String>,
    shapings: Vec<Shaping>,
    since: Option<DateTime<Utc>>,
    stored_since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
    snapshot: DateTime<Utc>,
    universe: Universe,
    /// This shard's sections of the partition files, each with its file and its type's place in
    /// `types`, when the export read its types in a first phase (a source that cannot stream
    /// compartments).
    partitions: Option<Vec<(usize, String, Section)>>,
    storage: Arc<dyn ObjectStore>,
    /// The resources between their reading and their blocks (its memory kept from group to
    /// group).
    spill: Spill,
}

impl BlockShard {
    /// Prepares shard `shard` of `job`, after `resume` (the last patient a paused run wrote).
    /// Runs on the shard's own thread: it blocks on `runtime`.
    pub fn load(
        exports: &Exports,
        runtime: Handle,
        job: &Job,
        shard: usize,
        resume: Option<&Cursor>,
        window: (Option<DateTime<Utc>>, Option<DateTime<Utc>>, DateTime<Utc>),
    ) -> Result<BlockShard, ScanError> {
        let mut patients = load_patients(&exports.jobs, &runtime, &job.id, shard)?;
        match resume {
            None => {}
            Some(Cursor::Id { id }) => match patients.iter().position(|patient| patient == id) {
                Some(at) => drop(patients.drain(..=at)),
                None => {
                    return Err(crate::source::SourceError::Unsupported(format!(
                        "a shard of resource blocks cannot resume after {id:?}, not one of its patients"
                    ))
                    .into())
                }
            },
            Some(other) => {
                return Err(crate::source::SourceError::Unsupported(format!(
                    "a shard of resource blocks cannot resume at {other:?}"
                ))
                .into())
            }
        }
        let planned_types = job
            .shards
            .get(shard)
            .and_then(|planned| planned.patients.as_ref())
            .map(|range| range.types.clone())
            .filter(|types| !types.is_empty());
        let types = match planned_types {
            Some(types) => types,
            None => block_types(exports.source.as_ref(), &job.request)?,
        };
        let shapings = types.iter().map(|t| Shaping::of(&job.request, t)).collect();
        let shards: Vec<usize> = super::partitions::block_shards(job).collect();
        let partitions = match super::partitions::partition_shards(job).next() {
            Some(_) => Some(super::partitions::sections_of(
                exports, &runtime, job, shard, &types,
            )?),
            None => None,
        };
        let (since, stored_since, until) = window;
        Ok(BlockShard {
            patients,
            types,
            shapings,
            since,
            stored_since,
            until,
            snapshot: job.transaction_time,
            universe: Universe {
                jobs: exports.jobs.clone(),
                runtime,
                job_id: job.id.clone(),
                shards,
                loaded: None,
            },
            partitions,
            storage: exports.storage.clone(),
            spill: Spill::default(),
        })
    }

    /// Writes the blocks of the shard's patients: from its partition when the export has a first
    /// phase, else group by group as the source streams their compartments (past `pause_after`,
    /// pausing after a group; the cursor is the last patient written). `go_on` says whether to
    /// keep going.
    pub fn write(
        mut self,
        source: &dyn ResourceSource,
        writer: &mut RollingNdjsonWriter,
        go_on: &dyn Fn() -> bool,
        pause_after: Option<std::time::Instant>,
    ) -> Result<Scanned, ScanError> {
        let patients = std::mem::take(&mut self.patients);
        if let Some(sections) = self.partitions.take() {
            return self.write_partitioned(&sections, &patients, writer, go_on);
        }
        match self.write_streamed(source, &patients, writer, go_on, pause_after)? {
            Some(scanned) => Ok(scanned),
            None => Err(SinkError::Permanent(
                "this export was planned without the first phase its source needs (a source that \
                 cannot stream compartments): start it again"
                    .into(),
            )
            .into()),
        }
    }

    /// Writes the blocks of each group of patients as the source streams their compartments
    /// (`None`: the source cannot).
    fn write_streamed(
        &mut self,
        source: &dyn ResourceSource,
        patients: &[String],
        writer: &mut RollingNdjsonWriter,
        go_on: &dyn Fn() -> bool,
        pause_after: Option<std::time::Instant>,
    ) -> Result<Option<Scanned>, ScanError> {
        let request = CompartmentScan {
            patients,
            types: &self.types,
            since: self.since,
            stored_since: self.stored_since,
            until: self.until,
            snapshot: self.snapshot,
            pause_after,
        };
        let (spill, universe, shapings) = (&mut self.spill, &mut self.universe, &self.shapings);
        spill.clear();
        let mut entries: Vec<Entry> = Vec::new();
        let mut group: std::ops::Range<usize> = 0..0;
        let mut positions: HashMap<&str, u32> = HashMap::new();
        let mut count = 0;
        let scanned = source.scan_compartments(&request, &mut |row| {
            if !go_on() {
                return Err(SinkError::Stopped);
            }
            if row.patients != group {
                count += write_blocks(spill, &mut entries, &patients[group.clone()], writer)?;
                group = row.patients.clone();
                positions = positions_of(&patients[group.clone()]);
            }
            let resource_type = &request.types[row.rank];
            let owner = owner_of(resource_type, row.resource, &mut |id| {
                Ok(match positions.get(id) {
                    Some(&at) => Place::Here(at),
                    None if universe.contains(id)? => Place::Elsewhere,
                    None => Place::Outside,
                })
            })?;
            let Some(owner) = owner else {
                return Ok(());
            };
            if let Some(bytes) = shapings[row.rank].shape(row.resource)? {
                entries.push(spill.keep(owner, row.rank, &bytes)?);
            }
            Ok(())
        })?;
        let Some(scanned) = scanned else {
            return Ok(None);
        };
        count += write_blocks(spill, &mut entries, &patients[group], writer)?;
        Ok(Some(Scanned {
            count,
            paused: scanned.paused,
        }))
    }

    /// Writes the blocks of the shard's patients from its `sections` of the partition files
    /// (already shaped, each line its patient's place in `patients`), read a few ahead into the
    /// spill.
    fn write_partitioned(
        &mut self,
        sections: &[(usize, String, Section)],
        patients: &[String],
        writer: &mut RollingNdjsonWriter,
        go_on: &dyn Fn() -> bool,
    ) -> Result<Scanned, ScanError> {
        let runtime = self.universe.runtime.clone();
        let spill = &mut self.spill;
        spill.clear();
        let (bytes, count) = sections
            .iter()
            .fold((0, 0), |(bytes, count), (_, _, section)| {
                (bytes + section.end - section.start, count + section.count)
            });
        spill.expect(bytes);
        let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
        let read = super::partitions::read_sections(&self.storage, &runtime, sections);
        for ((rank, path, _), lines) in sections.iter().zip(read) {
            if !go_on() {
                return Err(SinkError::Stopped.into());
            }
            let lines = lines?;
            for line in super::partitions::lines(&lines) {
                let (owner, resource) = line?;
                if owner as usize >= patients.len() {
                    return Err(SinkError::Permanent(format!(
                        "partition file {path} names a patient beyond its shard's"
                    ))
                    .into());
                }
                entries.push(spill.keep(owner, *rank, resource)?);
            }
        }
        Ok(Scanned::whole(write_blocks(
            spill,
            &mut entries,
            patients,
            writer,
        )?))
    }
}

/// Writes the blocks of `entries` (of `patients`, in the spill), in patient order; each block's
/// types in block order and each type's resources in the order they were read. Empties
/// `entries` and the spill; returns how many resources it wrote.
fn write_blocks(
    spill: &mut Spill,
    entries: &mut Vec<Entry>,
    patients: &[String],
    writer: &mut RollingNdjsonWriter,
) -> Result<u64, SinkError> {
    // Stable: within a block, each type's resources stay in the order they were read.
    entries.sort_by_key(|entry| (entry.owner, entry.rank));
    for block in entries.chunk_by(|a, b| a.owner == b.owner) {
        let header = header(&patients[block[0].owner as usize]);
        let bytes: u64 = block.iter().map(|e| u64::from(e.length) + 1).sum();
        writer.begin_block(&header, header.len() as u64 + 1 + bytes)?;
        // Resources read one after another lie one after another in the spill (a patient's
        // resources of a type, as the store holds them): each such run is read back at once.
        let mut rest = block;
        while !rest.is_empty() {
            let start = rest[0].offset;
            let mut end = start + u64::from(rest[0].length);
            let mut taken = 1;
            while let Some(next) = rest.get(taken) {
                if next.offset != end || end - start >= SPILL_RUN {
                    break;
                }
                end += u64::from(next.length);
                taken += 1;
            }
            let run = spill.read(start, end)?;
            for entry in &rest[..taken] {
                let at = (entry.offset - start) as usize;
                writer.push(&run[at..at + entry.length as usize])?;
            }
            rest = &rest[taken..];
        }
        writer.end_block();
    }
    let written = entries.len() as u64;
    entries.clear();
    spill.clear();
    Ok(written)
}

/// Each patient of a group by id, with its place in it.
fn positions_of(group: &[String]) -> HashMap<&str, u32> {
    group
        .iter()
        .enumerate()
        .map(|(at, id)| (id.as_str(), at as u32))
        .collect()
}

/// One resource in the spill file: whose block (its patient's place in the shard), its type's
/// place in block order, and where its bytes are.
struct Entry {
    owner: u32,
    rank: u16,
    offset: u64,
    length: u32,
}

/// Where a patient's block is, as a reader of some patients sees it.
pub(super) enum Place<T> {
    /// Among the patients read: the block is `T`.
    Here(T),
    /// An exported patient read elsewhere.
    Elsewhere,
    /// Not an exported patient.
    Outside,
}

/// The block that holds `resource` (as `place` locates patients), if it is among those read: a
/// Patient is its own; any other resource goes to the first, by id, of the exported patients
/// whose compartment holds it (so that each resource has one block, whichever group, shard or
/// partition reads it).
pub(super) fn owner_of<T>(
    resource_type: &str,
    resource: &[u8],
    place: &mut dyn FnMut(&str) -> Result<Place<T>, SinkError>,
) -> Result<Option<T>, SinkError> {
    let here = |place: Place<T>| match place {
        Place::Here(block) => Some(block),
        _ => None,
    };
    if resource_type != "Patient" {
        if let Some([only]) = patients_named(resource).as_deref() {
            return Ok(here(place(only)?));
        }
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(resource) else {
        return Ok(None);
    };
    let id = value
        .get("id")
        .and_then(|id| id.as_str())
        .unwrap_or_default();
    if resource_type == "Patient" {
        return Ok(here(place(id)?));
    }
    let mut candidates = patient_ids(resource_type, id, &value);
    candidates.sort_unstable();
    for candidate in candidates {
        match place(&candidate)? {
            Place::Here(block) => return Ok(Some(block)),
            Place::Elsewhere => return Ok(None),
            Place::Outside => {}
        }
    }
    Ok(None)
}

/// The distinct ids of every `Patient/{id}` written in a resource's JSON, when the text can be
/// trusted to show them (no `\/` or `\u` escapes): a compartment's patients are among them, so a
/// resource naming one patient belongs to that patient's block, without parsing it.
fn patients_named(resource: &[u8]) -> Option<Vec<&str>> {
    static PATIENT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"Patient/"));
    let escaped = memchr::memchr_iter(b'\\', resource)
        .any(|at| matches!(resource.get(at + 1), Some(b'/' | b'u')));
    if escaped {
        return None;
    }
    let mut ids: Vec<&str> = Vec::new();
    for at in PATIENT.find_iter(resource) {
        let rest = &resource[at + "Patient/".len()..];
        let length = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-' || **b == b'.')
            .count();
        let ends_well = matches!(rest.get(length), Some(b'"' | b'/'));
        if length == 0 || !ends_well {
            // Not a reference this scan reads: the careful way decides.
            return None;
        }
        let id = std::str::from_utf8(&rest[..length]).ok()?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patients_a_resource_names_are_read_from_its_text_when_it_can_be_trusted() {
        let one = br#"{"subject":{"reference":"Patient/p-1"},"encounter":{"reference":"Encounter/e"},"x":{"reference":"http://h/fhir/Patient/p-1/_history/2"}}"#;
        assert_eq!(patients_named(one), Some(vec!["p-1"]));
        let two =
            br#"{"subject":{"reference":"Patient/a"},"performer":[{"reference":"Patient/b"}]}"#;
        assert_eq!(patients_named(two), Some(vec!["a", "b"]));
        assert_eq!(
            patients_named(br#"{"subject":{"reference":"Patient\/a"}}"#),
            None
        );
        assert_eq!(patients_named(br#"{"note":"Patient/ a"}"#), None);
        assert_eq!(patients_named(br#"{"id":"x"}"#), Some(vec![]));
    }

    #[test]
    fn the_spill_gives_back_what_it_was_given_from_memory_and_from_its_file() {
        let mut spill = Spill::holding_in_memory(10);
        let pieces: [&[u8]; 4] = [b"abcd", b"efgh", b"ijkl", b"mnop"];
        let offsets: Vec<u64> = pieces.iter().map(|p| spill.append(p).unwrap()).collect();
        assert_eq!(offsets, [0, 4, 8, 12]);
        assert!(
            spill.file.is_some(),
            "past 10 bytes, the rest went to a file"
        );
        assert_eq!(spill.read(4, 8).unwrap(), b"efgh");
        assert_eq!(spill.read(12, 16).unwrap(), b"mnop");
        assert_eq!(
            spill.read(4, 12).unwrap(),
            b"efghijkl",
            "a run across the two"
        );
        assert_eq!(spill.read(0, 16).unwrap(), b"abcdefghijklmnop");
        assert_eq!(spill.read(8, 12).unwrap(), b"ijkl");
    }

    #[test]
    fn a_header_names_its_patient() {
        let header: serde_json::Value = serde_json::from_slice(&header("p.1-x")).unwrap();
        assert_eq!(header["resourceType"], "Parameters");
        assert_eq!(header["parameter"][0]["name"], "header");
        assert_eq!(
            header["parameter"][0]["valueReference"]["reference"],
            "Patient/p.1-x"
        );
    }
}
