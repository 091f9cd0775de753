//! Loading NDJSON and Bundle files (and `.gz` of either) into the embedded store.
//!
//! Each file is all-or-nothing (a savepoint). `urn:uuid:` references are resolved against every
//! Bundle `fullUrl` in this import and earlier ones. A resource whose content equals what the store
//! held before this import keeps its stored `meta.lastUpdated`, so loading the same data twice
//! changes nothing.
//!
//! Rooms: `files` finds and opens the inputs and gathers their `urn:` aliases; `parse` is the
//! reading thread, which prepares each resource; `write` is the writing side, which stores them;
//! this module runs the two threads, the writeback hint, and the report.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use chrono::Utc;
use rusqlite::Connection;

use super::embedded::{micros, register_run, TypeStats};
use super::read_once::ReadOnce;
use super::{tuning, EmbeddedStore, SourceError};
use crate::fhir::compartment;
use crate::fhir::json::Json;
use crate::fhir::types::{is_resource_type, is_valid_id};

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
    /// Resources deleted (Bundle entries `request.method: DELETE`).
    pub deleted: u64,
    /// Deletions of resources the store did not hold (or held deleted already): nothing to do.
    pub deleted_absent: u64,
    pub unresolved_references: u64,
    pub failed: Vec<FileError>,
    /// Entries not carried out (a conditional delete), each with why; the rest of their files
    /// were imported.
    pub refused: Vec<FileError>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} files, {} resources read: {} created, {} updated, {} unchanged",
            self.files, self.resources_read, self.created, self.updated, self.unchanged
        )?;
        if self.deleted + self.deleted_absent > 0 {
            write!(f, ", {} deleted", self.deleted)?;
            if self.deleted_absent > 0 {
                write!(
                    f,
                    " ({} deletions found nothing to delete)",
                    self.deleted_absent
                )?;
            }
        }
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
        if !self.refused.is_empty() {
            write!(f, "; {} entries refused", self.refused.len())?;
        }
        Ok(())
    }
}

mod files;
mod parse;
mod write;

use files::*;
use parse::*;
use write::*;

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
    let holds_resources: bool = conn
        .query_row("SELECT EXISTS (SELECT 1 FROM resources)", [], |row| {
            row.get(0)
        })
        .map_err(|e| store.error(e))?;
    let journal = tuning::for_load(&conn, holds_resources).map_err(|e| store.error(e))?;
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
        let mut checkpoint = importer.checkpoint();
        let mut file_index = 0;
        let mut refused = Vec::new();
        for event in receiver {
            match event {
                Event::FileStart => {
                    tx.execute_batch("SAVEPOINT file")
                        .map_err(|e| store.error(e))?;
                    counts = Counts::default();
                    checkpoint = importer.checkpoint();
                    refused.clear();
                }
                Event::Resources(mut batch) => {
                    for prepared in &mut batch {
                        if let Change::Refuse(message) = &prepared.change {
                            refused.push(FileError {
                                file: files[file_index].path.clone(),
                                line: None,
                                message: message.clone(),
                            });
                            continue;
                        }
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
                    report.refused.append(&mut refused);
                    file_index += 1;
                }
                Event::FileFailed(index, line, message) => {
                    file_index = index + 1;
                    tx.execute_batch("ROLLBACK TO file; RELEASE file")
                        .map_err(|e| store.error(e))?;
                    importer.undo_file(checkpoint.clone());
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
    tuning::after_load(&conn, &journal).map_err(|e| store.error(e))?;
    // Only now, its rows committed, do snapshots taken from here on read the run.
    register_run(&conn, run).map_err(|e| store.error(e))?;
    Ok(report)
}

/// Reads the resources of `paths` as an import would store them (`urn:uuid:` references resolved
/// to `Type/id`), without a store: `handler load` sends them on to a FHIR server. `visit` gets each
/// resource's type, id and JSON, and returns `false` to stop. A file that fails is reported; what
/// `visit` was given of it before stays given.
pub fn read_resources(
    paths: &[PathBuf],
    visit: &mut dyn FnMut(&str, &str, &[u8]) -> bool,
) -> Vec<FileError> {
    let mut failed = Vec::new();
    let files = discover(paths, &mut failed);
    let parser = Parser {
        urns: collect_urns(&files),
        import_time: Utc::now(),
    };
    for file in &files {
        // Only what is stored is sent on: `handler load` writes resources, not deletions.
        let mut emit = |prepared: Prepared| {
            prepared.change != Change::Store
                || visit(&prepared.resource_type, &prepared.id, &prepared.json)
        };
        match parser.parse_file(file, &mut emit) {
            Ok(()) => {}
            Err(Failure::Input { line, message }) => failed.push(FileError {
                file: file.path.clone(),
                line,
                message,
            }),
            Err(Failure::Stopped) => break,
        }
    }
    failed
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

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
