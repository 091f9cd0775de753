//! Properties of the parsers that face clients: kickoff parameters, `_typeFilter` queries, POST
//! Parameters bodies and FHIRPath (anonymization configurations). On any input they answer (never
//! panic, never overflow the stack); a refusal names a parameter; what they accept is what the
//! input said, well formed by rules stated here. Shared by `tests/hostile_input.rs` (short) and
//! `cargo bench --bench fuzz` (long).

use fhir_export::export::{ExportRequest, Level};
use fhir_export::fhir::search::SearchQuery;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

const NAMES: &[&str] = &[
    "_type",
    "_since",
    "_until",
    "_till",
    "_outputFormat",
    "_typeFilter",
    "_elements",
    "_container",
    "patient",
    "includeAssociatedData",
];

const VALUES: &[&str] = &[
    "Patient",
    "Patient,Observation",
    "Observation,Unicorn",
    "2020-01-01T00:00:00Z",
    "2020-01-01T00:00:00+05:30",
    "2020-02-30T00:00:00Z",
    "application/fhir+ndjson",
    "ndjson",
    "Observation?code=8867-4",
    "Observation?code=http://loinc.org|8867-4,Condition?clinical-status=active",
    "Patient?gender:not=male&birthdate=ge2000",
    "Observation?_lastUpdated=gt2020-01-01",
    "Patient.name,id",
    "my-container",
    "Patient/abc",
    "Patient/a,Patient/b",
    "LatestProvenanceResources",
    "..",
    "%2F",
    "",
    "12€45",
    "ge12€45",
    "Patient?birthdate=12€45",
    "Observation?_lastUpdated=ge12€45",
    "Patient?name=Müller",
];

/// Text shaped like a date, a prefix or a list, with multibyte characters where digits go.
fn date_like() -> impl Strategy<Value = String> {
    "(eq|ge|le|gt|lt|sa|eb|ap)?[0-9€ü日T:.+,-]{0,25}"
}

/// A value: a known good or bad one, or anything.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(VALUES).prop_map(str::to_string),
        any::<String>(),
        "[A-Za-z?=&:,|./%0-9_-]{0,40}",
        date_like(),
        date_like().prop_map(|d| format!("Patient?birthdate={d}")),
        date_like().prop_map(|d| format!("Observation?_lastUpdated={d}")),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(NAMES).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// A query string of name=value pairs (encoded as a client would), or raw bytes.
fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::collection::vec((name(), value()), 0..6).prop_map(|pairs| {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (name, value) in &pairs {
                query.append_pair(name, value);
            }
            query.finish()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    ]
}

fn level() -> impl Strategy<Value = Level> {
    prop_oneof![
        Just(Level::System),
        Just(Level::Patient),
        "[a-z0-9-]{1,8}".prop_map(Level::Group),
    ]
}

/// The query's values of `name`, decoded as a server reads them.
fn values_of<'a>(pairs: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
    pairs
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Azure's rule for container names, as its documentation states it: 3-63 characters of
/// lowercase letters, digits and hyphens, starting and ending with a letter or digit, no two
/// hyphens in a row.
fn azure_allows_container(name: &str) -> bool {
    let letter_or_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=63).contains(&name.len())
        && name.chars().all(|c| letter_or_digit(c) || c == '-')
        && name.starts_with(letter_or_digit)
        && name.ends_with(letter_or_digit)
        && !name.contains("--")
}

