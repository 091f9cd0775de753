//! Loading NDJSON and Bundle files (and `.gz` of either) into the embedded store.
//!
//! Each file is all-or-nothing (a savepoint). `urn:uuid:` references are resolved against every
//! Bundle `fullUrl` in this import and earlier ones. A resource whose content equals what the store
//! held before this import keeps its stored `meta.lastUpdated`, so loading the same data twice
//! changes nothing.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use flate2::read::MultiGzDecoder;
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::embedded::{micros, register_run, TypeStats};
use super::read_once::ReadOnce;
use super::{EmbeddedStore, SourceError};
use crate::fhir::compartment;
use crate::fhir::json::Json;
use crate::fhir::types::is_resource_type;

/// What went wrong with one input file; nothing of that file was imported.
#[derive(Debug, Clone)]
pub struct FileError {
    pub file: PathBuf,
    /// Line (NDJSON, JSON syntax) where known.
    pub line: Option<u64>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub files: usize,
    pub resources_read: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub unresolved_references: u64,
    pub failed: Vec<FileError>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} files, {} resources read: {} created, {} updated, {} unchanged",
            self.files, self.resources_read, self.created, self.updated, self.unchanged
        )?;
        if self.unresolved_references > 0 {
            write!(
                f,
                ", {} urn references left unresolved",
                self.unresolved_references
            )?;
        }
        if !self.failed.is_empty() {
            write!(f, "; {} files failed", self.failed.len())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Ndjson,
    Document,
}

struct InputFile {
    path: PathBuf,
    format: Format,
}

/// Files to import: given files as they are, folders recursively (their `.ndjson`, `.jsonl`, `.json`
/// files and `.gz` of those; hidden entries skipped), in name order.
fn discover(paths: &[PathBuf], failed: &mut Vec<FileError>) -> Vec<InputFile> {
    let mut files = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => walk(path, &mut files, failed),
            Ok(_) => files.push(InputFile {
                format: format_of(path),
                path: path.clone(),
            }),
            Err(e) => failed.push(FileError {
                file: path.clone(),
                line: None,
                message: e.to_string(),
            }),
        }
    }
    files
}

fn walk(dir: &Path, files: &mut Vec<InputFile>, failed: &mut Vec<FileError>) {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) => {
            return failed.push(FileError {
                file: dir.to_path_buf(),
                line: None,
                message: e.to_string(),
            })
        }
    };
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, files, failed);
        } else if has_data_extension(name) {
            files.push(InputFile {
                format: format_of(&path),
                path,
            });
        }
    }
}

