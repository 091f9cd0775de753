//! The conformance corpus of Microsoft's FHIR anonymizer (`../shared/data/anonymization-corpus`,
//! MIT): every golden case gives the engine's output (parsed JSON, keys in any order), every case
//! that must fail fails, and the unit vectors hold.

use std::path::PathBuf;

use chrono::NaiveDate;
use fhir_export::deid::methods::{
    date_shift_offset, decrypt_text, encrypt_text, hmac_sha256_hex, transform_reference_id,
};
use fhir_export::deid::{AnonymizationConfig, DeidError, Engine, Keys};
use serde_json::Value;

mod common;

/// Whether the corpus is beside the project; a test without it says it was skipped.
fn have_corpus(test: &str) -> bool {
    common::outside_corpus(
        "anonymization-corpus",
        &format!("{}::{test}", module_path!()),
    )
    .is_some()
}

fn corpus() -> PathBuf {
    common::corpus_dir("anonymization-corpus")
}

fn read(path: &str) -> Vec<u8> {
    let bytes = std::fs::read(corpus().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    bytes
        .strip_prefix(b"\xEF\xBB\xBF")
        .map(<[u8]>::to_vec)
        .unwrap_or(bytes)
}

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2025, 9, 5).unwrap()
}

fn engine(config: &str) -> Engine {
    let config = AnonymizationConfig::parse(&read(config)).unwrap();
    let keys = Keys::for_export(&config);
    Engine::new(&config, keys, today()).unwrap()
}

/// Compact JSON of a file (the corpus's resources are pretty-printed).
fn compact(bytes: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::from_slice::<Value>(bytes).unwrap()).unwrap()
}

