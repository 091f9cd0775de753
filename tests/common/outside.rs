//! Data from outside the project (`../shared`, beside the clone): the Synthea sample and the
//! conformance corpora. A fresh clone has none of it: the sample's place is taken by data the
//! project generates (deterministic, with its counts known), and a test that needs a corpus says it
//! was skipped, one line each (gathered by `tests/run.sh`, which prints them with their count).
//! CI has `../shared` and skips nothing: there, a missing piece fails the test.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The folder beside the project that holds the outside data.
fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// Whether this is CI, which has `../shared` and must skip nothing.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The data the tests export: Synthea's 100 patients (38,472 resources and a Group) where
/// `../shared` has them, or else 100 generated patients with their resources and Groups.
struct Sample {
    dir: PathBuf,
    counts: HashMap<String, usize>,
}

/// The seed of the stand-in sample; any fixed seed gives the same data every run.
const STAND_IN_SEED: u64 = 1;

fn sample() -> &'static Sample {
    static SAMPLE: OnceLock<Sample> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let synthea = shared().join("synthea-r4-100-bulk-data-server/bundles");
        if synthea.is_dir() {
            return Sample {
                dir: synthea,
                counts: synthea_counts(),
            };
        }
        assert!(
            !in_ci(),
            "CI must have the Synthea sample at {}",
            synthea.display()
        );
        let scratch = super::scratch_of_this_process();
        let generated = scratch.join("generated");
        let _ = std::fs::remove_dir_all(&generated);
        let shape = fhir_export::generate::Shape::SYNTHEA_LIKE;
        let summary = fhir_export::generate::write_shaped(100, STAND_IN_SEED, &shape, &generated)
            .expect("the stand-in sample is written");
        let dir = scratch.join("stand-in");
        write_as_bundles(&generated, &dir);
        let counts = summary
            .counts
            .into_iter()
            .map(|(resource_type, n)| (resource_type, n as usize))
            .collect();
        Sample { dir, counts }
    })
}

/// Writes the generated NDJSON files of `from` as Synthea's sample is laid out: a gzipped
/// transaction Bundle per patient with the resources of its record, and one for the rest
/// (organizations, practitioners, groups). Imported so, a store holds each patient's record
/// together and its types interleaved, as it holds Synthea's.
fn write_as_bundles(from: &Path, to: &Path) {
    use serde_json::{json, Value};
    let mut records: Vec<(String, Vec<Value>)> = Vec::new();
    let mut record_of: HashMap<String, usize> = HashMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            let owner = match resource["resourceType"].as_str() {
                Some("Patient") => resource["id"].as_str().map(str::to_string),
                _ => ["subject", "patient"]
                    .iter()
                    .find_map(|field| resource[field]["reference"].as_str())
                    .and_then(|reference| reference.strip_prefix("Patient/"))
                    .map(str::to_string),
            }
            .unwrap_or_else(|| "shared".to_string());
            let at = *record_of.entry(owner.clone()).or_insert_with(|| {
                records.push((owner, Vec::new()));
                records.len() - 1
            });
            records[at].1.push(resource);
        }
    }
    std::fs::create_dir_all(to).unwrap();
    for (owner, resources) in records {
        let entry: Vec<Value> = resources
            .into_iter()
            .map(|resource| {
                let url = format!(
                    "{}/{}",
                    resource["resourceType"].as_str().unwrap(),
                    resource["id"].as_str().unwrap()
                );
                json!({"resource": resource, "request": {"method": "PUT", "url": url}})
            })
            .collect();
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entry});
        let file = std::fs::File::create(to.join(format!("{owner}.json.gz"))).unwrap();
        let mut gzip = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        serde_json::to_writer(&mut gzip, &bundle).unwrap();
        gzip.finish().unwrap();
    }
}

/// The sample's folder of gzipped transaction Bundles.
pub fn sample_dir() -> PathBuf {
    sample().dir.clone()
}

/// The sample's resources per type, the Group(s) included.
pub fn sample_counts() -> HashMap<String, usize> {
    sample().counts.clone()
}

/// The sample's resources of every type.
pub fn sample_total() -> usize {
    sample().counts.values().sum()
}

/// The Synthea sample's counts per type, from its README (+ the Group).
fn synthea_counts() -> HashMap<String, usize> {
    [
        ("Observation", 16_315),
        ("Claim", 6_083),
        ("Encounter", 3_697),
        ("ExplanationOfBenefit", 3_697),
        ("MedicationRequest", 2_386),
        ("Procedure", 2_351),
        ("Immunization", 1_287),
        ("DiagnosticReport", 897),
        ("Condition", 639),
        ("Organization", 203),
        ("Practitioner", 203),
        ("CareTeam", 278),
        ("CarePlan", 278),
        ("Patient", 100),
        ("AllergyIntolerance", 38),
        ("ImagingStudy", 16),
        ("Device", 4),
        ("Group", 1),
    ]
    .into_iter()
    .map(|(resource_type, n)| (resource_type.to_string(), n))
    .collect()
}

/// Where a corpus under `../shared/data` lies, whether or not it is there.
pub fn corpus_dir(corpus: &str) -> PathBuf {
    shared().join(corpus)
}

/// A corpus under `../shared/data` (`anonymization-corpus`, `sql-on-fhir-tests`), or `None` with
/// a line saying that `test` was skipped for want of it. In CI its absence fails the test.
pub fn outside_corpus(corpus: &str, test: &str) -> Option<PathBuf> {
    let dir = corpus_dir(corpus);
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(!in_ci(), "CI must have the corpus at {}", dir.display());
    let line = format!("skipped: {test} (needs ../shared/data/{corpus})");
    eprintln!("{line}");
    append_to_log("FHIR_EXPORT_SKIPPED_LOG", &line);
    None
}

/// Prints a result the test command shows at its end (`tests/run.sh` keeps such lines in
/// `FHIR_EXPORT_SUMMARY_LOG`; `cargo test` hides a passing test's output).
pub fn summary(line: &str) {
    println!("{line}");
    append_to_log("FHIR_EXPORT_SUMMARY_LOG", line);
}

/// Appends `line` to the file the environment variable `name` names, if it names one.
fn append_to_log(name: &str, line: &str) {
    let Ok(log) = std::env::var(name) else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log);
    if let Ok(mut file) = file {
        // One write, so that lines of test processes running at once never interleave.
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}