fn has_data_extension(name: &str) -> bool {
    let name = name.strip_suffix(".gz").unwrap_or(name);
    [".ndjson", ".jsonl", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

fn format_of(path: &Path) -> Format {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if name.ends_with(".ndjson") || name.ends_with(".jsonl") {
        Format::Ndjson
    } else if name.ends_with(".json") {
        Format::Document
    } else {
        sniff(path).unwrap_or(Format::Document)
    }
}

/// A file of unknown name is NDJSON when its first line alone is a whole JSON object.
fn sniff(path: &Path) -> std::io::Result<Format> {
    let mut first_line = String::new();
    open(path)?.take(64 << 20).read_line(&mut first_line)?;
    let is_object = serde_json::from_str::<Value>(&first_line)
        .map(|v| v.is_object())
        .unwrap_or(false);
    Ok(if is_object {
        Format::Ndjson
    } else {
        Format::Document
    })
}

/// A buffered reader of the file's content, gunzipped when it starts with the gzip magic bytes.
fn open(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    decoded(File::open(path)?)
}

/// `open` for the pass that imports the file: its pages leave the page cache once read.
fn open_to_import(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    decoded(ReadOnce::new(File::open(path)?))
}

fn decoded(file: impl Read + 'static) -> std::io::Result<Box<dyn BufRead>> {
    let mut file = BufReader::with_capacity(1 << 20, file);
    let gzipped = file.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzipped {
        Box::new(BufReader::with_capacity(1 << 20, MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    })
}

/// A JSON document file, decompressed, in memory (parsing from a slice is several times faster).
fn read_whole(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut document = Vec::new();
    open(path)?.read_to_end(&mut document)?;
    Ok(document)
}

#[derive(Deserialize)]
struct BundleIds {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    #[serde(default)]
    entry: Vec<EntryIds>,
}

#[derive(Deserialize)]
struct EntryIds {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    resource: Option<ResourceIds>,
}

#[derive(Deserialize)]
struct ResourceIds {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    id: Option<String>,
}

/// `urn:` fullUrl -> `Type/id` for every Bundle entry in the document files.
fn collect_urns(files: &[InputFile]) -> HashMap<String, String> {
    let mut urns = HashMap::new();
    for file in files.iter().filter(|f| f.format == Format::Document) {
        let Ok(document) = read_whole(&file.path) else {
            continue;
        };
        let Ok(bundle) = serde_json::from_slice::<BundleIds>(&document) else {
            continue;
        };
        if bundle.resource_type.as_deref() != Some("Bundle") {
            continue;
        }
        for entry in bundle.entry {
            let (Some(url), Some(resource)) = (entry.full_url, entry.resource) else {
                continue;
            };
            let Some(resource_type) = resource.resource_type else {
                continue;
            };
            if let Some(id) = resource
                .id
                .or_else(|| url.strip_prefix("urn:uuid:").map(str::to_string))
            {
                if url.starts_with("urn:") {
                    urns.insert(url, format!("{resource_type}/{id}"));
                }
            }
        }
    }
    urns
}

/// Loads `paths` into `store`. Files that fail are listed in the report and leave no trace.
///
/// Two threads: one reads and prepares resources (parse, `urn:` rewriting, compartments,
/// serialisation; an NDJSON line needing no change is only skimmed and kept as it is), the other
/// writes them into SQLite, one savepoint per file.
pub fn import(store: &EmbeddedStore, paths: &[PathBuf]) -> Result<ImportReport, SourceError> {
    let mut report = ImportReport::default();
    let files = discover(paths, &mut report.failed);
    report.files = files.len();
    let mut conn = store.connect()?;
    // Temp files, not memory, for `before_run`: a reload of the whole store remembers every row.
    // The connection's small page cache is kept: a load mostly appends, and a larger cache only
    // holds more of it in fresh memory until the commit (128 MB made no load faster).
    conn.execute_batch("PRAGMA temp_store = FILE")
        .map_err(|e| store.error(e))?;
    // Into a store already holding resources, a load looks each one up: those rows are read
    // through a map of the file rather than copied a page at a time into that small cache. SQLite
    // caps the map at its build's `SQLITE_MAX_MMAP_SIZE` (raised in `.cargo/config.toml`).
    let holds_resources: bool = conn
        .query_row("SELECT EXISTS (SELECT 1 FROM resources)", [], |row| {
            row.get(0)
        })
        .map_err(|e| store.error(e))?;
    if holds_resources {
        conn.execute_batch("PRAGMA mmap_size = 1099511627776")
            .map_err(|e| store.error(e))?;
    }
    // A rollback journal while loading: new pages go straight into the file, rather than through
    // the WAL and a checkpoint copying them again. Only while no one else has the store open.
    let journal: String = conn
        .query_row("PRAGMA journal_mode = TRUNCATE", [], |row| row.get(0))
        .unwrap_or_else(|_| "wal".into());
    let mut urns = known_urns(&conn).map_err(|e| store.error(e))?;
    let new_urns = collect_urns(&files);
    urns.extend(new_urns.iter().map(|(k, v)| (k.clone(), v.clone())));
    let import_time = Utc::now();
    let parser = Parser { urns, import_time };
    let run = last_run(&conn).map_err(|e| store.error(e))? + 1;
    let tx = conn.transaction().map_err(|e| store.error(e))?;
    let mut importer = Importer::new(&tx, new_urns, run, import_time, holds_resources)
        .map_err(|e| store.error(e))?;
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Event>(4);
    let (spent, spent_batches) = std::sync::mpsc::channel::<Vec<Prepared>>();
    let (loading, load_ended) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(|| parser.run(&files, sender, spent_batches));
        scope.spawn(|| start_writeback_until(store.path(), load_ended));
        // Dropped however this ends, which stops the writeback thread at once.
        let _loading = loading;
        let mut counts = Counts::default();
        let mut at_file_start = importer.file_start();
        for event in receiver {
            match event {
                Event::FileStart => {
                    tx.execute_batch("SAVEPOINT file")
                        .map_err(|e| store.error(e))?;
                    counts = Counts::default();
                    at_file_start = importer.file_start();
                }
                Event::Resources(mut batch) => {
                    for prepared in &mut batch {
                        counts.read += 1;
                        counts.unresolved += prepared.unresolved;
                        importer.write(prepared).map_err(|e| store.error(e))?;
                    }
                    // Freed by the thread that allocated it: a free from another thread waits
                    // on the allocator's lock while that thread allocates.
                    let _ = spent.send(batch);
                }
                Event::FileDone => {
                    tx.execute_batch("RELEASE file")
                        .map_err(|e| store.error(e))?;
                    counts.add_to(&mut report);
                }
                Event::FileFailed(index, line, message) => {
                    tx.execute_batch("ROLLBACK TO file; RELEASE file")
                        .map_err(|e| store.error(e))?;
                    importer.undo_file(at_file_start.clone());
                    report.failed.push(FileError {
                        file: files[index].path.clone(),
                        line,
                        message,
                    });
                }
            }
        }
        Ok::<_, SourceError>(())
    })?;
    tracing::debug!("every file written");
    importer.finish(&mut report).map_err(|e| store.error(e))?;
    drop(importer);
    let started = std::time::Instant::now();
    tx.commit().map_err(|e| store.error(e))?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "committed"
    );
    if journal != "wal" {
        conn.execute_batch("PRAGMA journal_mode = WAL")
            .map_err(|e| store.error(e))?;
    }
    // Only now, its rows committed, do snapshots taken from here on read the run.
    register_run(&conn, run).map_err(|e| store.error(e))?;
    Ok(report)
}

