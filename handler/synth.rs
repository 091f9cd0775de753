//! `handler synth`: a bigger dataset made of N copies of one, every id and reference rewritten per
//! copy (`c{k}-{id}`), so copies never collide and each keeps its compartments.
//!
//! The dataset is loaded through the importer (so Bundles, `urn:uuid:` references and duplicates
//! are handled as on import). Each resource is then serialised once with a marker before every id
//! it owns or references, and each copy is that text with the marker replaced: no per-copy parse.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::fhir::json::Json;
use crate::source::{import, EmbeddedStore};

/// What serde_json writes for the marker character U+0001.
const MARKER: &[u8] = b"\\u0001";

#[derive(Debug, Default)]
pub struct SynthSummary {
    pub resources: u64,
    pub bytes: u64,
    pub per_type: BTreeMap<String, u64>,
}

/// Writes `copies` rewritten copies of the dataset at `from` into `out` as `{Type}.ndjson`.
pub fn synth(from: &[PathBuf], copies: u32, out: &Path) -> anyhow::Result<SynthSummary> {
    if copies == 0 {
        bail!("--copies must be at least 1");
    }
    let scratch = tempfile::tempdir().context("scratch folder")?;
    let store = EmbeddedStore::open(scratch.path().join("synth.db"))?;
    let report = import::import(&store, from)?;
    if let Some(failure) = report.failed.first() {
        bail!("{failure}");
    }
    let conn = store.connect()?;
    let mut keys = HashSet::new();
    {
        let mut statement = conn.prepare("SELECT type, id FROM resources")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            keys.insert(format!(
                "{}/{}",
                row.get_ref(0)?.as_str()?,
                row.get_ref(1)?.as_str()?
            ));
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut summary = SynthSummary::default();
    let mut statement = conn.prepare("SELECT type, json FROM resources ORDER BY type, id")?;
    let mut rows = statement.query([])?;
    let mut current: Option<(String, BufWriter<File>)> = None;
    let mut line = Vec::with_capacity(64 << 10);
    while let Some(row) = rows.next()? {
        let resource_type = row.get_ref(0)?.as_str()?.to_string();
        let json = row.get_ref(1)?.as_blob()?;
        if json.windows(MARKER.len()).any(|w| w == MARKER) {
            bail!("{resource_type} contains the escape \\u0001, which synth uses as its marker");
        }
        let template = marked(Json::parse_slice(json)?, &keys);
        if current.as_ref().is_none_or(|(t, _)| *t != resource_type) {
            if let Some((_, mut file)) = current.take() {
                file.flush()?;
            }
            let path = out.join(format!("{resource_type}.ndjson"));
            let file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            current = Some((
                resource_type.clone(),
                BufWriter::with_capacity(1 << 20, file),
            ));
        }
        let (_, file) = current.as_mut().expect("opened above");
        for copy in 1..=copies {
            line.clear();
            let prefix = format!("c{copy}-");
            let mut rest = template.as_slice();
            while let Some(at) = rest.windows(MARKER.len()).position(|w| w == MARKER) {
                line.extend_from_slice(&rest[..at]);
                line.extend_from_slice(prefix.as_bytes());
                rest = &rest[at + MARKER.len()..];
            }
            line.extend_from_slice(rest);
            line.push(b'\n');
            file.write_all(&line)?;
            summary.bytes += line.len() as u64;
        }
        summary.resources += u64::from(copies);
        *summary.per_type.entry(resource_type).or_default() += u64::from(copies);
    }
    if let Some((_, mut file)) = current {
        file.flush()?;
    }
    Ok(summary)
}

/// The resource serialised with the marker before its id and before the id of every reference to
/// a resource of the dataset.
fn marked(mut resource: Json, keys: &HashSet<String>) -> Vec<u8> {
    if let Some(id) = resource.get("id").and_then(Json::as_str) {
        let id = Json::string(&format!("\u{1}{id}"));
        resource.set("id", id, 0);
    }
    resource.rewrite_references(&mut |reference| {
        let (resource_type, id) = reference.split_once('/')?;
        keys.contains(reference)
            .then(|| format!("{resource_type}/\u{1}{id}"))
    });
    resource.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_known_references_are_marked() {
        let keys = HashSet::from(["Patient/p".to_string()]);
        let resource = Json::parse(r##"{"resourceType": "Observation", "id": "o", "valueDecimal": 1.50,
            "subject": {"reference": "Patient/p"}, "performer": [{"reference": "Practitioner/x"}],
            "contained": [{"id": "c", "subject": {"reference": "Patient/p"}}], "hasMember": [{"reference": "#c"}]}"##).unwrap();
        let text = String::from_utf8(marked(resource, &keys)).unwrap();
        assert!(text.contains(r#""valueDecimal":1.50"#), "{text}");
        assert!(text.contains(r#""id":"\u0001o""#), "{text}");
        assert!(text.contains(r#""reference":"Patient/\u0001p""#), "{text}");
        assert!(text.contains(r#""reference":"Practitioner/x""#), "{text}");
        assert!(
            text.contains(r#""contained":[{"id":"c","subject":{"reference":"Patient/\u0001p"}}]"#),
            "{text}"
        );
        assert!(text.contains(r##""reference":"#c""##), "{text}");
    }
}
