//! The embedded FHIR store: one SQLite file holding each resource's JSON and its compartments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

mod compartments;
mod history;

use super::{
    plan, tuning, CompartmentRow, CompartmentScan, Cursor, HistoryPage, HistoryRequest, Part,
    PatientScope, PlanRequest, ResourceSource, ScanError, ScanRequest, Scanned, SinkError,
    SourceError, Version, VersionKinds,
};
use crate::fhir::types::R4_RESOURCE_TYPES;

/// What an export reads is what was stored when it began, whatever `meta.lastUpdated` the rows
/// claim: each import is a run, visible from its `committed_at` in `import_runs` (registered after
/// its rows are committed), and a version an import replaces moves to `replaced` with the patients
/// its own content named and the run that replaced it. A snapshot at instant T reads the current
/// rows of the runs committed by T, and the replaced versions stored by then and replaced after.
///
/// A deletion is a version too: its row (`deleted` = 1) holds only `resourceType`, `id` and `meta`,
/// keeps the compartment links of the version it deleted, and is replaced like any other when
/// the resource is stored again. `version_id` is each version's `meta.versionId`: as the input
/// stated it, else one past the version it replaced.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    last_updated INTEGER NOT NULL,
    content_hash INTEGER NOT NULL,
    import_run INTEGER NOT NULL,
    json BLOB NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    version_id TEXT NOT NULL DEFAULT '1',
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS replaced (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    last_updated INTEGER NOT NULL,
    stored_run INTEGER NOT NULL,
    superseded_run INTEGER NOT NULL,
    patients TEXT NOT NULL,
    json BLOB NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    version_id TEXT NOT NULL DEFAULT '1',
    PRIMARY KEY (type, id, superseded_run)
);
CREATE TABLE IF NOT EXISTS import_runs (
    run INTEGER PRIMARY KEY,
    committed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS urn_alias (
    urn TEXT PRIMARY KEY,
    reference TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS type_stats (
    type TEXT PRIMARY KEY,
    resources INTEGER NOT NULL,
    first_rowid INTEGER NOT NULL,
    last_rowid INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Stores made before deletions were kept get their columns (a constant default: no row rewritten).
const DELETION_COLUMNS: [(&str, &str, &str); 4] = [
    ("resources", "deleted", "INTEGER NOT NULL DEFAULT 0"),
    ("resources", "version_id", "TEXT NOT NULL DEFAULT '1'"),
    ("replaced", "deleted", "INTEGER NOT NULL DEFAULT 0"),
    ("replaced", "version_id", "TEXT NOT NULL DEFAULT '1'"),
];

/// The deletions alone, so that finding those of a window reads no resource.
const DELETION_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS resources_deleted ON resources (type, import_run) WHERE deleted;
CREATE INDEX IF NOT EXISTS replaced_deleted ON replaced (type, stored_run) WHERE deleted;
";

/// Recounts `type_stats` from the resources themselves: one pass over the type index, and the
/// bytes left unknown (0), as summing them reads every resource (26 s at 100x).
const RECOUNT_TYPE_STATS: &str = "
DELETE FROM type_stats;
INSERT INTO type_stats (type, resources, first_rowid, last_rowid, bytes)
    SELECT type, count(*), min(rowid), max(rowid), 0 FROM resources GROUP BY type;
";

/// How many current resources of a type the store holds, and the first and last rowid among them.
/// Kept by every import (rows are never deleted, and a rowid never changes), so a planner knows a
/// type's size and where its rows lie without counting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeStats {
    pub resources: u64,
    pub first_rowid: i64,
    pub last_rowid: i64,
    /// JSON bytes as inserted (not adjusted when an update changes a resource's size; 0 after a
    /// recount): what a planner orders shards by first.
    pub bytes: u64,
}

impl TypeStats {
    /// The first and last rowid of the type's rows.
    fn rowid_span(&self) -> (i64, i64) {
        (self.first_rowid, self.last_rowid)
    }

    /// At least half the rows in the type's rowid span are its own, as after a load of per-type
    /// files: then reading the span in rowid order reads each page once.
    fn is_dense(&self) -> bool {
        self.resources.saturating_mul(2) > self.last_rowid.abs_diff(self.first_rowid)
    }
}

/// Patient-compartment links, keyed by the resource's rowid (stable: rows are never deleted and the
/// store is never vacuumed). A load appends its links in rowid order, so the table grows at its
/// end and needs no index of its own; every question asks by resource.
const PATIENT_LINK_TABLE: &str = "
CREATE TABLE IF NOT EXISTS patient_link (
    resource INTEGER NOT NULL,
    patient_id TEXT NOT NULL,
    PRIMARY KEY (resource, patient_id)
) WITHOUT ROWID;
";

/// Stores of the earlier layout held links by `(patient_id, type, id)` in `compartment`: moved
/// into `patient_link` once, when such a store is opened.
const MOVE_COMPARTMENT_LINKS: &str = "
INSERT OR IGNORE INTO patient_link (resource, patient_id)
    SELECT r.rowid, c.patient_id FROM compartment c JOIN resources r ON r.type = c.type AND r.id = c.id
    ORDER BY 1, 2;
DROP TABLE compartment;
";

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    path: PathBuf,
    /// Kept open for small questions (types, sizes, one resource), which would otherwise spend
    /// most of their time opening a connection.
    planning: Arc<Mutex<Option<Connection>>>,
    /// Set once this process has made sure of `WINDOW_INDEX`.
    window_index: Arc<std::sync::OnceLock<()>>,
    /// Set once this process has made sure of `PATIENT_INDEX`.
    patient_index: Arc<std::sync::OnceLock<()>>,
}

/// What a count of a `lastUpdated` window reads instead of every row of the type. Made by the first
/// count (a search's `_summary=count`, as when this server is another one's source), not by
/// import: exports plan by rowid and never need it, and each import into a store that has it
/// updates it too.
const WINDOW_INDEX: &str = "DROP INDEX IF EXISTS resources_by_last_updated;
    CREATE INDEX IF NOT EXISTS resources_by_window ON resources (type, last_updated, import_run, deleted);";

/// The terms that limit a query to a scope's patients' compartments.
#[derive(Debug, Default)]
struct ScopeTerms {
    /// On a current row `r`.
    current: String,
    /// On a replaced version `h`.
    replaced: String,
    /// On `r`, where a scan reads its rows (its other terms stand in a `CASE`, which SQLite cannot
    /// find rows by): the rows that can be in scope, for SQLite to read those alone (for a list of
    /// patients, the rows they link to and the rows changed since the snapshot, `?4`).
    candidates: String,
}

/// The widest rowid span whose rows a scan of a list of patients gathers in memory.
const ROWS_GATHERED_IN_MEMORY: i64 = 500_000;

/// The links by patient, for a scan of a list of patients' compartments (a Group, `patient`, a
/// shard of an export organized by patient) to read their rows alone. Made by the first such scan,
/// like `WINDOW_INDEX`, so that a store only ever exported whole keeps its loads as fast as they
/// were. With them, the versions by when they were superseded: a scan finds the few rows changed since
/// its snapshot without reading the type's every replaced version.
const PATIENT_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS patient_link_by_patient ON patient_link (patient_id);
     CREATE INDEX IF NOT EXISTS replaced_by_superseded ON replaced (type, superseded_run);";

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SourceError> {
        let store = Self {
            path: path.into(),
            planning: Arc::default(),
            window_index: Arc::default(),
            patient_index: Arc::default(),
        };
        if let Some(parent) = store.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| SourceError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let conn = store.connect()?;
        conn.execute_batch(tuning::CREATE)
            .and_then(|_| conn.execute_batch(SCHEMA))
            .and_then(|_| conn.execute_batch(PATIENT_LINK_TABLE))
            .and_then(|_| {
                // Stores loaded before the table existed (or by a version that did not keep it).
                match type_stats(&conn)? {
                    Some(_) => Ok(()),
                    None => conn.execute_batch(&format!("BEGIN; {RECOUNT_TYPE_STATS} COMMIT;")),
                }
            })
            .and_then(|_| add_deletion_columns(&conn))
            .and_then(|_| conn.execute_batch(DELETION_INDEXES))
            .and_then(|_| move_compartment_links(&conn))
            .and_then(|_| register_earlier_runs(&conn))
            .map_err(|e| store.error(e))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn connect(&self) -> Result<Connection, SourceError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| self.error(e))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| self.error(e))?;
        conn.execute_batch(tuning::CONNECTION)
            .map_err(|e| self.error(e))?;
        Ok(conn)
    }

    /// Runs `question` on the planning connection, opening it the first time.
    fn planning<T>(
        &self,
        question: impl FnOnce(&Connection) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let mut planning = self.planning.lock().unwrap_or_else(|e| e.into_inner());
        let conn = match planning.as_ref() {
            Some(conn) => conn,
            None => planning.insert(self.connect()?),
        };
        question(conn)
    }

    pub(crate) fn error(&self, source: rusqlite::Error) -> SourceError {
        SourceError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// How many resources the store holds, every type (a scan's count is `ResourceSource::count`).
    pub fn stored_resources(&self) -> Result<u64, SourceError> {
        self.planning(|conn| match type_stats(conn).map_err(|e| self.error(e))? {
            Some(stats) => Ok(stats.values().map(|s| s.resources).sum()),
            None => conn
                .query_row("SELECT count(*) FROM resources", [], |row| row.get(0))
                .map_err(|e| self.error(e)),
        })
    }

    /// The ids of the patients whose compartment holds the resource.
    pub fn compartments_of(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<String>, SourceError> {
        let conn = self.connect()?;
        let mut statement = conn
            .prepare(
                "SELECT l.patient_id FROM resources r JOIN patient_link l ON l.resource = r.rowid
                 WHERE r.type = ?1 AND r.id = ?2 ORDER BY l.patient_id",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![resource_type, id], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.error(e))
    }
}

/// Moves the links of a store of the earlier layout, in one transaction that rechecks under the
/// write lock, so two processes opening the store at once move them once.
fn move_compartment_links(conn: &Connection) -> rusqlite::Result<()> {
    let has_old_table = |conn: &Connection| {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'compartment')",
            [],
            |row| row.get::<_, bool>(0),
        )
    };
    if !has_old_table(conn)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let moved = has_old_table(conn)
        .and_then(|old| match old {
            true => conn.execute_batch(MOVE_COMPARTMENT_LINKS),
            false => Ok(()),
        })
        .and_then(|_| conn.execute_batch("COMMIT"));
    if moved.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    moved
}