/// The last import run, registered if it is not (its import died between committing its rows and
/// registering them): from here on its rows are read.
fn last_run(conn: &Connection) -> rusqlite::Result<i64> {
    let last: i64 = conn.query_row(
        "SELECT coalesce(max(import_run), 0) FROM resources",
        [],
        |row| row.get(0),
    )?;
    register_run(conn, last)?;
    Ok(last)
}

/// How often the store's written pages are sent on to disk while a load runs.
const WRITEBACK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Sends the pages SQLite has written so far on to disk, without waiting, until the load ends:
/// the commit's `fsync` then finds little left to write (at 10x it waited on all 650 MB), and the
/// writing thread does not pay for starting it.
fn start_writeback_until(path: &Path, load_ended: std::sync::mpsc::Receiver<()>) {
    let Ok(file) = File::open(path) else {
        return;
    };
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        load_ended.recv_timeout(WRITEBACK_EVERY)
    {
        crate::os::start_writeback(&file);
    }
}

/// The `urn:` aliases earlier imports recorded.
fn known_urns(conn: &Connection) -> rusqlite::Result<HashMap<String, String>> {
    let mut statement = conn.prepare("SELECT urn, reference FROM urn_alias")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

/// Resources per hand-over from the reading thread to the writing one.
const BATCH: usize = 1024;

/// What the reading thread hands the writing thread.
enum Event {
    FileStart,
    /// Handed over in batches: one hand-over per resource costs more than preparing it.
    Resources(Vec<Prepared>),
    FileDone,
    FileFailed(usize, Option<u64>, String),
}

/// A resource ready to store.
struct Prepared {
    resource_type: String,
    id: String,
    patients: Vec<String>,
    hash: i64,
    /// `meta.lastUpdated` as the resource states it; then `json` is its content as is.
    stated: Option<DateTime<Utc>>,
    /// The JSON to store: as given when `stated`, else with `lastUpdated` set to the import time.
    json: Vec<u8>,
    /// The content without `lastUpdated`, kept when it is not stated, to restore an earlier one
    /// if the content is unchanged.
    value: Option<Vec<u8>>,
    unresolved: u64,
}

/// The top-level members of a resource line the quick path reads, borrowed from the line; every
/// other member is only checked to be valid JSON.
#[derive(Default)]
struct Skim<'a> {
    resource_type: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    meta: Option<&'a RawValue>,
    /// Members that may name a patient in some type's compartment; the type picks among them.
    elements: Vec<(&'a str, &'a RawValue)>,
}

impl<'de> Deserialize<'de> for Skim<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SkimVisitor;
        impl<'de> Visitor<'de> for SkimVisitor {
            type Value = Skim<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<Skim<'de>, A::Error> {
                let mut skim = Skim::default();
                while let Some(name) = members.next_key::<&'de str>()? {
                    match name {
                        "resourceType" => skim.resource_type = Some(members.next_value()?),
                        "id" => skim.id = Some(members.next_value()?),
                        "meta" => skim.meta = Some(members.next_value()?),
                        name if compartment::may_name_a_patient(name) => {
                            skim.elements.push((name, members.next_value()?))
                        }
                        _ => {
                            members.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(skim)
            }
        }
        deserializer.deserialize_map(SkimVisitor)
    }
}

/// The reading side: files to prepared resources, nothing touching the store.
struct Parser {
    urns: HashMap<String, String>,
    import_time: DateTime<Utc>,
}