#[test]
fn every_golden_case_gives_the_engines_output() {
    if !have_corpus("every_golden_case_gives_the_engines_output") {
        return;
    }
    let manifest: Value = serde_json::from_slice(&read("manifest.json")).unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in manifest["cases"].as_array().unwrap() {
        if case["kind"] != "golden" {
            continue;
        }
        let id = case["id"].as_str().unwrap();
        let engine = engine(case["config"].as_str().unwrap());
        let input = compact(&read(case["input"].as_str().unwrap()));
        let expected: Value =
            serde_json::from_slice(&read(case["expected"].as_str().unwrap())).unwrap();
        match engine.deidentify(&input) {
            Ok(output) => {
                let output: Value = serde_json::from_slice(&output).unwrap();
                // `patient-generalize.json` has single objects where R4 has arrays: read leniently, they
                // are written as R4 has them, as the engine does.
                if output != expected {
                    failures.push(format!(
                        "{id} ({}):\n got      {}\n expected {}",
                        case["input"], output, expected
                    ));
                }
            }
            Err(error) => failures.push(format!("{id}: {error}")),
        }
        checked += 1;
    }
    assert_eq!(checked, 28);
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_case_that_must_fail_fails() {
    if !have_corpus("every_case_that_must_fail_fails") {
        return;
    }
    let manifest: Value = serde_json::from_slice(&read("manifest.json")).unwrap();
    let mut checked = 0;
    for case in manifest["cases"].as_array().unwrap() {
        let kind = case["kind"].as_str().unwrap();
        if !kind.starts_with("error:") {
            continue;
        }
        let id = case["id"].as_str().unwrap();
        let engine = engine(case["config"].as_str().unwrap());
        let input = compact(&read(case["input"].as_str().unwrap()));
        let error = engine.deidentify(&input).expect_err(id);
        match kind {
            "error:processing" => {
                assert!(matches!(error, DeidError::Processing(_)), "{id}: {error}")
            }
            _ => assert!(matches!(error, DeidError::InvalidInput(_)), "{id}: {error}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn the_unit_vectors_hold() {
    if !have_corpus("the_unit_vectors_hold") {
        return;
    }
    let vectors: Value = serde_json::from_slice(&read("vectors.json")).unwrap();
    let key = vectors["hmac_sha256_hex"]["key"].as_str().unwrap();
    for case in vectors["hmac_sha256_hex"]["cases"].as_array().unwrap() {
        assert_eq!(
            hmac_sha256_hex(case[0].as_str().unwrap(), key),
            case[1],
            "{case}"
        );
    }
    let key = vectors["reference_cryptohash"]["key"].as_str().unwrap();
    for case in vectors["reference_cryptohash"]["cases"].as_array().unwrap() {
        let hashed =
            transform_reference_id(case[0].as_str().unwrap(), |id| hmac_sha256_hex(id, key));
        assert_eq!(hashed, case[1], "{case}");
    }
    for case in vectors["reference_id_part"]["cases"].as_array().unwrap() {
        let marked = transform_reference_id(case[0].as_str().unwrap(), |_| "@ID".into());
        assert_eq!(marked, case[1], "{case}");
    }
    let key = vectors["aes_cbc_decrypt"]["key_utf8"].as_str().unwrap();
    for case in vectors["aes_cbc_decrypt"]["cases"].as_array().unwrap() {
        let plain = decrypt_text(case[0].as_str().unwrap(), key.as_bytes()).unwrap();
        assert_eq!(plain, case[1], "{case}");
        let sealed = encrypt_text(&plain, key.as_bytes()).unwrap();
        assert_eq!(decrypt_text(&sealed, key.as_bytes()).unwrap(), plain);
        assert_ne!(
            sealed,
            encrypt_text(&plain, key.as_bytes()).unwrap(),
            "a random IV each time"
        );
    }
    for case in vectors["date_shift"]["cases"].as_array().unwrap() {
        let config = serde_json::json!({
            "fhirPathRules": [{"path": "Observation.effective", "method": "dateShift"}],
            "parameters": {
                "dateShiftKey": case["key"],
                "enablePartialDatesForRedact": case.get("partial").is_some(),
            }
        });
        let config = AnonymizationConfig::parse(config.to_string().as_bytes()).unwrap();
        let keys = Keys {
            date_shift: case["key"].as_str().unwrap().into(),
            ..Keys::default()
        };
        let engine = Engine::new(&config, keys, today()).unwrap();
        let mut input = serde_json::json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "effectiveDateTime": case["in"]});
        if let Some(id) = case.get("resource_id") {
            input["id"] = id.clone();
        }
        let output: Value =
            serde_json::from_slice(&engine.deidentify(input.to_string().as_bytes()).unwrap())
                .unwrap();
        let shifted = output
            .get("effectiveDateTime")
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(shifted, case["out"], "{case}");
    }
    assert_eq!(date_shift_offset("", "dummy"), -21);
    let postal = &vectors["postal_code"];
    for (partial, cases) in [(true, postal["partial"].clone()), (false, Value::Null)] {
        let config = serde_json::json!({
            "fhirPathRules": [{"path": "nodesByType('Address').postalCode", "method": "redact"}],
            "parameters": {"enablePartialZipCodesForRedact": partial, "restrictedZipCodeTabulationAreas": postal["restricted"]}
        });
        let config = AnonymizationConfig::parse(config.to_string().as_bytes()).unwrap();
        let engine = Engine::new(&config, Keys::default(), today()).unwrap();
        let pairs: Vec<(Value, Value)> = match partial {
            true => cases
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect(),
            false => postal["full_redact_to_null"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c.clone(), Value::Null))
                .collect(),
        };
        for (given, expected) in pairs {
            let input = serde_json::json!({"resourceType": "Patient", "address": [{"city": "x", "postalCode": given}]});
            let output: Value =
                serde_json::from_slice(&engine.deidentify(input.to_string().as_bytes()).unwrap())
                    .unwrap();
            assert_eq!(
                output["address"][0]
                    .get("postalCode")
                    .cloned()
                    .unwrap_or(Value::Null),
                expected,
                "{given}"
            );
        }
    }
    for case in vectors["partial_date_redact"].as_array().unwrap() {
        let config = serde_json::json!({
            "fhirPathRules": [{"path": "Patient.birthDate", "method": "redact"}],
            "parameters": {"enablePartialDatesForRedact": true}
        });
        let config = AnonymizationConfig::parse(config.to_string().as_bytes()).unwrap();
        let engine = Engine::new(&config, Keys::default(), today()).unwrap();
        let input = serde_json::json!({"resourceType": "Patient", "birthDate": case[0]});
        let output: Value =
            serde_json::from_slice(&engine.deidentify(input.to_string().as_bytes()).unwrap())
                .unwrap();
        assert_eq!(
            output.get("birthDate").cloned().unwrap_or(Value::Null),
            case[1],
            "{case}"
        );
    }
}

#[test]
fn the_generalize_vectors_hold() {
    if !have_corpus("the_generalize_vectors_hold") {
        return;
    }
    let vectors: Value = serde_json::from_slice(&read("vectors.json")).unwrap();
    let element = |ty: &str| match ty {
        "date" => ("Patient", "birthDate"),
        "dateTime" => ("Patient", "deceasedDateTime"),
        "instant" => ("Observation", "issued"),
        "time" => ("Observation", "valueTime"),
        "integer" => ("Observation", "valueInteger"),
        "positiveInt" => ("Patient", "multipleBirthInteger"),
        "unsignedInt" => ("Patient", "multipleBirthInteger"),
        _ => ("Patient", "gender"),
    };
    let mut failures = Vec::new();
    for case in vectors["generalize"]["cases"].as_array().unwrap() {
        let ty = case["type"].as_str().unwrap();
        let (resource, member) = element(ty);
        let path = match member {
            "valueTime" | "valueInteger" => format!("{resource}.value"),
            "multipleBirthInteger" => format!("{resource}.multipleBirth"),
            "deceasedDateTime" => format!("{resource}.deceased"),
            _ => format!("{resource}.{member}"),
        };
        let config = serde_json::json!({
            "fhirPathRules": [{"path": path, "method": "generalize", "cases": case["cases"], "otherValues": case["otherValues"]}],
        });
        let config = AnonymizationConfig::parse(config.to_string().as_bytes()).unwrap();
        let engine = Engine::new(&config, Keys::default(), today()).unwrap();
        let mut input = serde_json::json!({"resourceType": resource});
        if resource == "Observation" {
            input["status"] = "final".into();
            input["code"] = serde_json::json!({"text": "x"});
        }
        input[member] = case["value"].clone();
        let result = engine.deidentify(input.to_string().as_bytes());
        let got = match (&result, &case["expected"]) {
            (Err(DeidError::Processing(_)), Value::String(s)) if s == "PROCESSING_ERROR" => {
                continue
            }
            (Err(error), _) => Value::String(format!("error {error}")),
            (Ok(output), _) => {
                let output: Value = serde_json::from_slice(output).unwrap();
                output.get(member).cloned().unwrap_or(Value::Null)
            }
        };
        if case["expected"] != got {
            failures.push(format!("{case}: got {got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