/// Adds the columns of `DELETION_COLUMNS` a store lacks, rechecked under the write lock so that
/// two processes opening the store at once add them once.
fn add_deletion_columns(conn: &Connection) -> rusqlite::Result<()> {
    let missing = |conn: &Connection| -> rusqlite::Result<Vec<String>> {
        let mut missing = Vec::new();
        for (table, column, definition) in DELETION_COLUMNS {
            let present: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
                [table, column],
                |row| row.get(0),
            )?;
            if !present {
                missing.push(format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {definition};"
                ));
            }
        }
        Ok(missing)
    };
    if missing(conn)?.is_empty() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let added = missing(conn)
        .and_then(|statements| conn.execute_batch(&statements.concat()))
        .and_then(|_| conn.execute_batch("COMMIT"));
    if added.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    added
}

/// Stores of the earlier layouts: their rows become visible to every snapshot, and the replaced
/// versions kept by lastUpdated alone (which cannot say when they were stored) are dropped.
fn register_earlier_runs(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DROP TABLE IF EXISTS history")?;
    let registered: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM import_runs)", [], |row| {
            row.get(0)
        })?;
    if !registered {
        conn.execute(
            "INSERT OR IGNORE INTO import_runs (run, committed_at)
             SELECT max(import_run), 0 FROM resources HAVING max(import_run) IS NOT NULL",
            [],
        )?;
    }
    Ok(())
}