impl Parser {
    /// Reads `files` into `events`; `spent_batches` brings back the batches the writing side is
    /// done with, to empty here and fill again.
    fn run(
        &self,
        files: &[InputFile],
        events: std::sync::mpsc::SyncSender<Event>,
        spent_batches: std::sync::mpsc::Receiver<Vec<Prepared>>,
    ) {
        let empty_batch = || match spent_batches.try_recv() {
            Ok(mut spent) => {
                spent.clear();
                spent
            }
            Err(_) => Vec::with_capacity(BATCH),
        };
        for (index, file) in files.iter().enumerate() {
            if events.send(Event::FileStart).is_err() {
                return;
            }
            let mut batch = empty_batch();
            let mut emit = |prepared: Prepared| {
                batch.push(prepared);
                batch.len() < BATCH
                    || events
                        .send(Event::Resources(std::mem::replace(
                            &mut batch,
                            empty_batch(),
                        )))
                        .is_ok()
            };
            let parsed = self.parse_file(file, &mut emit);
            if parsed.is_ok() && !batch.is_empty() && events.send(Event::Resources(batch)).is_err()
            {
                return;
            }
            let end = match parsed {
                Ok(()) => Event::FileDone,
                Err(Failure::Input { line, message }) => Event::FileFailed(index, line, message),
                Err(Failure::Stopped) => return,
            };
            if events.send(end).is_err() {
                return;
            }
        }
    }

    fn parse_file(
        &self,
        file: &InputFile,
        emit: &mut dyn FnMut(Prepared) -> bool,
    ) -> Result<(), Failure> {
        let reader = open_to_import(&file.path).map_err(|e| input_error(None, e.to_string()))?;
        match file.format {
            Format::Ndjson => self.parse_ndjson(reader, emit),
            Format::Document => self.parse_document(reader, emit),
        }
    }

