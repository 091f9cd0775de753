//! The embedded store's versions: the deletions an export with `_since` lists, and the pages of
//! a `_history`.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::{micros, run_committed_by, EmbeddedStore};
use crate::source::{
    Cursor, HistoryPage, HistoryRequest, ScanError, ScanRequest, Scanned, SinkError, SourceError,
    Version, VersionKinds,
};

impl EmbeddedStore {
    /// See `ResourceSource::scan_deleted`: the deletions among the versions at the snapshot, stored
    /// by a run committed after `since` and by `until`, read from the deletion indexes alone.
    pub(super) fn deleted_ids(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&str) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        let conn = self.connect()?;
        // Deletions are found in their own index, then checked against the scope.
        let terms = self.scope_terms(&conn, request, false)?;
        let (scope, replaced_scope) = (terms.current, terms.replaced);
        let run_at = |instant| run_committed_by(&conn, instant).map_err(|e| self.error(e));
        let since_run = match request.since {
            Some(since) => run_at(since)?,
            None => 0,
        };
        let until_run = run_at(request.until.min(request.snapshot))?;
        let snapshot_run = run_at(request.snapshot)?;
        let after = match request.resume {
            Some(Cursor::Id { id }) => id.as_str(),
            None => "",
            Some(_) => {
                return Err(SourceError::Unsupported(
                    "the embedded store resumes a list of deletions by id only".into(),
                )
                .into())
            }
        };
        // A deletion is the version at the snapshot either as the current row, or as the
        // replaced version a later run superseded: never both.
        let query = format!(
            "SELECT id FROM (
                 SELECT r.id AS id FROM resources r
                 WHERE r.type = ?1 AND r.deleted AND r.import_run > ?2 AND r.import_run <= ?3 {scope}
                 UNION ALL
                 SELECT h.id FROM replaced h
                 WHERE h.type = ?1 AND h.deleted AND h.stored_run > ?2 AND h.stored_run <= ?3
                   AND h.superseded_run > ?4 {replaced_scope})
             WHERE id > ?5 ORDER BY id"
        );
        let mut statement = conn.prepare(&query).map_err(|e| self.error(e))?;
        let mut rows = statement
            .query(params![
                request.resource_type,
                since_run,
                until_run,
                snapshot_run,
                after
            ])
            .map_err(|e| self.error(e))?;
        let mut count = 0;
        while let Some(row) = rows.next().map_err(|e| self.error(e))? {
            let id: String = row.get(0).map_err(|e| self.error(e))?;
            sink(&id)?;
            count += 1;
            if request
                .pause_after
                .is_some_and(|at| std::time::Instant::now() >= at)
            {
                return Ok(Scanned {
                    count,
                    paused: Some(Cursor::Id { id }),
                });
            }
        }
        Ok(Scanned::whole(count))
    }

    /// See `ResourceSource::scan_versions`: each resource's version at the snapshot (a deletion
    /// only with `deleted`) and, with `history`, the versions the snapshot had replaced, in the
    /// scan's window (as the export's `output` scan reads it: last updated, or stored, after
    /// `since`).
    pub(super) fn versions(
        &self,
        request: &ScanRequest<'_>,
        kinds: VersionKinds,
        sink: &mut dyn FnMut(&Version) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        let conn = self.connect()?;
        let run_at = |instant| run_committed_by(&conn, instant).map_err(|e| self.error(e));
        let snapshot_run = run_at(request.snapshot)?;
        let since_run = match request.stored_since {
            Some(since) => match run_at(since)? {
                0 => i64::MAX,
                run => run,
            },
            None => i64::MAX,
        };
        let after = match request.resume {
            Some(Cursor::Id { id }) => id.as_str(),
            None => "",
            Some(_) => {
                return Err(SourceError::Unsupported(
                    "the embedded store resumes a list of versions by id only".into(),
                )
                .into())
            }
        };
        let query = versions_query(kinds);
        let mut statement = conn.prepare(&query).map_err(|e| self.error(e))?;
        let mut rows = statement
            .query(params![
                request.resource_type,
                snapshot_run,
                request.since.map(micros).unwrap_or(i64::MIN),
                since_run,
                micros(request.until.min(request.snapshot)),
                after
            ])
            .map_err(|e| self.error(e))?;
        let mut count = 0;
        let mut previous: Option<String> = None;
        while let Some(row) = rows.next().map_err(|e| self.error(e))? {
            let id: String = row.get(0).map_err(|e| self.error(e))?;
            let past_the_box = request
                .pause_after
                .is_some_and(|at| std::time::Instant::now() >= at);
            if let Some(previous) = previous.filter(|p| *p != id && past_the_box) {
                return Ok(Scanned {
                    count,
                    paused: Some(Cursor::Id { id: previous }),
                });
            }
            let version = Version {
                version_id: row.get(2).map_err(|e| self.error(e))?,
                last_updated: DateTime::from_timestamp_micros(
                    row.get(3).map_err(|e| self.error(e))?,
                )
                .unwrap_or_default(),
                deleted: row.get(4).map_err(|e| self.error(e))?,
                json: row.get(5).map_err(|e| self.error(e))?,
                id,
            };
            sink(&version)?;
            count += 1;
            previous = Some(version.id);
        }
        Ok(Scanned::whole(count))
    }

    /// Whether the current row of the resource is a deletion.
    pub(super) fn current_is_deletion(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<bool, SourceError> {
        self.planning(|conn| {
            conn.prepare_cached("SELECT deleted FROM resources WHERE type = ?1 AND id = ?2")
                .and_then(|mut statement| {
                    statement.query_row(params![resource_type, id], |row| row.get::<_, bool>(0))
                })
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(false),
                    e => Err(e),
                })
                .map_err(|e| self.error(e))
        })
    }

    /// See `ResourceSource::history`: newest first, by `(lastUpdated, id, run)`, among the
    /// versions stored by the run the first page saw last (kept in the position), so that pages
    /// neither skip nor repeat a version whatever is imported meanwhile.
    pub(super) fn history_page(
        &self,
        request: &HistoryRequest<'_>,
    ) -> Result<HistoryPage, SourceError> {
        let conn = self.connect()?;
        let position = match request.after {
            Some(text) => Some(Position::parse(text).ok_or_else(|| {
                SourceError::Unsupported(format!("{text:?} is not a history position"))
            })?),
            None => None,
        };
        let snapshot_run = match &position {
            Some(position) => position.snapshot_run,
            None => run_committed_by(&conn, Utc::now()).map_err(|e| self.error(e))?,
        };
        let keys = self
            .version_keys(&conn, request, snapshot_run, position.as_ref())
            .map_err(|e| self.error(e))?;
        let mut page = HistoryPage::default();
        for key in &keys {
            let version = self.version(&conn, request.resource_type, key)?;
            page.versions.push(version);
        }
        if keys.len() == request.count {
            page.next = keys.last().map(|key| {
                Position {
                    snapshot_run,
                    last_updated: key.last_updated,
                    id: key.id.clone(),
                    run: key.run,
                }
                .to_string()
            });
        }
        Ok(page)
    }

    fn version_keys(
        &self,
        conn: &Connection,
        request: &HistoryRequest<'_>,
        snapshot_run: i64,
        position: Option<&Position>,
    ) -> rusqlite::Result<Vec<VersionKey>> {
        let (one_r, one_h) = match request.id {
            Some(_) => ("AND r.id = ?3", "AND h.id = ?3"),
            None => ("", ""),
        };
        let after = match position {
            Some(_) => "AND (last_updated, id, run) < (?5, ?6, ?7)",
            None => "",
        };
        let query = format!(
            "SELECT id, run, last_updated, current FROM (
                 SELECT r.id AS id, r.import_run AS run, r.last_updated AS last_updated, 1 AS current
                 FROM resources r WHERE r.type = ?1 AND r.import_run <= ?2 {one_r}
                 UNION ALL
                 SELECT h.id, h.stored_run, h.last_updated, 0
                 FROM replaced h WHERE h.type = ?1 AND h.stored_run <= ?2 {one_h})
             WHERE last_updated > ?4 {after}
             ORDER BY last_updated DESC, id DESC, run DESC LIMIT ?8"
        );
        let (last_updated, id, run) = match position {
            Some(p) => (p.last_updated, p.id.as_str(), p.run),
            None => (0, "", 0),
        };
        let mut statement = conn.prepare(&query)?;
        let rows = statement.query_map(
            params![
                request.resource_type,
                snapshot_run,
                request.id.unwrap_or(""),
                request.since.map(micros).unwrap_or(i64::MIN),
                last_updated,
                id,
                run,
                request.count as i64
            ],
            |row| {
                Ok(VersionKey {
                    id: row.get(0)?,
                    run: row.get(1)?,
                    last_updated: row.get(2)?,
                    current: row.get(3)?,
                })
            },
        )?;
        rows.collect()
    }

    fn version(
        &self,
        conn: &Connection,
        resource_type: &str,
        key: &VersionKey,
    ) -> Result<Version, SourceError> {
        let query = match key.current {
            true => "SELECT version_id, deleted, json FROM resources WHERE type = ?1 AND id = ?2 AND import_run = ?3",
            false => "SELECT version_id, deleted, json FROM replaced WHERE type = ?1 AND id = ?2 AND stored_run = ?3",
        };
        conn.prepare_cached(query)
            .and_then(|mut statement| {
                statement.query_row(params![resource_type, key.id, key.run], |row| {
                    Ok(Version {
                        id: key.id.clone(),
                        version_id: row.get(0)?,
                        last_updated: DateTime::from_timestamp_micros(key.last_updated)
                            .unwrap_or_default(),
                        deleted: row.get(1)?,
                        json: row.get(2)?,
                    })
                })
            })
            .map_err(|e| self.error(e))
    }
}