/// Registers `run` as committed now (never before a run registered earlier, should the clock step
/// back): from now on snapshots read its rows.
pub(crate) fn register_run(conn: &Connection, run: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO import_runs (run, committed_at)
         SELECT ?1, max(?2, coalesce(max(committed_at), 0)) FROM import_runs",
        params![run, micros(Utc::now())],
    )?;
    Ok(())
}

/// The last import run committed by `instant` (0 when none was).
fn run_committed_by(conn: &Connection, instant: DateTime<Utc>) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(run), 0) FROM import_runs WHERE committed_at <= ?1",
        [micros(instant)],
        |row| row.get(0),
    )
}

/// Every type's `TypeStats`, when they agree with the table: the highest rowid recorded is the
/// table's highest (a writer that did not keep them would have added rows above it). Two index
/// seeks and a read of a table of a row per type.
pub(crate) fn type_stats(
    conn: &Connection,
) -> rusqlite::Result<Option<HashMap<String, TypeStats>>> {
    let mut statement = conn
        .prepare_cached("SELECT type, resources, first_rowid, last_rowid, bytes FROM type_stats")?;
    let stats = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                TypeStats {
                    resources: row.get(1)?,
                    first_rowid: row.get(2)?,
                    last_rowid: row.get(3)?,
                    bytes: row.get(4)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<HashMap<_, _>>>()?;
    let highest: Option<i64> =
        conn.query_row("SELECT max(rowid) FROM resources", [], |row| row.get(0))?;
    let recorded = stats.values().map(|s| s.last_rowid).max();
    Ok((highest == recorded).then_some(stats))
}

pub(crate) fn micros(instant: DateTime<Utc>) -> i64 {
    instant.timestamp_micros()
}

impl ResourceSource for EmbeddedStore {
    /// From the kept statistics (one small table), else one index seek per stored type.
    fn resource_types(&self, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<String>, SourceError> {
        let mut types = self.planning(|conn| self.types_on(conn))?;
        types.retain(|resource_type| wanted(resource_type));
        Ok(types)
    }

    /// From the kept statistics: a type stored together with more than `max_per_part` resources
    /// is cut into rowid spans of equal length. Without them, by counting `lastUpdated` windows.
    fn plan(&self, request: &PlanRequest<'_>) -> Result<Vec<Part>, SourceError> {
        match self.planning(|conn| self.parts_on(conn, request))? {
            Some(parts) => Ok(parts),
            None => plan::by_last_updated(self, request),
        }
    }

    fn read(&self, resource_type: &str, id: &str) -> Result<Option<Vec<u8>>, SourceError> {
        self.planning(|conn| {
            conn.prepare_cached(
                "SELECT json FROM resources WHERE type = ?1 AND id = ?2 AND NOT deleted",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![resource_type, id], |row| row.get(0))
                    .optional()
            })
            .map_err(|e| self.error(e))
        })
    }

    fn why_deletions_are_unknown(&self, _: &str) -> Result<Option<String>, SourceError> {
        Ok(None)
    }

    /// A type keeps its statistics, and so its place in `resource_types`, when all it holds are
    /// deletions.
    fn is_deleted(&self, resource_type: &str, id: &str) -> Result<bool, SourceError> {
        self.current_is_deletion(resource_type, id)
    }

    fn scan_deleted(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&str) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        self.deleted_ids(request, sink)
    }

    fn history(&self, request: &HistoryRequest<'_>) -> Result<HistoryPage, SourceError> {
        self.history_page(request)
    }

    fn keeps_versions(&self) -> bool {
        true
    }

    fn scan_versions(
        &self,
        request: &ScanRequest<'_>,
        kinds: VersionKinds,
        sink: &mut dyn FnMut(&Version) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        self.versions(request, kinds, sink)
    }

    /// What a scan would read, counted in the indexes (no resource is read): a search's
    /// `_summary=count`. Exports plan by rowid instead.
    fn count(&self, request: &ScanRequest<'_>) -> Result<Option<u64>, SourceError> {
        let conn = self.connect()?;
        // Without it, counting still works, reading the rows.
        self.ensure_index(&conn, &self.window_index, WINDOW_INDEX, "lastUpdated");
        let runs = self.runs(&conn, request)?;
        let mut count = 0;
        let scope = self.scope_terms(&conn, request, true)?;
        for query in count_queries(request, &scope) {
            let counted: i64 = conn
                .query_row(&query, bind(request, runs), |row| row.get(0))
                .map_err(|e| self.error(e))?;
            count += counted as u64;
        }
        Ok(Some(count))
    }

    fn streams_compartments(&self) -> bool {
        true
    }

    /// Found by the patients' links, group by group: a group's resources read together, in
    /// storage order (see `compartments`).
    fn scan_compartments(
        &self,
        request: &CompartmentScan<'_>,
        sink: &mut dyn FnMut(&CompartmentRow<'_>) -> Result<(), SinkError>,
    ) -> Result<Option<Scanned>, ScanError> {
        self.compartments(request, sink).map(Some)
    }

    /// Each resource's version at the snapshot, at its current row's place: in storage order when
    /// the type is stored together, else in id order. A version replaced since the snapshot is read
    /// from `replaced` where its row stands, so that a scan paused and resumed (or a type cut into
    /// parts) reads it once however the store changes meanwhile. A list of patients' rows are
    /// found by patient (their links) and read in rowid order.
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        let conn = self.connect()?;
        let scope = self.scope_terms(&conn, request, true)?;
        let order = match (request.resume, request.after_id) {
            (Some(Cursor::Rowid { rowid }), _) => ScanOrder::Storage {
                span: self.dense_rowid_span(&conn, request.resource_type)?,
                after: Some(*rowid),
            },
            (Some(Cursor::Id { id }), _) => ScanOrder::Id {
                after: Some(id.as_str()),
            },
            (Some(Cursor::LastUpdated { .. }), _) => {
                return Err(SourceError::Unsupported(
                    "the embedded store cannot resume a scan paused by a FHIR server".into(),
                )
                .into())
            }
            // An export (no paging) reads a type stored together in storage order: each page
            // once, where id order jumps about the table.
            (None, None) => match self.dense_rowid_span(&conn, request.resource_type)? {
                Some(span) => ScanOrder::Storage {
                    span: Some(span),
                    after: None,
                },
                // A list of patients' rows are found by patient, in rowid order.
                None if matches!(request.scope, PatientScope::Only(_)) => ScanOrder::Storage {
                    span: None,
                    after: None,
                },
                None => ScanOrder::Id { after: None },
            },
            (None, Some(_)) => ScanOrder::Id { after: None },
        };
        if matches!(order, ScanOrder::Storage { span: Some(_), .. }) {
            conn.execute_batch(tuning::STORAGE_ORDER_SCAN)
                .map_err(|e| self.error(e))?;
        }
        let runs = self.runs(&conn, request)?;
        let query = scan_query(request, &scope, &order);
        let mut statement = conn.prepare(&query).map_err(|e| self.error(e))?;
        let (resource_type, since, until, snapshot, after_id, since_run) = bind(request, runs);
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![
            &resource_type,
            &since,
            &until,
            &snapshot,
            &after_id,
            &since_run,
        ];
        if let ScanOrder::Id { after: Some(id) } = &order {
            values.push(id);
        }
        let mut rows = statement
            .query(values.as_slice())
            .map_err(|e| self.error(e))?;
        let mut count = 0;
        while let Some(row) = rows.next().map_err(|e| self.error(e))? {
            let json = row
                .get_ref(0)
                .and_then(|v| Ok(v.as_blob()?))
                .map_err(|e| self.error(e))?;
            sink(json)?;
            count += 1;
            if request
                .pause_after
                .is_some_and(|at| std::time::Instant::now() >= at)
            {
                let cursor = match order {
                    ScanOrder::Storage { .. } => Cursor::Rowid {
                        rowid: row.get(1).map_err(|e| self.error(e))?,
                    },
                    ScanOrder::Id { .. } => Cursor::Id {
                        id: row.get(2).map_err(|e| self.error(e))?,
                    },
                };
                return Ok(Scanned {
                    count,
                    paused: Some(cursor),
                });
            }
        }
        Ok(Scanned::whole(count))
    }
}