    fn parse_ndjson(
        &self,
        mut reader: Box<dyn BufRead>,
        emit: &mut dyn FnMut(Prepared) -> bool,
    ) -> Result<(), Failure> {
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| input_error(Some(number + 1), e.to_string()))?;
            if read == 0 {
                return Ok(());
            }
            number += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Some(prepared) = self.prepare_as_is(&line) {
                if !emit(prepared) {
                    return Err(Failure::Stopped);
                }
                continue;
            }
            let resource = Json::parse_slice(&line)
                .map_err(|e| input_error(Some(number), format!("invalid JSON: {e}")))?;
            let prepared = self
                .prepare(resource, None)
                .map_err(|failure| with_line(failure, number))?;
            if !emit(prepared) {
                return Err(Failure::Stopped);
            }
        }
    }

    fn parse_document(
        &self,
        mut reader: Box<dyn BufRead>,
        emit: &mut dyn FnMut(Prepared) -> bool,
    ) -> Result<(), Failure> {
        let mut document = Vec::new();
        reader
            .read_to_end(&mut document)
            .map_err(|e| input_error(None, e.to_string()))?;
        let document = Json::parse_slice(&document).map_err(|e| {
            input_error(
                Some(e.line() as u64).filter(|l| *l > 0),
                format!("invalid JSON: {e}"),
            )
        })?;
        let text_of = |key: &str| document.get(key).and_then(Json::as_str);
        let is_unpacked_bundle = text_of("resourceType").as_deref() == Some("Bundle")
            && matches!(
                text_of("type").as_deref(),
                Some("transaction" | "batch" | "collection" | "searchset")
            );
        if !is_unpacked_bundle {
            let prepared = self.prepare(document, None)?;
            return if emit(prepared) {
                Ok(())
            } else {
                Err(Failure::Stopped)
            };
        }
        let Json::Object(members) = document else {
            unreachable!("a Bundle is an object")
        };
        let entries = match members.into_iter().find(|(key, _)| key == "entry") {
            Some((_, Json::Array(entries))) => entries,
            None => Vec::new(),
            Some(_) => return Err(input_error(None, "Bundle.entry is not an array")),
        };
        for (index, entry) in entries.into_iter().enumerate() {
            let Json::Object(members) = entry else {
                return Err(input_error(
                    None,
                    format!("Bundle.entry[{index}] is not an object"),
                ));
            };
            let mut resource = None;
            let mut full_url = None;
            for (key, value) in members {
                match key.as_ref() {
                    "resource" => resource = Some(value),
                    "fullUrl" => full_url = value.as_str().map(|url| url.into_owned()),
                    _ => {}
                }
            }
            let Some(resource) = resource else {
                continue;
            };
            let prepared = self
                .prepare(resource, full_url.as_deref())
                .map_err(|failure| match failure {
                    Failure::Input { message, line } => {
                        input_error(line, format!("Bundle.entry[{index}]: {message}"))
                    }
                    other => other,
                })?;
            if !emit(prepared) {
                return Err(Failure::Stopped);
            }
        }
        Ok(())
    }

    /// The quick way for an NDJSON line that needs no change (no `urn:` reference to rewrite,
    /// `meta.lastUpdated` stated): only the type, id, `lastUpdated` and the compartment's elements
    /// are read, and the line is stored as it is. `None` sends the line the full way, which also
    /// words any error.
    fn prepare_as_is(&self, line: &[u8]) -> Option<Prepared> {
        #[derive(Deserialize)]
        struct Meta<'a> {
            #[serde(rename = "lastUpdated", borrow)]
            last_updated: Option<&'a str>,
        }
        let line = line.trim_ascii();
        if memchr::memmem::find(line, b"\"urn:").is_some() {
            return None;
        }
        // Validated once here: reading from a `str`, serde_json does not check skipped text again.
        let text = simdutf8::basic::from_utf8(line).ok()?;
        let skim: Skim = serde_json::from_str(text).ok()?;
        let resource_type: &str = serde_json::from_str(skim.resource_type?.get()).ok()?;
        let id: &str = serde_json::from_str(skim.id?.get()).ok()?;
        if !is_resource_type(resource_type) || !is_valid_id(id) {
            return None;
        }
        let meta: Meta = serde_json::from_str(skim.meta?.get()).ok()?;
        let stated = DateTime::parse_from_rfc3339(meta.last_updated?)
            .ok()?
            .with_timezone(&Utc);
        let mut elements = Map::new();
        for (name, raw) in skim.elements {
            if compartment::elements_read(resource_type).any(|read| read == name) {
                elements.insert(name.to_string(), serde_json::from_str(raw.get()).ok()?);
            }
        }
        Some(Prepared {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            patients: compartment::patient_ids(resource_type, id, &Value::Object(elements)),
            hash: xxhash_rust::xxh3::xxh3_64(line) as i64,
            stated: Some(stated),
            json: line.to_vec(),
            value: None,
            unresolved: 0,
        })
    }

    /// Checks a resource and makes it ready to store: `urn:` references resolved, an id from its
    /// `urn:uuid:` full URL, `lastUpdated` set when not stated. Edited on a lossless tree, so every
    /// value the import does not change is stored as the input wrote it.
    fn prepare(&self, mut resource: Json, full_url: Option<&str>) -> Result<Prepared, Failure> {
        if !matches!(resource, Json::Object(_)) {
            return Err(input_error(None, "not a FHIR resource (not a JSON object)"));
        }
        let resource_type = match resource.get("resourceType").map(Json::as_str) {
            Some(Some(name)) if is_resource_type(&name) => name.into_owned(),
            Some(Some(name)) => {
                return Err(input_error(None, format!("unknown resourceType {name:?}")))
            }
            _ => return Err(input_error(None, "not a FHIR resource (no resourceType)")),
        };
        let stated_id = resource
            .get("id")
            .map(|id| id.as_str().map(|id| id.into_owned()));
        let id = match (
            stated_id,
            full_url.and_then(|url| url.strip_prefix("urn:uuid:")),
        ) {
            (Some(Some(id)), _) => id,
            (None, Some(uuid)) => {
                resource.set("id", Json::string(uuid), usize::MAX);
                uuid.to_string()
            }
            _ => return Err(input_error(None, format!("{resource_type} without an id"))),
        };
        if !is_valid_id(&id) {
            return Err(input_error(
                None,
                format!("{resource_type} id {id:?} is not a valid FHIR id"),
            ));
        }
        let mut unresolved = 0;
        resource.rewrite_references(&mut |reference| {
            if !reference.starts_with("urn:") {
                return None;
            }
            let resolved = self.urns.get(reference).cloned();
            unresolved += u64::from(resolved.is_none());
            resolved
        });
        let stated =
            stated_last_updated(&resource).map_err(|message| input_error(None, message))?;
        let mut elements = Map::new();
        for name in compartment::elements_read(&resource_type) {
            if let Some(element) = resource.get(name) {
                elements.insert(name.to_string(), element.to_value());
            }
        }
        let patients = compartment::patient_ids(&resource_type, &id, &Value::Object(elements));
        let content = resource.to_bytes();
        let hash = xxhash_rust::xxh3::xxh3_64(&content) as i64;
        let (json, value) = match stated {
            Some(_) => (content, None),
            None => (
                with_last_updated(&mut resource, self.import_time),
                Some(content),
            ),
        };
        Ok(Prepared {
            resource_type,
            id,
            patients,
            hash,
            stated,
            json,
            value,
            unresolved,
        })
    }
}

#[derive(Default)]
struct Counts {
    read: u64,
    unresolved: u64,
}

