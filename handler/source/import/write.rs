//! The writing side: prepared resources stored in the embedded store, each file all-or-nothing.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::*;

#[derive(Default)]
pub(super) struct Counts {
    pub(super) read: u64,
    pub(super) unresolved: u64,
}

impl Counts {
    pub(super) fn add_to(&self, report: &mut ImportReport) {
        report.resources_read += self.read;
        report.unresolved_references += self.unresolved;
    }
}

pub(super) enum Failure {
    Input {
        line: Option<u64>,
        message: String,
    },
    /// The writing side stopped listening.
    Stopped,
}

pub(super) fn input_error(line: Option<u64>, message: impl Into<String>) -> Failure {
    Failure::Input {
        line,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct CurrentRow {
    pub(super) rowid: i64,
    pub(super) hash: i64,
    pub(super) last_updated: i64,
    pub(super) run: i64,
}

/// How far `Importer::stored_lately` leans: after this many new resources in a row, inserts go
/// first again (and after as many stored ones, lookups).
pub(super) const LATELY: i32 = 64;

pub(super) struct Importer<'c> {
    pub(super) conn: &'c Connection,
    /// The two statements every new resource runs, held rather than looked up in the cache.
    pub(super) insert_resource: rusqlite::Statement<'c>,
    pub(super) insert_link: rusqlite::Statement<'c>,
    pub(super) urns: HashMap<String, String>,
    pub(super) run: i64,
    pub(super) import_time: DateTime<Utc>,
    /// Leans positive while the resources written lately were stored already, negative while
    /// they were new (within -LATELY..=LATELY): when positive, each is looked up before the insert.
    pub(super) stored_lately: i32,
    /// Rows this import inserted (a resource given twice is inserted once, then updated).
    pub(super) created: u64,
    /// Resources this import deleted, and deletions that found nothing to delete.
    pub(super) deleted: u64,
    pub(super) deleted_absent: u64,
    /// Per type, the rows this import inserted, added to `type_stats` at the end.
    pub(super) inserted: HashMap<String, TypeStats>,
}

/// What the writing side undoes when a file fails.
#[derive(Clone)]
pub(super) struct FileCheckpoint {
    pub(super) created: u64,
    pub(super) deleted: (u64, u64),
    pub(super) inserted: HashMap<String, TypeStats>,
}

impl<'c> Importer<'c> {
    pub(super) fn new(
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
                "INSERT INTO resources (type, id, last_updated, content_hash, import_run, json, version_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, coalesce(?7, '1')) ON CONFLICT (type, id) DO NOTHING",
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
            deleted: 0,
            deleted_absent: 0,
            inserted: HashMap::new(),
        })
    }

    /// Records the Bundle urns of this import so later imports resolve references to them too, and
    /// counts the distinct resources created, updated and left unchanged.
    pub(super) fn finish(&mut self, report: &mut ImportReport) -> rusqlite::Result<()> {
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
            // `deleted` (past the JSON) is read only for rows that changed.
            "SELECT coalesce(sum(CASE WHEN b.content_hash = r.content_hash THEN 0 WHEN r.deleted THEN 0 ELSE 1 END), 0),
                 coalesce(sum(b.content_hash = r.content_hash), 0)
             FROM temp.before_run b CROSS JOIN resources r ON r.type = b.type AND r.id = b.id",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        (report.created, report.updated, report.unchanged) =
            (self.created, updated as u64, unchanged as u64);
        (report.deleted, report.deleted_absent) = (self.deleted, self.deleted_absent);
        self.conn.execute_batch("DELETE FROM temp.before_run")
    }

    pub(super) fn write(&mut self, prepared: &mut Prepared) -> rusqlite::Result<()> {
        match prepared.change {
            Change::Store => self.store(prepared),
            Change::Delete => self.delete(&prepared.resource_type, &prepared.id),
            Change::Refuse(_) => Ok(()),
        }
    }

    /// Replaces the current row by a deletion: a version holding only `resourceType`, `id` and
    /// `meta`, keeping the compartment links of the version it deletes.
    fn delete(&mut self, resource_type: &str, id: &str) -> rusqlite::Result<()> {
        // `deleted` is read here only: it lies past the JSON, which a store's lookup need not read.
        let deleted: Option<bool> = self
            .conn
            .prepare_cached("SELECT deleted FROM resources WHERE type = ?1 AND id = ?2")?
            .query_row(params![resource_type, id], |row| row.get(0))
            .optional()?;
        let current = match (deleted, self.current_row(resource_type, id)?) {
            (Some(false), Some(current)) => current,
            _ => {
                self.deleted_absent += 1;
                return Ok(());
            }
        };
        self.state_before_run(resource_type, id, current)?;
        self.keep_replaced(resource_type, id, current)?;
        let version_id = self.next_version(resource_type, id, None)?;
        let tombstone = serde_json::to_vec(&serde_json::json!({
            "resourceType": resource_type,
            "id": id,
            "meta": {
                "versionId": version_id,
                "lastUpdated": self.import_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            },
        }))
        .expect("JSON");
        self.conn
            .prepare_cached(
                "UPDATE resources SET last_updated = ?3, content_hash = ?4, import_run = ?5, json = ?6,
                     deleted = 1, version_id = ?7
                 WHERE type = ?1 AND id = ?2",
            )?
            .execute(params![
                resource_type,
                id,
                micros(self.import_time),
                xxhash_rust::xxh3::xxh3_64(&tombstone) as i64,
                self.run,
                tombstone,
                version_id
            ])?;
        self.deleted += 1;
        Ok(())
    }

    /// The version exports taken before this run's commit read, with its own patients: kept in
    /// `replaced` when an earlier run stored it.
    fn keep_replaced(
        &self,
        resource_type: &str,
        id: &str,
        current: CurrentRow,
    ) -> rusqlite::Result<()> {
        if current.run == self.run {
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO replaced
                     (type, id, last_updated, stored_run, superseded_run, patients, json, deleted, version_id)
                 SELECT type, id, last_updated, import_run, ?3,
                     (SELECT json_group_array(patient_id) FROM patient_link WHERE resource = r.rowid),
                     json, deleted, version_id
                 FROM resources r WHERE type = ?1 AND id = ?2",
            )?
            .execute(params![resource_type, id, self.run])?;
        Ok(())
    }

    /// The `meta.versionId` of a version replacing the current one: as stated, else one past the
    /// current one (past the count of versions kept, when that is not a number).
    fn next_version(
        &self,
        resource_type: &str,
        id: &str,
        stated: Option<&str>,
    ) -> rusqlite::Result<String> {
        if let Some(stated) = stated {
            return Ok(stated.to_string());
        }
        let (current, kept): (String, i64) = self.conn
            .prepare_cached(
                "SELECT version_id, (SELECT count(*) FROM replaced h WHERE h.type = r.type AND h.id = r.id)
                 FROM resources r WHERE type = ?1 AND id = ?2",
            )?
            .query_row(params![resource_type, id], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(match current.parse::<u64>() {
            Ok(number) => number + 1,
            Err(_) => kept as u64 + 2,
        }
        .to_string())
    }

    fn store(&mut self, prepared: &mut Prepared) -> rusqlite::Result<()> {
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
        self.keep_replaced(resource_type, id, current)?;
        let version_id = self.next_version(resource_type, id, prepared.version_id.as_deref())?;
        self.conn
            .prepare_cached(
                "UPDATE resources SET last_updated = ?3, content_hash = ?4, import_run = ?5, json = ?6,
                     deleted = 0, version_id = ?7
                 WHERE type = ?1 AND id = ?2",
            )?
            .execute(params![
                resource_type,
                id,
                micros(last_updated),
                hash,
                self.run,
                json,
                version_id
            ])?;
        self.conn
            .prepare_cached("DELETE FROM patient_link WHERE resource = ?1")?
            .execute([current.rowid])?;
        self.insert_links(current.rowid, &prepared.patients)
    }

    /// Inserts the resource unless its type and id are stored already; true when inserted.
    pub(super) fn insert_new(&mut self, prepared: &Prepared) -> rusqlite::Result<bool> {
        let inserted = self.insert_resource.execute(params![
            prepared.resource_type,
            prepared.id,
            micros(prepared.stated.unwrap_or(self.import_time)),
            prepared.hash,
            self.run,
            prepared.json,
            prepared.version_id
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

    pub(super) fn count_insert(&mut self, resource_type: &str, rowid: i64, bytes: u64) {
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

    pub(super) fn checkpoint(&self) -> FileCheckpoint {
        FileCheckpoint {
            created: self.created,
            deleted: (self.deleted, self.deleted_absent),
            inserted: self.inserted.clone(),
        }
    }

    pub(super) fn undo_file(&mut self, start: FileCheckpoint) {
        self.created = start.created;
        (self.deleted, self.deleted_absent) = start.deleted;
        self.inserted = start.inserted;
    }

    /// A new resource's links follow the rows inserted before it: appended at the table's end.
    pub(super) fn insert_links(
        &mut self,
        resource: i64,
        patients: &[String],
    ) -> rusqlite::Result<()> {
        for patient in patients {
            self.insert_link.execute(params![resource, patient])?;
        }
        Ok(())
    }

    pub(super) fn current_row(
        &self,
        resource_type: &str,
        id: &str,
    ) -> rusqlite::Result<Option<CurrentRow>> {
        self.conn
            .prepare_cached("SELECT rowid, content_hash, last_updated, import_run FROM resources WHERE type = ?1 AND id = ?2")?
            .query_row(params![resource_type, id], |r| {
                Ok(CurrentRow { rowid: r.get(0)?, hash: r.get(1)?, last_updated: r.get(2)?, run: r.get(3)? })
            })
            .optional()
    }

    /// The resource's content hash and `lastUpdated` as the store held them before this import.
    /// Rows this import created have no entry: they were absent before.
    pub(super) fn state_before_run(
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

    pub(super) fn remember_before_run(
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

pub(super) fn with_line(failure: Failure, line: u64) -> Failure {
    match failure {
        Failure::Input { message, .. } => Failure::Input {
            line: Some(line),
            message,
        },
        stopped => stopped,
    }
}

/// `meta.lastUpdated` when the resource states one; an error when it is not a valid instant.
pub(super) fn stated_last_updated(resource: &Json) -> Result<Option<DateTime<Utc>>, String> {
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
pub(super) fn with_last_updated(resource: &mut Json, instant: DateTime<Utc>) -> Vec<u8> {
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