/// The order a scan reads a type's current rows in, and where it starts.
#[derive(Debug, Clone, Copy)]
enum ScanOrder<'a> {
    /// By rowid, after `after`; `span`: the type's rowids when it is stored together.
    Storage {
        span: Option<(i64, i64)>,
        after: Option<i64>,
    },
    /// By id, after `after`.
    Id { after: Option<&'a str> },
}

impl EmbeddedStore {
    fn runs(&self, conn: &Connection, request: &ScanRequest<'_>) -> Result<Runs, SourceError> {
        self.runs_at(conn, request.snapshot, request.stored_since)
    }

    /// The runs of a snapshot and of an export's `_since` (`ScanRequest::stored_since`).
    fn runs_at(
        &self,
        conn: &Connection,
        snapshot: DateTime<Utc>,
        stored_since: Option<DateTime<Utc>>,
    ) -> Result<Runs, SourceError> {
        Ok(Runs {
            snapshot: run_committed_by(conn, snapshot).map_err(|e| self.error(e))?,
            since: match stored_since {
                Some(since) => match run_committed_by(conn, since).map_err(|e| self.error(e))? {
                    0 => i64::MAX,
                    run => run,
                },
                None => i64::MAX,
            },
        })
    }

    fn types_on(&self, conn: &Connection) -> Result<Vec<String>, SourceError> {
        if let Some(stats) = type_stats(conn).map_err(|e| self.error(e))? {
            let mut present: Vec<String> = stats
                .into_iter()
                .filter(|(t, s)| s.resources > 0 && R4_RESOURCE_TYPES.contains(&t.as_str()))
                .map(|(t, _)| t)
                .collect();
            present.sort();
            return Ok(present);
        }
        // A skip scan, not one seek per R4 type: on a cold page cache each seek is a disk read.
        let mut next = conn
            .prepare("SELECT type FROM resources WHERE type > ?1 ORDER BY type LIMIT 1")
            .map_err(|e| self.error(e))?;
        let mut present = Vec::new();
        let mut after = String::new();
        while let Some(resource_type) = next
            .query_row([&after], |row| row.get::<_, String>(0))
            .optional()
            .map_err(|e| self.error(e))?
        {
            if R4_RESOURCE_TYPES.contains(&resource_type.as_str()) {
                present.push(resource_type.clone());
            }
            after = resource_type;
        }
        Ok(present)
    }

