//! The embedded FHIR store: one SQLite file holding each resource's JSON and its compartments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{PatientScope, ResourceSource, ScanError, ScanRequest, SinkError, SourceError};
use crate::fhir::types::R4_RESOURCE_TYPES;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    last_updated INTEGER NOT NULL,
    content_hash INTEGER NOT NULL,
    import_run INTEGER NOT NULL,
    json BLOB NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS history (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    last_updated INTEGER NOT NULL,
    superseded_at INTEGER NOT NULL,
    json BLOB NOT NULL,
    PRIMARY KEY (type, id, last_updated)
);
CREATE TABLE IF NOT EXISTS urn_alias (
    urn TEXT PRIMARY KEY,
    reference TEXT NOT NULL
) WITHOUT ROWID;
";

/// Patient-compartment links, without their indexes (`COMPARTMENT_INDEXES`).
pub(crate) const COMPARTMENT_TABLE: &str = "
CREATE TABLE IF NOT EXISTS compartment (
    patient_id TEXT NOT NULL,
    type TEXT NOT NULL,
    id TEXT NOT NULL
);
";

/// The compartment table's indexes. A load into an empty store builds them once at the end (a
/// sort), rather than inserting every link into two random-order B-trees as it goes.
pub(crate) const COMPARTMENT_INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS compartment_by_patient ON compartment (patient_id, type, id);
CREATE INDEX IF NOT EXISTS compartment_by_resource ON compartment (type, id);
";

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SourceError> {
        let store = Self { path: path.into() };
        if let Some(parent) = store.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| SourceError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let conn = store.connect()?;
        conn.execute_batch("PRAGMA page_size = 16384; PRAGMA journal_mode = WAL;")
            .and_then(|_| conn.execute_batch(SCHEMA))
            .and_then(|_| conn.execute_batch(COMPARTMENT_TABLE))
            .and_then(|_| {
                // Stores made before the indexes were separate keep the ones they have.
                let indexed: bool = conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM pragma_index_list('compartment'))",
                    [],
                    |row| row.get(0),
                )?;
                if indexed {
                    Ok(())
                } else {
                    conn.execute_batch(COMPARTMENT_INDEXES)
                }
            })
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
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -16384; PRAGMA temp_store = MEMORY;",
        )
        .map_err(|e| self.error(e))?;
        Ok(conn)
    }

    pub(crate) fn error(&self, source: rusqlite::Error) -> SourceError {
        SourceError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Number of stored resources.
    pub fn count(&self) -> Result<u64, SourceError> {
        let conn = self.connect()?;
        conn.query_row("SELECT count(*) FROM resources", [], |row| row.get(0))
            .map_err(|e| self.error(e))
    }

    /// The ids of the patients whose compartment holds the resource.
    pub fn compartments_of(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<String>, SourceError> {
        let conn = self.connect()?;
        let mut statement = conn
            .prepare("SELECT patient_id FROM compartment WHERE type = ?1 AND id = ?2 ORDER BY patient_id")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![resource_type, id], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.error(e))
    }
}

pub(crate) fn micros(instant: DateTime<Utc>) -> i64 {
    instant.timestamp_micros()
}

impl ResourceSource for EmbeddedStore {
    /// One index probe per R4 type: constant time, whatever the store's size.
    fn resource_types(&self) -> Result<Vec<String>, SourceError> {
        // One index seek per stored type (a skip scan), not one per R4 type: on a cold page cache
        // each seek is a disk read.
        let conn = self.connect()?;
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

    fn read(&self, resource_type: &str, id: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let conn = self.connect()?;
        conn.query_row(
            "SELECT json FROM resources WHERE type = ?1 AND id = ?2",
            params![resource_type, id],
            |row| row.get(0),
        )
        .optional()
        .map_err(|e| self.error(e))
    }

    /// Current versions in the window, then earlier versions that were current at the snapshot.
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<u64, ScanError> {
        let conn = self.connect()?;
        let queries = self.queries(&conn, request, "r.json")?;
        let mut count = 0;
        for query in queries {
            let mut statement = conn.prepare(&query).map_err(|e| self.error(e))?;
            let mut rows = statement.query(bind(request)).map_err(|e| self.error(e))?;
            while let Some(row) = rows.next().map_err(|e| self.error(e))? {
                let json = row
                    .get_ref(0)
                    .and_then(|v| Ok(v.as_blob()?))
                    .map_err(|e| self.error(e))?;
                sink(json)?;
                count += 1;
            }
        }
        Ok(count)
    }
}

/// The parameters of the scan queries: type, since, until, snapshot, after id.
fn bind<'a>(request: &'a ScanRequest<'a>) -> (&'a str, i64, i64, i64, &'a str) {
    (
        request.resource_type,
        request.since.map(micros).unwrap_or(i64::MIN),
        micros(request.until.min(request.snapshot)),
        micros(request.snapshot),
        request.after_id.unwrap_or(""),
    )
}

impl EmbeddedStore {
    /// The rowid span of a type's current rows when at least half the rows in it are of that type,
    /// as after a load of per-type files. One pass over the type's index entries.
    fn dense_rowid_span(
        &self,
        conn: &Connection,
        resource_type: &str,
    ) -> Result<Option<(i64, i64)>, SourceError> {
        let (count, first, last): (i64, Option<i64>, Option<i64>) = conn
            .query_row(
                "SELECT count(*), min(rowid), max(rowid) FROM resources WHERE type = ?1",
                [resource_type],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .map_err(|e| self.error(e))?;
        Ok(match (first, last) {
            (Some(first), Some(last)) if count.saturating_mul(2) > last - first => {
                Some((first, last))
            }
            _ => None,
        })
    }

    /// The two queries of a scan (current rows, then replaced versions current at the snapshot),
    /// selecting `what`; the patient scope is set up in `conn`'s temp tables.
    fn queries(
        &self,
        conn: &Connection,
        request: &ScanRequest<'_>,
        what: &str,
    ) -> Result<[String; 2], SourceError> {
        let scope = match request.scope {
            PatientScope::All => "",
            PatientScope::AnyPatient => {
                "AND EXISTS (SELECT 1 FROM compartment c WHERE c.type = ?1 AND c.id = r.id)"
            }
            PatientScope::Only(patients) => {
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
                "AND EXISTS (SELECT 1 FROM compartment c WHERE c.type = ?1 AND c.id = r.id
                             AND c.patient_id IN (SELECT id FROM temp.scope_patients))"
            }
        };
        let order = if what == "r.json" {
            "ORDER BY r.id"
        } else {
            ""
        };
        // An export (no paging) reads a type stored together in storage order: each page once,
        // where id order jumps about the table.
        let span = match (what, request.after_id) {
            ("r.json", None) => self.dense_rowid_span(conn, request.resource_type)?,
            _ => None,
        };
        let (type_term, current_order) = match span {
            Some((first, last)) => (
                "+r.type",
                format!("AND r.rowid BETWEEN {first} AND {last} ORDER BY r.rowid"),
            ),
            None => ("r.type", order.to_string()),
        };
        Ok([
            format!(
                "SELECT {what} FROM resources r
                 WHERE {type_term} = ?1 AND r.last_updated > ?2 AND r.last_updated <= ?3 AND r.id > ?5 {scope}
                 {current_order}"
            ),
            format!(
                "SELECT {what} FROM history r
                 WHERE r.type = ?1 AND r.last_updated > ?2 AND r.last_updated <= ?3
                   AND r.superseded_at > ?4 AND r.id > ?5 {scope}
                 {order}"
            ),
        ])
    }
}