/// What a kickoff accepts is what the query said, well formed by rules stated here, not by the
/// parser's own checks: each type was asked for by `_type`, the window came from `_since` and
/// `_until`, the container is one Azure allows, each filter was a `_typeFilter`. A refusal names
/// a parameter of the query.
fn kickoff_parameters(runner: &mut TestRunner) {
    runner
        .run(
            &(level(), query(), any::<bool>(), any::<bool>()),
            |(level, query, lenient, via_post)| {
                let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect();
                let asked = |name: &str, value: &str| {
                    values_of(&pairs, name).any(|v| v.split(',').any(|part| part.trim() == value))
                };
                match ExportRequest::from_query(level, &query, lenient, via_post) {
                    Err(error) => {
                        prop_assert!(!error.message.is_empty());
                        let named = |(name, _): &(String, String)| {
                            name.eq_ignore_ascii_case(&error.parameter)
                                || (name.is_empty() && error.parameter == "query")
                        };
                        prop_assert!(
                            pairs.iter().any(named),
                            "{query:?}: the refusal names {:?}, not a parameter of the query",
                            error.parameter
                        );
                    }
                    Ok(request) => {
                        for resource_type in request.types.iter().flatten() {
                            prop_assert!(
                                asked("_type", resource_type),
                                "{query:?}: {resource_type}"
                            );
                        }
                        if let (Some(since), Some(until)) = (request.since, request.until) {
                            prop_assert!(since < until);
                        }
                        prop_assert_eq!(
                            request.since.is_some(),
                            values_of(&pairs, "_since").any(|v| !v.is_empty())
                        );
                        if let Some(container) = &request.container {
                            prop_assert!(azure_allows_container(container), "{container:?}");
                            prop_assert!(values_of(&pairs, "_container").any(|v| v == container));
                        }
                        for filter in &request.type_filters {
                            let resource_type =
                                filter.as_str().split('?').next().unwrap_or_default();
                            prop_assert!(
                                values_of(&pairs, "_typeFilter").any(|v| v.contains(resource_type)),
                                "{query:?}: {}",
                                filter.as_str()
                            );
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// A resource to evaluate accepted filters against: a few shapes, some odd.
fn resource() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        value().prop_map(Value::from),
    ];
    let any_json = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        Just(
            json!({"resourceType": "Observation", "id": "o", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, "meta": {"lastUpdated": "2021-01-01T00:00:00Z"}})
        ),
        Just(
            json!({"resourceType": "Patient", "id": "p", "gender": "male", "birthDate": "2001-02-03", "name": [{"family": "Müller"}]})
        ),
        date_like().prop_map(|d| json!({"resourceType": "Patient", "id": "p", "birthDate": d, "meta": {"lastUpdated": d}})),
        any_json,
    ]
}

fn type_filters(runner: &mut TestRunner) {
    let filter = prop_oneof![
        (
            proptest::sample::select(&["Patient", "Observation", "Condition", "Encounter"][..]),
            query()
        )
            .prop_map(|(t, q)| format!("{t}?{q}")),
        (
            proptest::sample::select(&["birthdate", "_lastUpdated", "date"][..]),
            date_like()
        )
            .prop_map(|(p, d)| format!("Patient?{p}={d}")),
        value(),
    ];
    runner
        .run(&(filter, resource()), |(filter, resource)| {
            match SearchQuery::parse(&filter) {
                Err(message) => prop_assert!(!message.is_empty()),
                Ok(query) => {
                    let _ = query.matches(&resource);
                }
            }
            Ok(())
        })
        .unwrap();
}

fn parameters_bodies(runner: &mut TestRunner) {
    let parameter = (
        name(),
        value(),
        proptest::sample::select(
            &[
                "valueString",
                "valueInstant",
                "valueInteger",
                "valueReference",
                "resource",
                "part",
            ][..],
        ),
    )
        .prop_map(|(name, value, key)| match key {
            "valueReference" => json!({"name": name, key: {"reference": value}}),
            "valueInteger" => json!({"name": name, key: value.len()}),
            _ => json!({"name": name, key: value}),
        });
    let body = prop_oneof![
        3 => proptest::collection::vec(parameter, 0..5)
            .prop_map(|p| json!({"resourceType": "Parameters", "parameter": p}).to_string().into_bytes()),
        1 => resource().prop_map(|r| r.to_string().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ];
    runner
        .run(&(body, level()), |(body, level)| {
            match fhir_export::http::parameters::to_query(&body) {
                Ok(query) => {
                    // Each parameter the query carries is one the body named.
                    let named = serde_json::from_slice::<Value>(&body).ok();
                    let names: Vec<&str> = named
                        .iter()
                        .flat_map(|b| b["parameter"].as_array().into_iter().flatten())
                        .filter_map(|p| p["name"].as_str())
                        .collect();
                    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
                        prop_assert!(names.contains(&name.as_ref()), "{name} was not in the body");
                    }
                    let _ = ExportRequest::from_query(level, &query, false, true);
                }
                Err(refused) => prop_assert_eq!(refused.status.as_u16(), 400),
            }
            Ok(())
        })
        .unwrap();
}

/// FHIRPath's pieces, for text that is nearly an expression.
const FHIRPATH_TOKENS: &[&str] = &[
    "Patient",
    "name",
    ".",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "0",
    "1.5",
    "'a'",
    "'(",
    "@2020",
    "@T10:00",
    "-",
    "+",
    " or ",
    " and ",
    " implies ",
    " is ",
    " as ",
    "Quantity",
    " = ",
    " ~ ",
    " | ",
    " * ",
    " div ",
    ",",
    "$this",
    "%resource",
    "where(",
    "first()",
    "matches('",
    "`x`",
    "exists(",
    "ofType(",
    "nodesByType('HumanName')",
    "\\",
    "'",
    "5 'mg'",
    "true",
];

/// FHIRPath text: token soup, or one construct repeated deep or long.
fn fhirpath_text() -> impl Strategy<Value = String> {
    let soup = proptest::collection::vec(proptest::sample::select(FHIRPATH_TOKENS), 0..60)
        .prop_map(|tokens| tokens.concat());
    let nested = (
        proptest::sample::select(
            &[
                ("(", ")"),
                ("-", ""),
                ("+", ""),
                ("", ".first()"),
                ("", ".a"),
                ("a or ", ""),
                ("where(", ")"),
                ("", "[0]"),
                ("", " is T"),
            ][..],
        ),
        0usize..6_000,
    )
        .prop_map(|((open, close), depth)| {
            format!("{}Patient.name{}", open.repeat(depth), close.repeat(depth))
        });
    prop_oneof![3 => soup, 2 => nested, 1 => any::<String>()]
}

/// FHIRPath text answers with an expression or an error: parsing, and evaluating what parses,
/// never panic or overflow the stack.
fn fhirpath(runner: &mut TestRunner) {
    use fhir_export::fhir::json::Json;
    use fhir_export::fhirpath::tree::{Tree, ROOT};
    use fhir_export::fhirpath::{evaluate, parse, Item};
    let resource = r#"{"resourceType":"Patient","id":"p","name":[{"family":"F","given":["G"]}]}"#;
    runner
        .run(&fhirpath_text(), |text| {
            if let Ok(expr) = parse(&text) {
                let tree = Tree::from_json(Json::parse(resource).unwrap()).unwrap();
                let _ = evaluate(&tree, &expr, &[Item::Node(ROOT)]);
            }
            Ok(())
        })
        .unwrap();
}

/// Runs every property over `cases` generated inputs each.
pub fn run_all(cases: u32) {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    kickoff_parameters(&mut TestRunner::new(config.clone()));
    type_filters(&mut TestRunner::new(config.clone()));
    parameters_bodies(&mut TestRunner::new(config.clone()));
    fhirpath(&mut TestRunner::new(config));
}