    fn parts_on(
        &self,
        conn: &Connection,
        request: &PlanRequest<'_>,
    ) -> Result<Option<Vec<Part>>, SourceError> {
        let Some(stats) = type_stats(conn).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        let Some(s) = stats.get(request.resource_type) else {
            return Ok(None);
        };
        let parts = match s.is_dense() {
            true => s.resources.div_ceil(request.max_per_part.max(1)).max(1),
            false => 1,
        };
        let span = i128::from(s.last_rowid - s.first_rowid + 1);
        let cuts: Vec<i64> = (1..parts)
            .map(|k| s.first_rowid + (span * i128::from(k) / i128::from(parts)) as i64)
            .collect();
        Ok(Some(Part::between_rows(&cuts, s.bytes, s.resources)))
    }
}

/// The import runs a scan's instants stand for.
#[derive(Debug, Clone, Copy)]
struct Runs {
    /// The last run committed at the snapshot: later ones are not read.
    snapshot: i64,
    /// The last run committed at `_since`: a version stored by a later run changed since then,
    /// whatever `lastUpdated` it claims, so an export chained on an earlier one's `transactionTime`
    /// misses nothing loaded in between. `i64::MAX` without `_since`, or when it precedes the
    /// store's first load: then only `lastUpdated` tells what changed.
    since: i64,
}

