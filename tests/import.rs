//! `handler import` through the real binary: the sample's counts, idempotence, urn rewriting,
//! compartments, and clear errors that leave nothing of a bad file behind.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use fhir_export::source::EmbeddedStore;

fn handler(args: &[&str], dir: &Path) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The JSON string text that follows the first `marker` in `json`.
fn text_after<'a>(json: &'a str, marker: &str) -> &'a str {
    json.split(marker)
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
}

#[test]
fn sample_imports_to_its_readme_counts_and_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sample = sample_dir();
    let (ok, stdout, stderr) = handler(
        &["import", sample.to_str().unwrap(), "--store", "sqlite:s.db"],
        dir.path(),
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("{} created", sample_total())),
        "{stdout}"
    );
    let store = dir.path().join("s.db");
    let first = stored_resources(&store);
    assert_eq!(first.len(), sample_total());
    for (resource_type, count) in sample_counts() {
        assert_eq!(
            first.keys().filter(|(t, _)| *t == resource_type).count(),
            count,
            "{resource_type}"
        );
    }
    assert!(
        first
            .values()
            .all(|json| !json.contains(r#""reference":"urn:"#)),
        "urn references left"
    );
    assert!(first
        .values()
        .all(|json| json.contains(r#""lastUpdated":""#)));

    let (ok, stdout, _) = handler(
        &["import", sample.to_str().unwrap(), "--store", "s.db"],
        dir.path(),
    );
    assert!(ok);
    assert!(
        stdout.contains(&format!(
            "0 created, 0 updated, {} unchanged",
            sample_total()
        )),
        "{stdout}"
    );
    assert_eq!(
        stored_resources(&store),
        first,
        "a second import changed stored resources"
    );

    let store = EmbeddedStore::open(&store).unwrap();
    let group = first
        .iter()
        .find_map(|((t, _), json)| (t == "Group").then_some(json))
        .unwrap();
    let member = text_after(group, r#""reference":"Patient/"#);
    assert_eq!(
        store.compartments_of("Patient", member).unwrap(),
        vec![member.to_string()]
    );
    let observation = first.iter().find(|((t, _), _)| t == "Observation").unwrap();
    let subject = text_after(observation.1, r#""subject":{"reference":"Patient/"#);
    assert_eq!(
        store
            .compartments_of("Observation", &observation.0 .1)
            .unwrap(),
        vec![subject.to_string()]
    );
    assert!(store
        .compartments_of(
            "Organization",
            &first.keys().find(|(t, _)| t == "Organization").unwrap().1
        )
        .unwrap()
        .is_empty());
}

#[test]
fn bad_files_are_reported_with_file_and_line_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| std::fs::write(dir.path().join(name), body).unwrap();
    write(
        "good.ndjson",
        "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n",
    );
    write("broken.ndjson", "{\"resourceType\":\"Patient\",\"id\":\"b\"}\n\n{\"resourceType\":\"Patient\",\"id\":\"c\"\n");
    write("not-fhir.json", "{\"hello\": \"world\"}");
    write(
        "bad-id.ndjson",
        "{\"resourceType\":\"Patient\",\"id\":\"x/../y\"}\n",
    );
    write(
        "unknown-type.ndjson",
        "{\"resourceType\":\"Unicorn\",\"id\":\"u\"}\n",
    );
    write(
        "truncated.json",
        "{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[{\"resource\":",
    );
    // A gzip cut in half, noise with invalid UTF-8 and NULs, an array; a plain file named .gz
    // (read as what it is) and a Bundle entry without a resource (nothing to load) are fine.
    let mut lines = String::new();
    for n in 0..2000 {
        lines.push_str(&format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"cut{n}\"}}\n"
        ));
    }
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gzip, lines.as_bytes()).unwrap();
    let gzip = gzip.finish().unwrap();
    std::fs::write(dir.path().join("cut.ndjson.gz"), &gzip[..gzip.len() / 2]).unwrap();
    write(
        "not-gzip.ndjson.gz",
        "{\"resourceType\":\"Patient\",\"id\":\"g\"}\n",
    );
    let noise: Vec<u8> = (0..4096u32)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("noise.ndjson"), noise).unwrap();
    write("array.ndjson", "[1,2,3]\n");
    write(
        "entry-without-resource.json",
        "{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[{\"fullUrl\":\"urn:uuid:1\"}]}",
    );
    let args = [
        "import",
        "good.ndjson",
        "broken.ndjson",
        "not-fhir.json",
        "bad-id.ndjson",
        "unknown-type.ndjson",
        "truncated.json",
        "cut.ndjson.gz",
        "not-gzip.ndjson.gz",
        "noise.ndjson",
        "array.ndjson",
        "entry-without-resource.json",
        "missing.ndjson",
        "--store",
        "s.db",
    ];
    let (ok, stdout, stderr) = handler(&args, dir.path());
    assert!(!ok, "import with bad files must fail");
    for expected in [
        "broken.ndjson:3: invalid JSON",
        "not-fhir.json: not a FHIR resource (no resourceType)",
        "bad-id.ndjson:1: Patient id \"x/../y\" is not a valid FHIR id",
        "unknown-type.ndjson:1: unknown resourceType \"Unicorn\"",
        "truncated.json:1: invalid JSON",
        "cut.ndjson.gz:1000: incomplete deflate stream",
        "noise.ndjson:1: invalid JSON",
        "array.ndjson:1: not a FHIR resource",
        "missing.ndjson: No such file",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("entry-without-resource"), "{stderr}");
    assert!(stdout.contains("2 created"), "{stdout}");
    let stored = stored_resources(&dir.path().join("s.db"));
    let mut ids: Vec<&str> = stored.keys().map(|(_, id)| id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["a", "g"],
        "only the good files are imported, none in part"
    );
}

#[test]
fn ndjson_bundles_single_resources_and_gzip_all_load() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("nested")).unwrap();
    let bundle = r#"{"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:11111111-1111-1111-1111-111111111111","resource":{"resourceType":"Patient"}},
        {"fullUrl":"urn:uuid:22222222-2222-2222-2222-222222222222","resource":{"resourceType":"Observation","id":"o1",
         "subject":{"reference":"urn:uuid:11111111-1111-1111-1111-111111111111"}}}]}"#;
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(data.join("nested/bundle.json.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(bundle.as_bytes()).unwrap();
    gz.finish().unwrap();
    std::fs::write(
        data.join("single.json"),
        r#"{"resourceType":"Organization","id":"org"}"#,
    )
    .unwrap();
    std::fs::write(
        data.join("lines.ndjson"),
        "{\"resourceType\":\"Practitioner\",\"id\":\"pr\"}\n",
    )
    .unwrap();
    std::fs::write(data.join("README.md"), "not data").unwrap();
    let (ok, stdout, stderr) = handler(&["import", "data", "--store", "s.db"], dir.path());
    assert!(ok, "{stdout}{stderr}");
    let stored = stored_resources(&dir.path().join("s.db"));
    assert_eq!(stored.len(), 4, "{stored:?}");
    let observation = &stored[&("Observation".to_string(), "o1".to_string())];
    assert!(
        observation
            .contains(r#""subject":{"reference":"Patient/11111111-1111-1111-1111-111111111111"}"#),
        "{observation}"
    );
    let store = EmbeddedStore::open(dir.path().join("s.db")).unwrap();
    assert_eq!(
        store.compartments_of("Observation", "o1").unwrap(),
        ["11111111-1111-1111-1111-111111111111"]
    );
}

#[test]
fn generated_demo_data_imports_cleanly_with_every_reference_resolving() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = handler(
        &[
            "generate",
            "--patients",
            "40",
            "--seed",
            "7",
            "--out",
            "demo",
        ],
        dir.path(),
    );
    assert!(ok, "{stdout}{stderr}");
    let summary = fhir_export::generate::write_ndjson(40, 7, &dir.path().join("again")).unwrap();
    assert!(
        stdout.contains(&format!("{} resources", summary.total())),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("demo/Observation.ndjson")).unwrap(),
        std::fs::read(dir.path().join("again/Observation.ndjson")).unwrap(),
        "same seed, same data"
    );
    let (ok, stdout, stderr) = handler(&["import", "demo", "--store", "s.db"], dir.path());
    assert!(ok, "{stdout}{stderr}");
    let stored = stored_resources(&dir.path().join("s.db"));
    assert_eq!(stored.len() as u64, summary.total());
    for json in stored.values() {
        for (resource_type, id) in references_in(json) {
            assert!(
                stored.contains_key(&(resource_type.to_string(), id.to_string())),
                "dangling {resource_type}/{id}"
            );
        }
    }
    for required in [
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "Claim",
        "ExplanationOfBenefit",
        "Group",
        "Organization",
        "Practitioner",
    ] {
        assert!(
            summary.counts.get(required).copied().unwrap_or(0) > 0,
            "{required} missing"
        );
    }
}

