//! SQL on FHIR v2 views: the specification's conformance suite (`../shared/data/sql-on-fhir-tests`,
//! 134 cases) run through the engine, with the count printed and the report written in the
//! format sql-on-fhir.org reads; `handler view run` over real files.

mod common;

use fhir_export::views::suite;

#[test]
fn the_sql_on_fhir_conformance_suite_passes() {
    let Some(dir) = common::outside_corpus(
        "sql-on-fhir-tests",
        "views::the_sql_on_fhir_conformance_suite_passes",
    ) else {
        return;
    };
    let outcomes = suite::run(&dir.join("tests")).unwrap();
    let shareable: Vec<_> = outcomes
        .iter()
        .filter(|o| o.tags.iter().any(|t| t == "shareable"))
        .collect();
    let passed = |list: &[&suite::Outcome]| list.iter().filter(|o| o.failure.is_none()).count();
    let experimental: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.tags.iter().any(|t| t == "shareable"))
        .collect();
    println!(
        "SQL on FHIR suite: {} of {} shareable cases pass, {} of {} others (experimental)",
        passed(&shareable),
        shareable.len(),
        passed(&experimental),
        experimental.len()
    );
    for outcome in &outcomes {
        if let Some(failure) = &outcome.failure {
            println!("  failed: {} / {}: {failure}", outcome.file, outcome.name);
        }
    }
    assert_eq!(outcomes.len(), 134);
    let report = suite::report(&outcomes);
    assert_eq!(report.as_object().unwrap().len(), 22);
    let failing: Vec<_> = shareable
        .iter()
        .filter(|o| o.failure.is_some())
        .map(|o| format!("{} / {}", o.file, o.name))
        .collect();
    assert!(
        failing.is_empty(),
        "{} shareable cases fail: {failing:#?}",
        failing.len()
    );
}