/// The parameters of the scan queries: type, since, until, snapshot run, after id, since run.
fn bind<'a>(request: &'a ScanRequest<'a>, runs: Runs) -> (&'a str, i64, i64, i64, &'a str, i64) {
    (
        request.resource_type,
        request.since.map(micros).unwrap_or(i64::MIN),
        micros(request.until.min(request.snapshot)),
        runs.snapshot,
        request.after_id.unwrap_or(""),
        runs.since,
    )
}

impl EmbeddedStore {
    /// The rowid span of a type's current rows when they lie together (`TypeStats::is_dense`).
    fn dense_rowid_span(
        &self,
        conn: &Connection,
        resource_type: &str,
    ) -> Result<Option<(i64, i64)>, SourceError> {
        Ok(self
            .type_stats_of(conn, resource_type)?
            .filter(TypeStats::is_dense)
            .map(|s| s.rowid_span()))
    }

    /// A type's statistics: the kept ones, else by one pass over the type's index entries.
    fn type_stats_of(
        &self,
        conn: &Connection,
        resource_type: &str,
    ) -> Result<Option<TypeStats>, SourceError> {
        Ok(match type_stats(conn).map_err(|e| self.error(e))? {
            Some(mut all) => all.remove(resource_type),
            None => conn
                .query_row(
                    "SELECT count(*), min(rowid), max(rowid) FROM resources WHERE type = ?1",
                    [resource_type],
                    |row| {
                        Ok(match (row.get::<_, Option<i64>>(1)?, row.get(2)?) {
                            (Some(first_rowid), Some(last_rowid)) => Some(TypeStats {
                                resources: row.get(0)?,
                                first_rowid,
                                last_rowid,
                                bytes: 0,
                            }),
                            _ => None,
                        })
                    },
                )
                .map_err(|e| self.error(e))?,
        })
    }

    /// Makes sure of an index made on first need (`sql`), once per process (`made`): the scans
    /// that need it meanwhile wait for it (the shards of an export start together), rather than
    /// plan their queries without it. A store that refuses it is only read more slowly: the
    /// failure is logged, not returned.
    fn ensure_index(
        &self,
        conn: &Connection,
        made: &std::sync::OnceLock<()>,
        sql: &str,
        what: &str,
    ) {
        made.get_or_init(|| {
            if let Err(e) = conn.execute_batch(sql) {
                tracing::warn!(store = %self.path.display(), error = %e, "cannot add the {what} index");
            }
        });
    }