#[test]
fn synth_copies_rewrite_every_id_and_reference_and_keep_compartments() {
    let dir = tempfile::tempdir().unwrap();
    let generated = fhir_export::generate::write_ndjson(20, 5, &dir.path().join("demo")).unwrap();
    let (ok, stdout, stderr) = handler(
        &["synth", "--from", "demo", "--copies", "3", "--out", "x3"],
        dir.path(),
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("wrote {} resources", 3 * generated.total())),
        "{stdout}"
    );
    for (db, data) in [("one.db", "demo"), ("three.db", "x3")] {
        let (ok, stdout, stderr) = handler(&["import", data, "--store", db], dir.path());
        assert!(ok, "{stdout}{stderr}");
    }
    let one = stored_resources(&dir.path().join("one.db"));
    let three = stored_resources(&dir.path().join("three.db"));
    assert_eq!(three.len(), 3 * one.len());
    for copy in 1..=3 {
        for (resource_type, id) in one.keys() {
            assert!(
                three.contains_key(&(resource_type.clone(), format!("c{copy}-{id}"))),
                "{resource_type}/c{copy}-{id}"
            );
        }
    }
    for json in three.values() {
        let copy = json
            .split(r#""id":"c"#)
            .nth(1)
            .unwrap()
            .split('-')
            .next()
            .unwrap();
        for (resource_type, id) in references_in(json) {
            assert!(
                id.starts_with(&format!("c{copy}-")),
                "{resource_type}/{id} crosses copies in {json}"
            );
            assert!(
                three.contains_key(&(resource_type.to_string(), id.to_string())),
                "dangling {resource_type}/{id}"
            );
        }
    }
    let one = EmbeddedStore::open(dir.path().join("one.db")).unwrap();
    let three = EmbeddedStore::open(dir.path().join("three.db")).unwrap();
    assert_eq!(
        three
            .compartments_of("Observation", "c2-pat-5-0-enc-0-obs-0")
            .unwrap(),
        vec!["c2-pat-5-0".to_string()]
    );
    assert_eq!(
        one.compartments_of("Observation", "pat-5-0-enc-0-obs-0")
            .unwrap(),
        vec!["pat-5-0".to_string()]
    );
}