impl Counts {
    fn add_to(&self, report: &mut ImportReport) {
        report.resources_read += self.read;
        report.unresolved_references += self.unresolved;
    }
}

enum Failure {
    Input {
        line: Option<u64>,
        message: String,
    },
    /// The writing side stopped listening.
    Stopped,
}

fn input_error(line: Option<u64>, message: impl Into<String>) -> Failure {
    Failure::Input {
        line,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy)]
struct CurrentRow {
    rowid: i64,
    hash: i64,
    last_updated: i64,
    run: i64,
}

/// How far `Importer::stored_lately` leans: after this many new resources in a row, inserts go
/// first again (and after as many stored ones, lookups).
const LATELY: i32 = 64;

struct Importer<'c> {
    conn: &'c Connection,
    /// The two statements every new resource runs, held rather than looked up in the cache.
    insert_resource: rusqlite::Statement<'c>,
    insert_link: rusqlite::Statement<'c>,
    urns: HashMap<String, String>,
    run: i64,
    import_time: DateTime<Utc>,
    /// Leans positive while the resources written lately were stored already, negative while
    /// they were new (within -LATELY..=LATELY): when positive, each is looked up before the insert.
    stored_lately: i32,
    /// Rows this import inserted (a resource given twice is inserted once, then updated).
    created: u64,
    /// Per type, the rows this import inserted, added to `type_stats` at the end.
    inserted: HashMap<String, TypeStats>,
}

/// What the writing side undoes when a file fails.
#[derive(Clone)]
struct FileStart {
    created: u64,
    inserted: HashMap<String, TypeStats>,
}