    /// The terms that limit a query of `request`'s type (and part of it) to its patients'
    /// compartments. For a list of patients, fills this connection's temporary table of them;
    /// `by_patient`: the rows are found through the patients' links (else found another way, each
    /// checked against them).
    fn scope_terms(
        &self,
        conn: &Connection,
        request: &ScanRequest<'_>,
        by_patient: bool,
    ) -> Result<ScopeTerms, SourceError> {
        // A current row's patients are its links; a replaced version keeps the patients its own
        // content named.
        let links = "patient_link c WHERE c.resource = r.rowid";
        Ok(match request.scope {
            PatientScope::All => ScopeTerms::default(),
            PatientScope::AnyPatient => ScopeTerms {
                current: format!("AND EXISTS (SELECT 1 FROM {links})"),
                replaced: "AND h.patients != '[]'".to_string(),
                candidates: String::new(),
            },
            PatientScope::Only(patients) => {
                // Without it, a scan still works, reading more.
                self.ensure_index(conn, &self.patient_index, PATIENT_INDEX, "patient");
                // The links within the part of the type the scan reads, when it reads one: the
                // set SQLite gathers for the scan holds those rows, not every row of the patients.
                let span = self
                    .type_stats_of(conn, request.resource_type)?
                    .map(|s| s.rowid_span())
                    .map(|(first, last)| {
                        let first = request.rows.from.map_or(first, |from| first.max(from));
                        let last = request.rows.to.map_or(last, |to| last.min(to - 1));
                        (first, last)
                    });
                // The set of rows SQLite gathers for the scan stays in memory while the span is
                // small enough (about 16 MB at the most); past that it goes through the page cache
                // to a temporary file, however many rows a large group holds. (Set before the
                // temporary table, which a change of `temp_store` drops.)
                if span.is_none_or(|(first, last)| last - first > ROWS_GATHERED_IN_MEMORY) {
                    conn.execute_batch("PRAGMA temp_store = FILE")
                        .map_err(|e| self.error(e))?;
                }
                conn.execute_batch(
                    "CREATE TEMP TABLE IF NOT EXISTS scope_patients (id TEXT PRIMARY KEY) WITHOUT ROWID;
                     DELETE FROM temp.scope_patients;",
                )
                .map_err(|e| self.error(e))?;
                let mut insert = conn
                    .prepare("INSERT OR IGNORE INTO temp.scope_patients (id) VALUES (?1)")
                    .map_err(|e| self.error(e))?;
                for patient in patients {
                    insert.execute([patient]).map_err(|e| self.error(e))?;
                }
                let in_scope = "IN (SELECT id FROM temp.scope_patients)";
                // Found by patient, the scope's rows are read alone, in rowid order, not every row
                // of the type with a link lookup each; `+` leaves the finding to another index.
                let rowid = if by_patient { "r.rowid" } else { "+r.rowid" };
                let span = match span {
                    Some((first, last)) => format!("AND c.resource BETWEEN {first} AND {last}"),
                    None => String::new(),
                };
                let linked = format!(
                    "SELECT c.resource FROM patient_link c WHERE c.patient_id {in_scope} {span}"
                );
                let changed = "SELECT s.rowid FROM replaced v JOIN resources s ON s.type = v.type AND s.id = v.id
                     WHERE v.type = ?1 AND v.superseded_run > ?4 AND v.stored_run <= ?4";
                ScopeTerms {
                    current: format!("AND {rowid} IN ({linked})"),
                    replaced: format!("AND EXISTS (SELECT 1 FROM json_each(h.patients) p WHERE p.value {in_scope})"),
                    candidates: format!("AND r.rowid IN ({linked} UNION ALL {changed})"),
                }
            }
        })
    }
}

