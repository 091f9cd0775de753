//! Anonymizer configurations from the conformance corpus of Microsoft's FHIR anonymizer
//! (`../shared/data/anonymization-corpus`): every valid one loads, every invalid one is refused
//! with a reason, as the engine (4.1.1) does.

use std::path::PathBuf;

use fhir_export::deid::AnonymizationConfig;

mod common;

/// Whether the corpus is beside the project; a test without it says it was skipped.
fn have_corpus(test: &str) -> bool {
    common::outside_corpus(
        "anonymization-corpus",
        &format!("{}::{test}", module_path!()),
    )
    .is_some()
}

fn corpus(folder: &str) -> Vec<PathBuf> {
    let dir = common::corpus_dir("anonymization-corpus").join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus is missing at {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_valid_corpus_configuration_loads_and_every_invalid_one_is_refused() {
    if !have_corpus("every_valid_corpus_configuration_loads_and_every_invalid_one_is_refused") {
        return;
    }
    let valid: Vec<PathBuf> = corpus("valid-configs")
        .into_iter()
        .chain(corpus("configs"))
        .collect();
    assert_eq!(valid.len(), 18);
    for path in &valid {
        let loaded = AnonymizationConfig::parse(&std::fs::read(path).unwrap());
        assert!(loaded.is_ok(), "{}: {:?}", path.display(), loaded.err());
    }
    let invalid = corpus("invalid-configs");
    assert_eq!(invalid.len(), 16);
    for path in &invalid {
        let name = path.file_name().unwrap().to_str().unwrap();
        let error = AnonymizationConfig::parse(&std::fs::read(path).unwrap())
            .expect_err(name)
            .to_string();
        assert!(!error.is_empty(), "{name}");
    }
}

#[test]
fn the_hipaa_sample_loads_its_rules_in_file_order_with_its_keys() {
    if !have_corpus("the_hipaa_sample_loads_its_rules_in_file_order_with_its_keys") {
        return;
    }
    let path = corpus("configs")
        .into_iter()
        .find(|p| p.ends_with("r4-configuration-sample.json"))
        .unwrap();
    let config = AnonymizationConfig::parse(&std::fs::read(path).unwrap()).unwrap();
    assert!(config.rules.len() > 20, "{} rules", config.rules.len());
    assert_eq!(config.parameters.date_shift_key.as_deref(), Some("123"));
    assert_eq!(config.parameters.crypto_hash_key.as_deref(), Some("123"));
    assert_eq!(
        config.parameters.encrypt_key, None,
        "empty: a random key per export"
    );
    assert!(config.parameters.enable_partial_zip_codes_for_redact);
    assert!(!config
        .parameters
        .restricted_zip_code_tabulation_areas
        .is_empty());
}