impl<'c> Importer<'c> {
    fn new(
        conn: &'c Connection,
        urns: HashMap<String, String>,
        run: i64,
        import_time: DateTime<Utc>,
        store_held_resources: bool,
    ) -> rusqlite::Result<Self> {
        conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS before_run (
                 type TEXT NOT NULL, id TEXT NOT NULL, content_hash INTEGER NOT NULL, last_updated INTEGER NOT NULL,
                 PRIMARY KEY (type, id)) WITHOUT ROWID;
             DELETE FROM temp.before_run;",
        )?;
        Ok(Self {
            conn,
            insert_resource: conn.prepare(
                "INSERT INTO resources (type, id, last_updated, content_hash, import_run, json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (type, id) DO NOTHING",
            )?,
            insert_link: conn.prepare(
                "INSERT OR IGNORE INTO patient_link (resource, patient_id) VALUES (?1, ?2)",
            )?,
            urns,
            run,
            import_time,
            stored_lately: if store_held_resources {
                LATELY
            } else {
                -LATELY
            },
            created: 0,
            inserted: HashMap::new(),
        })
    }

    /// Records the Bundle urns of this import so later imports resolve references to them too, and
    /// counts the distinct resources created, updated and left unchanged.
    fn finish(&mut self, report: &mut ImportReport) -> rusqlite::Result<()> {
        let mut insert = self
            .conn
            .prepare_cached("INSERT OR REPLACE INTO urn_alias (urn, reference) VALUES (?1, ?2)")?;
        for (urn, reference) in &self.urns {
            insert.execute(params![urn, reference])?;
        }
        let mut add_stats = self.conn.prepare_cached(
            "INSERT INTO type_stats (type, resources, first_rowid, last_rowid, bytes) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (type) DO UPDATE SET resources = resources + excluded.resources,
                 bytes = bytes + excluded.bytes,
                 first_rowid = min(first_rowid, excluded.first_rowid),
                 last_rowid = max(last_rowid, excluded.last_rowid)",
        )?;
        for (resource_type, stats) in &self.inserted {
            add_stats.execute(params![
                resource_type,
                stats.resources,
                stats.first_rowid,
                stats.last_rowid,
                stats.bytes
            ])?;
        }
        // Driven by the (small) table of rows that existed before: never a scan of the store.
        let (updated, unchanged): (i64, i64) = self.conn.query_row(
            "SELECT coalesce(sum(b.content_hash != r.content_hash), 0), coalesce(sum(b.content_hash = r.content_hash), 0)
             FROM temp.before_run b CROSS JOIN resources r ON r.type = b.type AND r.id = b.id",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        (report.created, report.updated, report.unchanged) =
            (self.created, updated as u64, unchanged as u64);
        self.conn.execute_batch("DELETE FROM temp.before_run")
    }

    fn write(&mut self, prepared: &mut Prepared) -> rusqlite::Result<()> {
        let (resource_type, id, hash, stated) = (
            prepared.resource_type.as_str(),
            prepared.id.as_str(),
            prepared.hash,
            prepared.stated,
        );
        // While most resources are new, the insert is tried first and a lookup follows only on
        // conflict. While most are stored already, the lookup comes first: it reads through the
        // file's map, where the insert's search copies each page it visits.
        let known = match self.stored_lately > 0 {
            true => self.current_row(resource_type, id)?,
            false => None,
        };
        let current = match known {
            Some(current) => current,
            None if self.insert_new(prepared)? => {
                self.stored_lately = (self.stored_lately - 1).max(-LATELY);
                return Ok(());
            }
            None => self
                .current_row(resource_type, id)?
                .expect("the insert conflicted, so the row exists"),
        };
        self.stored_lately = (self.stored_lately + 1).min(LATELY);
        let previous = self.state_before_run(resource_type, id, current)?;
        let restored;
        let (last_updated, json) = match (stated, previous, prepared.value.as_deref()) {
            (Some(stated), _, _) => (stated, &prepared.json),
            (None, Some((prev_hash, prev_updated)), Some(content)) if prev_hash == hash => {
                let mut resource =
                    Json::parse_slice(content).expect("content this import wrote is valid JSON");
                restored = with_last_updated(&mut resource, prev_updated);
                (prev_updated, &restored)
            }
            (None, _, _) => (self.import_time, &prepared.json),
        };
        if current.hash == hash {
            return Ok(());
        }
        if current.run != self.run {
            // The version exports taken before this run's commit read, with its own patients.
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO replaced
                         (type, id, last_updated, stored_run, superseded_run, patients, json)
                     SELECT type, id, last_updated, import_run, ?3,
                         (SELECT json_group_array(patient_id) FROM patient_link WHERE resource = r.rowid),
                         json
                     FROM resources r WHERE type = ?1 AND id = ?2",
                )?
                .execute(params![resource_type, id, self.run])?;
        }
        self.conn
            .prepare_cached(
                "UPDATE resources SET last_updated = ?3, content_hash = ?4, import_run = ?5, json = ?6
                 WHERE type = ?1 AND id = ?2",
            )?
            .execute(params![resource_type, id, micros(last_updated), hash, self.run, json])?;
        self.conn
            .prepare_cached("DELETE FROM patient_link WHERE resource = ?1")?
            .execute([current.rowid])?;
        self.insert_links(current.rowid, &prepared.patients)
    }

    /// Inserts the resource unless its type and id are stored already; true when inserted.
    fn insert_new(&mut self, prepared: &Prepared) -> rusqlite::Result<bool> {
        let inserted = self.insert_resource.execute(params![
            prepared.resource_type,
            prepared.id,
            micros(prepared.stated.unwrap_or(self.import_time)),
            prepared.hash,
            self.run,
            prepared.json
        ])?;
        if inserted == 0 {
            return Ok(false);
        }
        self.created += 1;
        let rowid = self.conn.last_insert_rowid();
        self.count_insert(&prepared.resource_type, rowid, prepared.json.len() as u64);
        self.insert_links(rowid, &prepared.patients)?;
        Ok(true)
    }

    fn count_insert(&mut self, resource_type: &str, rowid: i64, bytes: u64) {
        match self.inserted.get_mut(resource_type) {
            Some(stats) => {
                stats.resources += 1;
                stats.bytes += bytes;
                stats.first_rowid = stats.first_rowid.min(rowid);
                stats.last_rowid = stats.last_rowid.max(rowid);
            }
            None => {
                let first = TypeStats {
                    resources: 1,
                    bytes,
                    first_rowid: rowid,
                    last_rowid: rowid,
                };
                self.inserted.insert(resource_type.to_string(), first);
            }
        }
    }

    fn file_start(&self) -> FileStart {
        FileStart {
            created: self.created,
            inserted: self.inserted.clone(),
        }
    }

    fn undo_file(&mut self, start: FileStart) {
        self.created = start.created;
        self.inserted = start.inserted;
    }

    /// A new resource's links follow the rows inserted before it: appended at the table's end.
    fn insert_links(&mut self, resource: i64, patients: &[String]) -> rusqlite::Result<()> {
        for patient in patients {
            self.insert_link.execute(params![resource, patient])?;
        }
        Ok(())
    }

    fn current_row(&self, resource_type: &str, id: &str) -> rusqlite::Result<Option<CurrentRow>> {
        self.conn
            .prepare_cached("SELECT rowid, content_hash, last_updated, import_run FROM resources WHERE type = ?1 AND id = ?2")?
            .query_row(params![resource_type, id], |r| {
                Ok(CurrentRow { rowid: r.get(0)?, hash: r.get(1)?, last_updated: r.get(2)?, run: r.get(3)? })
            })
            .optional()
    }

    /// The resource's content hash and `lastUpdated` as the store held them before this import.
    /// Rows this import created have no entry: they were absent before.
    fn state_before_run(
        &self,
        resource_type: &str,
        id: &str,
        current: CurrentRow,
    ) -> rusqlite::Result<Option<(i64, DateTime<Utc>)>> {
        let state = match current.run != self.run {
            true => {
                self.remember_before_run(resource_type, id, (current.hash, current.last_updated))?;
                Some((current.hash, current.last_updated))
            }
            false => self
                .conn
                .prepare_cached("SELECT content_hash, last_updated FROM temp.before_run WHERE type = ?1 AND id = ?2")?
                .query_row(params![resource_type, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?,
        };
        Ok(state.map(|(hash, updated)| {
            (
                hash,
                DateTime::from_timestamp_micros(updated).unwrap_or_default(),
            )
        }))
    }

    fn remember_before_run(
        &self,
        resource_type: &str,
        id: &str,
        state: (i64, i64),
    ) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO temp.before_run (type, id, content_hash, last_updated) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![resource_type, id, state.0, state.1])?;
        Ok(())
    }
}

