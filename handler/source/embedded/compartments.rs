//! The embedded store's compartment scans (output organized by patient): the scan's patients in
//! groups of neighbours, each group's resources found by their links and read together in storage
//! order, with the versions replaced since the snapshot merged in at their rows' places.

use std::rc::Rc;

use rusqlite::types::Value;
use rusqlite::{params, Connection, Row, Statement};

use super::{micros, EmbeddedStore, PATIENT_INDEX};
use crate::source::{CompartmentRow, CompartmentScan, Cursor, ScanError, Scanned, SinkError};

/// Links a group of patients reads together: about 16 MB of Synthea resources, so that its
/// resources are held in memory between their read and their blocks.
const GROUP_LINKS: usize = 12_000;

/// The scan's patients (with their place in the request) and types (with their rank), and the
/// versions at the snapshot of the rows changed since, one row per patient of their compartment
/// in the scan. Temporary tables on the scan's own connection, in a temporary file past the page
/// cache, so that memory stays bounded whatever a shard or a concurrent load holds.
const TABLES: &str = "
PRAGMA temp_store = FILE;
CREATE TEMP TABLE compartment_patients (at INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
CREATE TEMP TABLE compartment_types (type TEXT PRIMARY KEY, rank INTEGER NOT NULL) WITHOUT ROWID;
CREATE TEMP TABLE changed_versions (
    at INTEGER NOT NULL,
    position INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    json BLOB NOT NULL,
    PRIMARY KEY (at, position)
) WITHOUT ROWID;
";

/// The rows the scan's patients link to, patient by patient in the scan's order.
const LINKS: &str = "SELECT p.at, c.resource FROM temp.compartment_patients p
CROSS JOIN patient_link c ON c.patient_id = p.id ORDER BY p.at";

/// A group's current rows stored by the snapshot, in the window (?1 snapshot run, ?2 since, ?3
/// since run, ?4 until): `?5`, their rowids in order. `CROSS JOIN` keeps SQLite to that order, so
/// that it reads the store from front to back and sorts nothing. (Rows of other types than the
/// scan's are left out by the reader.)
const CURRENT: &str = "SELECT r.type, r.json, r.rowid FROM rarray(?5) a
CROSS JOIN resources r ON r.rowid = a.value
WHERE r.import_run <= ?1 AND (r.last_updated > ?2 OR r.import_run > ?3) AND r.last_updated <= ?4
    AND NOT r.deleted";

/// The versions at the snapshot of the rows stored since (same parameters), once for each of the
/// scan's patients their own content named, at their current row's place.
const CHANGED: &str = "
INSERT INTO temp.changed_versions (at, position, rank, json)
SELECT p.at, s.rowid, t.rank, h.json
FROM temp.compartment_types t
JOIN replaced h ON h.type = t.type AND h.superseded_run > ?1 AND h.stored_run <= ?1
JOIN json_each(h.patients) n
JOIN temp.compartment_patients p ON p.id = n.value
JOIN resources s ON s.type = h.type AND s.id = h.id
WHERE NOT h.deleted AND (h.last_updated > ?2 OR h.stored_run > ?3) AND h.last_updated <= ?4";

/// A group's changed versions (?1 its first patient, ?2 the one after its last), in storage order
/// (one of several of the group's patients more than once).
const CHANGED_OF_GROUP: &str = "SELECT rank, json, position FROM temp.changed_versions
WHERE at >= ?1 AND at < ?2 ORDER BY position";

impl EmbeddedStore {
    /// See `ResourceSource::scan_compartments`.
    pub(super) fn compartments(
        &self,
        request: &CompartmentScan<'_>,
        sink: &mut dyn FnMut(&CompartmentRow<'_>) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        let conn = self.connect()?;
        self.ensure_index(&conn, &self.patient_index, PATIENT_INDEX, "patient");
        let sql = |e| self.error(e);
        fill_tables(&conn, request).map_err(sql)?;
        let runs = self.runs_at(&conn, request.snapshot, request.stored_since)?;
        let window = (
            runs.snapshot,
            request.since.map(micros).unwrap_or(i64::MIN),
            runs.since,
            micros(request.until.min(request.snapshot)),
        );
        conn.execute(CHANGED, params![window.0, window.1, window.2, window.3])
            .map_err(sql)?;
        let mut reader = GroupReader {
            types: request.types,
            current: conn.prepare(CURRENT).map_err(sql)?,
            changed: conn.prepare(CHANGED_OF_GROUP).map_err(sql)?,
            window,
        };
        let mut links = conn.prepare(LINKS).map_err(sql)?;
        let mut links = links.query([]).map_err(sql)?;
        let mut group = Group::default();
        let mut count = 0;
        loop {
            let link = links.next().map_err(sql)?;
            let next_patient = match link {
                Some(row) => Some(row.get::<_, i64>(0).map_err(sql)? as usize),
                None => None,
            };
            // A group ends with its last patient, once it holds enough links.
            let ends = match next_patient {
                Some(at) => group.rowids.len() >= GROUP_LINKS && Some(at) != group.last,
                None => group.last.is_some(),
            };
            if ends {
                if count > 0
                    && request
                        .pause_after
                        .is_some_and(|at| std::time::Instant::now() >= at)
                {
                    let before = group.first.expect("a group has patients");
                    return Ok(Scanned {
                        count,
                        paused: before.checked_sub(1).map(|last| Cursor::Id {
                            id: request.patients[last].clone(),
                        }),
                    });
                }
                count += reader.give(&mut group, sink).map_err(|e| match e {
                    GroupError::Sqlite(e) => ScanError::from(sql(e)),
                    GroupError::Sink(e) => ScanError::from(e),
                })?;
            }
            let (Some(row), Some(at)) = (link, next_patient) else {
                return Ok(Scanned::whole(count));
            };
            group.first.get_or_insert(at);
            group.last = Some(at);
            group.rowids.push(row.get(1).map_err(sql)?);
        }
    }
}

/// The patients of a group (first and last, by place in the scan) and the rows they link to.
#[derive(Default)]
struct Group {
    first: Option<usize>,
    last: Option<usize>,
    rowids: Vec<i64>,
}

enum GroupError {
    Sqlite(rusqlite::Error),
    Sink(SinkError),
}

impl From<rusqlite::Error> for GroupError {
    fn from(e: rusqlite::Error) -> Self {
        GroupError::Sqlite(e)
    }
}

impl From<SinkError> for GroupError {
    fn from(e: SinkError) -> Self {
        GroupError::Sink(e)
    }
}

/// Reads a group's resources.
struct GroupReader<'c> {
    types: &'c [String],
    current: Statement<'c>,
    changed: Statement<'c>,
    window: (i64, i64, i64, i64),
}

impl GroupReader<'_> {
    /// Gives the group's resources to `sink`, each once, in storage order, and empties the group.
    fn give(
        &mut self,
        group: &mut Group,
        sink: &mut dyn FnMut(&CompartmentRow<'_>) -> Result<(), SinkError>,
    ) -> Result<u64, GroupError> {
        let (Some(first), Some(last)) = (group.first.take(), group.last.take()) else {
            return Ok(0);
        };
        let patients = first..last + 1;
        group.rowids.sort_unstable();
        group.rowids.dedup();
        let rowids: Rc<Vec<Value>> = Rc::new(group.rowids.drain(..).map(Value::Integer).collect());
        let (snapshot, since, since_run, until) = self.window;
        let mut current = self
            .current
            .query(params![snapshot, since, since_run, until, rowids])?;
        let mut changed = self
            .changed
            .query(params![patients.start as i64, patients.end as i64])?;
        let mut next_changed = Changed::next(&mut changed)?;
        // Rows come in runs of one type: the last one's rank is kept.
        let mut last_type: (Vec<u8>, Option<usize>) = (Vec::new(), None);
        let types = self.types;
        let mut given = 0;
        let mut give = |rank: usize, resource: &[u8]| {
            given += 1;
            sink(&CompartmentRow {
                patients: patients.clone(),
                rank,
                resource,
            })
        };
        while let Some(row) = current.next()? {
            let position: i64 = row.get(2)?;
            while let Some(version) = next_changed.take_if(|c| c.position < position) {
                give(version.rank, &version.json)?;
                next_changed = Changed::after(&mut changed, version.position)?;
            }
            let resource_type = row.get_ref(0)?.as_bytes().map_err(rusqlite::Error::from)?;
            if last_type.0 != resource_type {
                last_type = (
                    resource_type.to_vec(),
                    types.iter().position(|t| t.as_bytes() == resource_type),
                );
            }
            let Some(rank) = last_type.1 else {
                continue;
            };
            let resource = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            give(rank, resource)?;
        }
        while let Some(version) = next_changed.take() {
            give(version.rank, &version.json)?;
            next_changed = Changed::after(&mut changed, version.position)?;
        }
        Ok(given)
    }
}

/// A version at the snapshot of a row changed since.
struct Changed {
    rank: usize,
    json: Vec<u8>,
    position: i64,
}

impl Changed {
    fn read(row: &Row<'_>) -> rusqlite::Result<Changed> {
        Ok(Changed {
            rank: row.get::<_, i64>(0)? as usize,
            json: row.get(1)?,
            position: row.get(2)?,
        })
    }

    fn next(rows: &mut rusqlite::Rows<'_>) -> rusqlite::Result<Option<Changed>> {
        rows.next()?.map(Changed::read).transpose()
    }

    /// The next version after the one at `position` (which several of the group's patients'
    /// compartments may have listed).
    fn after(rows: &mut rusqlite::Rows<'_>, position: i64) -> rusqlite::Result<Option<Changed>> {
        loop {
            match Changed::next(rows)? {
                Some(version) if version.position == position => continue,
                other => return Ok(other),
            }
        }
    }
}

/// Fills the scan's tables of patients and types.
fn fill_tables(conn: &Connection, request: &CompartmentScan<'_>) -> rusqlite::Result<()> {
    rusqlite::vtab::array::load_module(conn)?;
    conn.execute_batch(TABLES)?;
    let mut patient =
        conn.prepare("INSERT OR IGNORE INTO temp.compartment_patients (at, id) VALUES (?1, ?2)")?;
    for (at, id) in request.patients.iter().enumerate() {
        patient.execute(params![at as i64, id])?;
    }
    let mut resource_type =
        conn.prepare("INSERT INTO temp.compartment_types (type, rank) VALUES (?1, ?2)")?;
    for (rank, name) in request.types.iter().enumerate() {
        resource_type.execute(params![name, rank as i64])?;
    }
    Ok(())
}