/// The SQL of `versions`: `(id, seq, version_id, last_updated, deleted, json)` in id then storage
/// order (`seq`: the run that replaced the version, the current one last), merged from the two
/// tables' primary keys without a sort. Parameters: ?1 type, ?2 snapshot run, ?3 since, ?4 since
/// run, ?5 until, ?6 after id.
fn versions_query(kinds: VersionKinds) -> String {
    let window = |t: &str, run: &str| {
        format!("({t}.last_updated > ?3 OR {t}.{run} > ?4) AND {t}.last_updated <= ?5")
    };
    // `deleted` lies past the JSON: tested last.
    let deletions_kept = |t: &str, wanted: bool| match wanted {
        true => "1".to_string(),
        false => format!("NOT {t}.deleted"),
    };
    let earlier = match kinds.history {
        true => deletions_kept("h", kinds.deleted),
        false => "0".to_string(),
    };
    format!(
        "SELECT r.id, 9223372036854775807, r.version_id, r.last_updated, r.deleted, r.json
         FROM resources r
         WHERE r.type = ?1 AND r.id > ?6 AND r.import_run <= ?2 AND {}
           AND {}
         UNION ALL
         SELECT h.id, h.superseded_run, h.version_id, h.last_updated, h.deleted, h.json
         FROM replaced h
         WHERE h.type = ?1 AND h.id > ?6 AND h.stored_run <= ?2 AND {}
           AND CASE WHEN h.superseded_run > ?2 THEN {} ELSE {earlier} END
         ORDER BY 1, 2",
        window("r", "import_run"),
        deletions_kept("r", kinds.deleted),
        window("h", "stored_run"),
        deletions_kept("h", kinds.deleted),
    )
}

/// A version's place in the history order.
struct VersionKey {
    id: String,
    run: i64,
    last_updated: i64,
    current: bool,
}

/// Where a page of history ended: `{snapshot run}.{lastUpdated µs}.{run}.{id}`.
#[derive(Debug, PartialEq, Eq)]
struct Position {
    snapshot_run: i64,
    last_updated: i64,
    run: i64,
    id: String,
}

impl Position {
    fn parse(text: &str) -> Option<Position> {
        let mut parts = text.splitn(4, '.');
        let mut number = || parts.next()?.parse::<i64>().ok();
        let (snapshot_run, last_updated, run) = (number()?, number()?, number()?);
        let id = parts.next()?.to_string();
        crate::fhir::is_valid_id(&id).then_some(Position {
            snapshot_run,
            last_updated,
            run,
            id,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.snapshot_run, self.last_updated, self.run, self.id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_position_reads_back_as_written() {
        let position = Position {
            snapshot_run: 3,
            last_updated: -5,
            run: 2,
            id: "a.b-c".into(),
        };
        assert_eq!(Position::parse(&position.to_string()), Some(position));
        assert_eq!(Position::parse("3.x.2.a"), None);
        assert_eq!(Position::parse("3.1.2"), None);
    }
}