/// The tables and indexes a store keeps compartment links in, and whether SQLite finds the file
/// sound.
fn link_tables_and_integrity(store: &Path) -> (Vec<String>, String) {
    let conn = rusqlite::Connection::open(store).unwrap();
    let mut statement = conn
        .prepare("SELECT name FROM sqlite_schema WHERE tbl_name IN ('compartment', 'patient_link') ORDER BY name")
        .unwrap();
    let indexes = statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let integrity = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    (indexes, integrity)
}

#[test]
fn a_first_load_that_changes_a_resource_twice_keeps_only_its_last_compartments() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| std::fs::write(dir.path().join(name), body).unwrap();
    let observation = |patient: &str, value: u32| {
        format!("{{\"resourceType\":\"Observation\",\"id\":\"o1\",\"meta\":{{\"lastUpdated\":\"2024-01-0{value}T00:00:00Z\"}},\"subject\":{{\"reference\":\"Patient/{patient}\"}}}}\n")
    };
    // The first load changes o1 once in a file that stands and once in a file that fails.
    write(
        "1.ndjson",
        &format!(
            "{}{{\"resourceType\":\"Patient\",\"id\":\"a\"}}\n{{\"resourceType\":\"Patient\",\"id\":\"b\"}}\n",
            observation("a", 1)
        ),
    );
    write("2.ndjson", &format!("{}{{broken\n", observation("b", 2)));
    write("3.ndjson", &observation("b", 3));
    let (ok, stdout, stderr) = handler(
        &[
            "import", "1.ndjson", "2.ndjson", "3.ndjson", "--store", "s.db",
        ],
        dir.path(),
    );
    assert!(!ok, "2.ndjson is broken");
    assert!(stderr.contains("2.ndjson:2: invalid JSON"), "{stderr}");
    assert!(stdout.contains("3 created, 0 updated"), "{stdout}");
    let store_path = dir.path().join("s.db");
    let store = EmbeddedStore::open(&store_path).unwrap();
    assert_eq!(store.compartments_of("Observation", "o1").unwrap(), ["b"]);
    assert_eq!(store.compartments_of("Patient", "a").unwrap(), ["a"]);
    assert_eq!(
        link_tables_and_integrity(&store_path),
        (vec!["patient_link".to_string()], "ok".to_string())
    );

    // A later load into the filled store changes the links in place.
    write("4.ndjson", &observation("a", 4));
    let (ok, stdout, stderr) = handler(&["import", "4.ndjson", "--store", "s.db"], dir.path());
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("0 created, 1 updated"), "{stdout}");
    assert_eq!(store.compartments_of("Observation", "o1").unwrap(), ["a"]);
}