fn with_line(failure: Failure, line: u64) -> Failure {
    match failure {
        Failure::Input { message, .. } => Failure::Input {
            line: Some(line),
            message,
        },
        stopped => stopped,
    }
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `meta.lastUpdated` when the resource states one; an error when it is not a valid instant.
fn stated_last_updated(resource: &Json) -> Result<Option<DateTime<Utc>>, String> {
    let Some(stated) = resource
        .get("meta")
        .and_then(|meta| meta.get("lastUpdated"))
    else {
        return Ok(None);
    };
    let text = stated.as_str().ok_or("meta.lastUpdated is not a string")?;
    DateTime::parse_from_rfc3339(&text)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| format!("meta.lastUpdated {text:?} is not a valid instant"))
}

/// The resource's JSON with `meta.lastUpdated` set (`meta` placed after `id` when new).
fn with_last_updated(resource: &mut Json, instant: DateTime<Utc>) -> Vec<u8> {
    let text = Json::string(&instant.to_rfc3339_opts(SecondsFormat::Millis, true));
    match resource.get_mut("meta") {
        Some(meta @ Json::Object(_)) => meta.set("lastUpdated", text, usize::MAX),
        _ => {
            let position = resource.position("id").map_or(usize::MAX, |at| at + 1);
            let meta = Json::Object(vec![("lastUpdated".into(), text)]);
            resource.set("meta", meta, position);
        }
    }
    resource.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_fhir_rule() {
        assert!(is_valid_id("a-1.B"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn a_line_kept_as_is_is_read_like_a_parsed_one() {
        let parser = Parser {
            urns: HashMap::from([("urn:uuid:1".to_string(), "Patient/p1".to_string())]),
            import_time: DateTime::UNIX_EPOCH,
        };
        let team = br#"{"resourceType":"CareTeam","id":"t","meta":{"lastUpdated":"2020-01-01T00:00:00Z"},"subject":{"reference":"Patient/a"},"participant":[{"member":{"reference":"Patient/b"}},{"member":{"reference":"Practitioner/x"}}]}"#;
        let quick = parser.prepare_as_is(team).unwrap();
        let full = parser
            .prepare(Json::parse_slice(team).unwrap(), None)
            .ok()
            .unwrap();
        assert_eq!(
            (
                &quick.resource_type,
                &quick.id,
                &quick.patients,
                quick.stated
            ),
            (&full.resource_type, &full.id, &full.patients, full.stated)
        );
        assert_eq!(quick.patients, ["a", "b"]);
        assert_eq!(quick.json, team);
        // What needs a change, or an error message, goes the full way.
        for needs_work in [
            &br#"{"resourceType":"Observation","id":"o","meta":{"lastUpdated":"2020-01-01T00:00:00Z"},"subject":{"reference":"urn:uuid:1"}}"#[..],
            br#"{"resourceType":"Observation","id":"o"}"#,
            br#"{"resourceType":"Unicorn","id":"o","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            br#"{"resourceType":"Observation","id":"o/../x","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            br#"[1]"#,
        ] {
            assert!(parser.prepare_as_is(needs_work).is_none());
        }
    }

    #[test]
    fn last_updated_goes_after_id() {
        let json = with_last_updated(
            &mut Json::parse(r#"{"resourceType":"Patient","id":"p","active":true}"#).unwrap(),
            DateTime::UNIX_EPOCH,
        );
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"resourceType":"Patient","id":"p","meta":{"lastUpdated":"1970-01-01T00:00:00.000Z"},"active":true}"#
        );
    }
}