/// The SQL of a count: current versions in the window, then replaced versions current at the
/// snapshot (in a type's first part only, where a scan reads them too).
fn count_queries(request: &ScanRequest<'_>, terms: &ScopeTerms) -> Vec<String> {
    let (scope, replaced_scope) = (&terms.current, &terms.replaced);
    let rows = request.rows;
    let from = rows.from.map(|from| format!("AND r.rowid >= {from} "));
    let to = rows.to.map(|to| format!("AND r.rowid < {to} "));
    let range = format!("{}{}", from.unwrap_or_default(), to.unwrap_or_default());
    // Without paging, no id term: a count then reads the `lastUpdated` index alone.
    let after_id = match request.after_id {
        Some(_) => "AND r.id > ?5",
        None => "",
    };
    let current = format!(
        "SELECT count(*) FROM resources r
             WHERE r.type = ?1 AND r.import_run <= ?4
               AND (r.last_updated > ?2 OR r.import_run > ?6) AND r.last_updated <= ?3
               {range} {after_id} AND NOT r.deleted {scope}"
    );
    if rows.from.is_some() {
        return vec![current];
    }
    let after_id = after_id.replace("r.id", "h.id");
    vec![
        current,
        format!(
            "SELECT count(*) FROM replaced h
                 WHERE h.type = ?1 AND h.stored_run <= ?4 AND h.superseded_run > ?4 AND NOT h.deleted
                   AND (h.last_updated > ?2 OR h.stored_run > ?6) AND h.last_updated <= ?3
                   {after_id} {replaced_scope}"
        ),
    ]
}

/// The SQL of a scan: one row per resource whose version at the snapshot lies in the window, at
/// its current row's place: `(json, rowid, id)`. A current row stored by the snapshot is that
/// version; a row stored later stands for its replaced version current at the snapshot, if any.
/// Parameters: ?1 type, ?2 since, ?3 until, ?4 snapshot run, ?5 after id (paging), ?6 since run,
/// ?7 resume id.
fn scan_query(request: &ScanRequest<'_>, terms: &ScopeTerms, order: &ScanOrder<'_>) -> String {
    // Where the candidates find the rows, a current row among them is in scope (a row changed
    // since the snapshot is checked by its replaced version): the current term is not asked again.
    let (scope, replaced_scope, candidates) = match terms.candidates.is_empty() {
        true => (terms.current.as_str(), &terms.replaced, ""),
        false => ("", &terms.replaced, terms.candidates.as_str()),
    };
    let rows = request.rows;
    let (type_term, position) = match *order {
        ScanOrder::Storage { span, after } => {
            let mut low = rows.from;
            let mut high = rows.to.map(|to| to - 1);
            if let Some((first, last)) = span {
                low = Some(low.map_or(first, |low| low.max(first)));
                high = Some(high.map_or(last, |high| high.min(last)));
            }
            if let Some(after) = after {
                low = Some(low.map_or(after + 1, |low| low.max(after + 1)));
            }
            let low = low.map(|low| format!("AND r.rowid >= {low} "));
            let high = high.map(|high| format!("AND r.rowid <= {high} "));
            (
                // Where the type lies together, its rowid span alone finds its rows.
                if span.is_some() { "+r.type" } else { "r.type" },
                format!(
                    "{}{}ORDER BY r.rowid",
                    low.unwrap_or_default(),
                    high.unwrap_or_default()
                ),
            )
        }
        ScanOrder::Id { after } => {
            let from = rows.from.map(|from| format!("AND r.rowid >= {from} "));
            let to = rows.to.map(|to| format!("AND r.rowid < {to} "));
            let after = after.map(|_| "AND r.id > ?7 ");
            (
                "r.type",
                format!(
                    "{}{}{}ORDER BY r.id",
                    from.unwrap_or_default(),
                    to.unwrap_or_default(),
                    after.unwrap_or_default()
                ),
            )
        }
    };
    let after_id = match request.after_id {
        Some(_) => "AND r.id > ?5",
        None => "",
    };
    let version_at_snapshot = "SELECT h.json FROM replaced h
             WHERE h.type = r.type AND h.id = r.id AND h.stored_run <= ?4 AND h.superseded_run > ?4";
    format!(
        "SELECT CASE WHEN r.import_run <= ?4 THEN r.json ELSE ({version_at_snapshot}) END, r.rowid, r.id
         FROM resources r
         WHERE {type_term} = ?1 {after_id} {candidates}
           AND CASE WHEN r.import_run <= ?4
               THEN (r.last_updated > ?2 OR r.import_run > ?6) AND r.last_updated <= ?3
                   AND NOT r.deleted {scope}
               ELSE EXISTS ({version_at_snapshot} AND NOT h.deleted
                   AND (h.last_updated > ?2 OR h.stored_run > ?6) AND h.last_updated <= ?3
                   {replaced_scope})
               END
         {position}"
    )
}