#[test]
fn a_store_of_the_earlier_layout_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let older = |name: &str| {
        let conn = rusqlite::Connection::open(dir.path().join(name)).unwrap();
        conn.execute_batch(
            "CREATE TABLE resources (type TEXT NOT NULL, id TEXT NOT NULL, last_updated INTEGER NOT NULL,
                 content_hash INTEGER NOT NULL, import_run INTEGER NOT NULL, json BLOB NOT NULL,
                 PRIMARY KEY (type, id));
             CREATE TABLE compartment (patient_id TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
                 PRIMARY KEY (patient_id, type, id)) WITHOUT ROWID;
             CREATE INDEX compartment_by_resource ON compartment (type, id);",
        )
        .unwrap();
    };
    older("empty.db");
    older("filled.db");
    rusqlite::Connection::open(dir.path().join("filled.db"))
        .unwrap()
        .execute_batch(
            "INSERT INTO resources VALUES ('Observation', 'o1', 0, 0, 1,
                 '{\"resourceType\":\"Observation\",\"id\":\"o1\",\"subject\":{\"reference\":\"Patient/a\"}}');
             INSERT INTO compartment VALUES ('a', 'Observation', 'o1');",
        )
        .unwrap();
    assert_eq!(
        EmbeddedStore::open(dir.path().join("filled.db"))
            .unwrap()
            .compartments_of("Observation", "o1")
            .unwrap(),
        ["a"],
        "the link is moved, not lost"
    );
    std::fs::write(
        dir.path().join("o.ndjson"),
        "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"subject\":{\"reference\":\"Patient/b\"}}\n",
    )
    .unwrap();
    for store in ["empty.db", "filled.db"] {
        let (ok, stdout, stderr) = handler(&["import", "o.ndjson", "--store", store], dir.path());
        assert!(ok, "{stdout}{stderr}");
        let path = dir.path().join(store);
        assert_eq!(
            EmbeddedStore::open(&path)
                .unwrap()
                .compartments_of("Observation", "o1")
                .unwrap(),
            ["b"],
            "{store}"
        );
        // Links moved to the current layout when the store was opened, the old table gone.
        assert_eq!(
            link_tables_and_integrity(&path),
            (vec!["patient_link".to_string()], "ok".to_string()),
            "{store}"
        );
    }
}

type Stats = Vec<(String, i64, i64, i64, i64)>;

/// `type_stats` as kept, and as counted from the rows.
fn kept_and_counted_stats(store: &Path) -> (Stats, Stats) {
    let conn = rusqlite::Connection::open(store).unwrap();
    let read = |sql: &str| -> Stats {
        let mut statement = conn.prepare(sql).unwrap();
        let rows = statement
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };
    (
        read(
            "SELECT type, resources, first_rowid, last_rowid, bytes FROM type_stats ORDER BY type",
        ),
        read(
            "SELECT type, count(*), min(rowid), max(rowid), sum(length(json)) FROM resources
             GROUP BY type ORDER BY type",
        ),
    )
}

