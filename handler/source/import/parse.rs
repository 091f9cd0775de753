//! The reading thread: each file's resources parsed, checked and prepared for the writer.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, Read};

use chrono::{DateTime, Utc};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::*;

/// Resources per hand-over from the reading thread to the writing one.
pub(super) const BATCH: usize = 1024;

/// What the reading thread hands the writing thread.
pub(super) enum Event {
    FileStart,
    /// Handed over in batches: one hand-over per resource costs more than preparing it.
    Resources(Vec<Prepared>),
    FileDone,
    FileFailed(usize, Option<u64>, String),
}

/// What an input entry asks of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// Store the resource (create or update).
    Store,
    /// Delete the resource (a Bundle entry `request.method: DELETE`): only its type and id count.
    Delete,
    /// An entry the import does not carry out, and why; the rest of its file is imported.
    Refuse(String),
}

/// A resource ready to store (or delete).
pub(super) struct Prepared {
    pub(super) change: Change,
    pub(super) resource_type: String,
    pub(super) id: String,
    pub(super) patients: Vec<String>,
    pub(super) hash: i64,
    /// `meta.lastUpdated` as the resource states it; then `json` is its content as is.
    pub(super) stated: Option<DateTime<Utc>>,
    /// The JSON to store: as given when `stated`, else with `lastUpdated` set to the import time.
    pub(super) json: Vec<u8>,
    /// The content without `lastUpdated`, kept when it is not stated, to restore an earlier one
    /// if the content is unchanged.
    pub(super) value: Option<Vec<u8>>,
    pub(super) unresolved: u64,
    /// `meta.versionId` as the resource states it.
    pub(super) version_id: Option<String>,
}

impl Prepared {
    /// An entry that changes the store without content of its own.
    fn without_content(change: Change, resource_type: &str, id: &str) -> Prepared {
        Prepared {
            change,
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            patients: Vec::new(),
            hash: 0,
            stated: None,
            json: Vec::new(),
            value: None,
            unresolved: 0,
            version_id: None,
        }
    }
}

/// What a Bundle entry's `request` deletes: `Type/id`, or why the entry is refused.
fn deletion_of(index: usize, request: &Json) -> Option<Prepared> {
    let method = request.get("method").and_then(|m| m.as_str())?;
    if !method.eq_ignore_ascii_case("DELETE") {
        return None;
    }
    let url = request
        .get("url")
        .and_then(|u| u.as_str())
        .map(|u| u.trim_start_matches('/').to_string())
        .unwrap_or_default();
    let refuse = |message: String| {
        Some(Prepared::without_content(
            Change::Refuse(format!("Bundle.entry[{index}]: {message}")),
            "",
            "",
        ))
    };
    if url.contains('?') {
        return refuse(format!(
            "the conditional delete {url:?} is not supported: name the resource as Type/id"
        ));
    }
    match url.split_once('/') {
        Some((resource_type, id)) if is_resource_type(resource_type) && is_valid_id(id) => {
            Some(Prepared::without_content(Change::Delete, resource_type, id))
        }
        _ => refuse(format!(
            "the DELETE of {url:?} does not name a resource as Type/id"
        )),
    }
}

/// The top-level members of a resource line the quick path reads, borrowed from the line; every
/// other member is only checked to be valid JSON.
#[derive(Default)]
pub(super) struct Skim<'a> {
    pub(super) resource_type: Option<&'a RawValue>,
    pub(super) id: Option<&'a RawValue>,
    pub(super) meta: Option<&'a RawValue>,
    /// Members that may name a patient in some type's compartment; the type picks among them.
    pub(super) elements: Vec<(&'a str, &'a RawValue)>,
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
pub(super) struct Parser {
    pub(super) urns: HashMap<String, String>,
    pub(super) import_time: DateTime<Utc>,
}

impl Parser {
    /// Reads `files` into `events`; `spent_batches` brings back the batches the writing side is
    /// done with, to empty here and fill again.
    pub(super) fn run(
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

    pub(super) fn parse_file(
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

    pub(super) fn parse_ndjson(
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

    pub(super) fn parse_document(
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
            let mut request = None;
            for (key, value) in members {
                match key.as_ref() {
                    "resource" => resource = Some(value),
                    "fullUrl" => full_url = value.as_str().map(|url| url.into_owned()),
                    "request" => request = Some(value),
                    _ => {}
                }
            }
            if let Some(deletion) = request.and_then(|request| deletion_of(index, &request)) {
                if !emit(deletion) {
                    return Err(Failure::Stopped);
                }
                continue;
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
    pub(super) fn prepare_as_is(&self, line: &[u8]) -> Option<Prepared> {
        #[derive(Deserialize)]
        struct Meta<'a> {
            #[serde(rename = "lastUpdated", borrow)]
            last_updated: Option<&'a str>,
            #[serde(rename = "versionId", borrow)]
            version_id: Option<&'a str>,
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
            change: Change::Store,
            version_id: meta.version_id.map(str::to_string),
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
    pub(super) fn prepare(
        &self,
        mut resource: Json,
        full_url: Option<&str>,
    ) -> Result<Prepared, Failure> {
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
        let version_id = resource
            .get("meta")
            .and_then(|meta| meta.get("versionId"))
            .and_then(|version| version.as_str())
            .map(|version| version.into_owned());
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
            change: Change::Store,
            version_id,
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