/// The per-type statistics the export planner cuts types by agree with the rows after every import
/// (a failed file's rows taken back included), and a store written by something that did not keep
/// them is recounted when opened.
#[test]
fn type_statistics_follow_the_rows_through_imports_and_failures() {
    use fhir_export::source::import::import;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fhir_export::generate::write_ndjson(10, 3, &data).unwrap();
    let path = dir.path().join("s.db");
    let store = EmbeddedStore::open(&path).unwrap();
    assert!(import(&store, std::slice::from_ref(&data))
        .unwrap()
        .failed
        .is_empty());
    let (kept, counted) = kept_and_counted_stats(&path);
    assert!(kept.len() > 5, "{kept:?}");
    assert_eq!(kept, counted);

    let observation = std::fs::read_to_string(data.join("Observation.ndjson")).unwrap();
    let observation = observation.lines().next().unwrap();
    let with_id = |id: &str| {
        let mut value: serde_json::Value = serde_json::from_str(observation).unwrap();
        value["id"] = id.into();
        value.to_string()
    };
    let more = dir.path().join("more");
    std::fs::create_dir_all(&more).unwrap();
    std::fs::write(
        more.join("a-good.ndjson"),
        format!("{}\n{}\n", with_id("extra-1"), with_id("extra-2")),
    )
    .unwrap();
    // More lines than one hand-over to the writing thread before the bad one: rows that were
    // written, then taken back.
    let mut bad: String = (0..1500)
        .map(|i| with_id(&format!("taken-back-{i}")) + "\n")
        .collect();
    bad.push_str("{not json\n");
    std::fs::write(more.join("b-bad.ndjson"), bad).unwrap();
    let report = import(&store, &[more]).unwrap();
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.created, 2);
    let (kept_after, counted) = kept_and_counted_stats(&path);
    assert_eq!(kept_after, counted);
    assert_ne!(kept_after, kept);

    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO resources (type, id, last_updated, content_hash, import_run, json)
         VALUES ('Patient', 'written-elsewhere', 0, 0, 0, '{}')",
        [],
    )
    .unwrap();
    drop(conn);
    let (stale, counted) = kept_and_counted_stats(&path);
    assert_ne!(stale, counted);
    let reopened = EmbeddedStore::open(&path).unwrap();
    let (kept, counted) = kept_and_counted_stats(&path);
    let without_bytes = |stats: &Stats| -> Vec<_> {
        stats
            .iter()
            .map(|(t, n, first, last, _)| (t.clone(), *n, *first, *last))
            .collect()
    };
    assert_eq!(without_bytes(&kept), without_bytes(&counted));
    assert!(
        kept.iter().all(|s| s.4 == 0),
        "a recount leaves bytes unknown"
    );
    assert_eq!(
        reopened.stored_resources().unwrap(),
        counted.iter().map(|s| s.1 as u64).sum::<u64>()
    );
}

/// `--source` (or `--store`) and `FHIR_SOURCE` naming different sources are refused, rather than
/// serving an empty store while the environment names a FHIR server.
#[test]
fn a_flag_and_fhir_source_naming_different_sources_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--source", "--store"] {
        let output = Command::new(env!("CARGO_BIN_EXE_handler"))
            .args(["serve", "--port", "0", flag, "s.db"])
            .env("FHIR_SOURCE", "https://fhir.example.org/r4")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("FHIR_SOURCE=https://fhir.example.org/r4")
                && stderr.contains("different sources"),
            "{stderr}"
        );
        assert!(!dir.path().join("s.db").exists(), "no store was created");
    }
}

/// `handler import` of a transaction Bundle with DELETE entries: the deletions are made and
/// counted; a conditional delete is refused, named on stderr with a non-zero exit, and the rest of
/// its file is imported.
#[test]
fn delete_entries_delete_and_a_conditional_one_is_refused_without_losing_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("first.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{\"resourceType\":\"Patient\",\"id\":\"b\"}\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = handler(&["import", "first.ndjson", "--store", "s.db"], dir.path());
    assert!(ok, "{stdout}{stderr}");
    std::fs::write(
        dir.path().join("changes.json"),
        r#"{"resourceType":"Bundle","type":"transaction","entry":[
            {"request":{"method":"DELETE","url":"Patient/a"}},
            {"request":{"method":"DELETE","url":"Patient?name=x"}},
            {"resource":{"resourceType":"Patient","id":"c"},"request":{"method":"PUT","url":"Patient/c"}}]}"#,
    )
    .unwrap();
    let (ok, stdout, stderr) = handler(&["import", "changes.json", "--store", "s.db"], dir.path());
    assert!(!ok, "a refused entry fails the command");
    assert!(
        stdout.contains("1 created") && stdout.contains("1 deleted"),
        "{stdout}"
    );
    assert!(
        stderr.contains("entry refused")
            && stderr.contains("Bundle.entry[1]")
            && stderr.contains("conditional delete"),
        "{stderr}"
    );
    let store = EmbeddedStore::open(dir.path().join("s.db")).unwrap();
    use fhir_export::source::ResourceSource;
    assert!(store.read("Patient", "a").unwrap().is_none());
    assert!(store.is_deleted("Patient", "a").unwrap());
    assert!(store.read("Patient", "c").unwrap().is_some());
}
