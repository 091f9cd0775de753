//! The kickoff parameters' unit tests.

use super::*;

fn parse(query: &str) -> Result<ExportRequest, RequestError> {
    ExportRequest::from_query(Level::System, query, false, false)
}

#[test]
fn types_merge_lists_and_repeats() {
    let request = parse("_type=Patient,Observation&_type=Patient&_type=Encounter").unwrap();
    assert_eq!(
        request.types.unwrap(),
        ["Patient", "Observation", "Encounter"]
    );
}

#[test]
fn errors_name_the_parameter() {
    for (query, parameter) in [
        ("_type=Patient,Nope", "_type"),
        ("_since=yesterday", "_since"),
        ("_since=2020-01-01", "_since"),
        ("_outputFormat=text/csv", "_outputFormat"),
        ("_container=../x", "_container"),
        ("_container=Upper", "_container"),
        ("_container=fhir-export-jobs", "_container"),
        ("_container=a--b", "_container"),
        (
            "_container=20261201t184500-0123456789abcdef0123456789abcdef",
            "_container",
        ),
        ("patient=Patient/1", "patient"),
        ("_typeFilter=Patient%3Fbogus%3Dtrue", "_typeFilter"),
        ("_typeFilter=Observation", "_typeFilter"),
        ("_elements=name.family", "_elements"),
        ("_elements=Unicorn.id", "_elements"),
        (
            "includeAssociatedData=LatestProvenanceResources",
            "includeAssociatedData",
        ),
        (
            "includeAssociatedData=_history&_typeFilter=Patient%3Factive%3Dtrue",
            "_typeFilter",
        ),
        ("_bogus=1", "_bogus"),
        ("_type=", "_type"),
        (
            "_since=2020-01-02T00:00:00Z&_until=2020-01-01T00:00:00Z",
            "_until",
        ),
        ("_since=2999-01-01T00:00:00Z", "_since"),
        (
            "_since=2020-01-01T00:00:00Z&_since=2021-01-01T00:00:00Z",
            "_since",
        ),
    ] {
        let error = parse(query).unwrap_err();
        assert_eq!(error.parameter, parameter, "{query}");
        assert!(
            error.message.contains(parameter),
            "{query}: {}",
            error.message
        );
    }
}

#[test]
fn lenient_turns_unsupported_parameters_into_notes() {
    let request = ExportRequest::from_query(
        Level::System,
        "_bogus=id&_type=Patient&includeAssociatedData=_history,RelevantProvenanceResources",
        true,
        false,
    )
    .unwrap();
    assert_eq!(request.notes.len(), 2);
    assert!(request.notes[0].contains("_bogus"));
    assert!(request.notes[1].contains("RelevantProvenanceResources"));
    assert!(request.versions.history && !request.versions.deleted);
    let patient_level = ExportRequest::from_query(
        Level::Patient,
        "includeAssociatedData=_deleted",
        true,
        false,
    );
    assert_eq!(
        patient_level.unwrap_err().parameter,
        "includeAssociatedData"
    );
}

#[test]
fn patient_level_parameters() {
    let patient_level =
        |query: &str, post: bool| ExportRequest::from_query(Level::Patient, query, false, post);
    assert_eq!(
        patient_level("patient=Patient/a,Patient/b&patient=Patient/a", true)
            .unwrap()
            .patients
            .unwrap(),
        ["a", "b"]
    );
    assert_eq!(
        patient_level("patient=Patient/a", false)
            .unwrap_err()
            .parameter,
        "patient"
    );
    assert_eq!(
        patient_level("patient=Observation/a", true)
            .unwrap_err()
            .parameter,
        "patient"
    );
    assert_eq!(
        patient_level("_type=Organization", false)
            .unwrap_err()
            .parameter,
        "_type"
    );
    assert_eq!(
        patient_level("_type=Group", false).unwrap_err().parameter,
        "_type"
    );
    assert!(patient_level("_type=Observation,Patient", false).is_ok());
    let mixed = patient_level("_type=Observation,Organization,Group", false).unwrap();
    assert_eq!(mixed.types.unwrap(), ["Observation"]);
    assert_eq!(mixed.notes.len(), 1);
    assert!(mixed.notes[0].contains("Organization, Group are not in the Patient compartment"));
    let none_in_scope =
        ExportRequest::from_query(Level::Patient, "_type=Organization", true, false).unwrap();
    assert_eq!(none_in_scope.types.unwrap(), Vec::<String>::new());
    assert!(none_in_scope.notes[0].contains("Organization"));
}

#[test]
fn privacy_parameters_are_never_ignored() {
    for (query, parameter) in [
        (
            "_anonymizationConfigCollectionReference=x",
            "_anonymizationConfigCollectionReference",
        ),
        ("_ANONYMIZATIONconfig=x", "_ANONYMIZATIONconfig"),
        ("_anonymizationConfigEtag=x", "_anonymizationConfig"),
        ("_anonymizationConfig=a/../b", "_anonymizationConfig"),
        ("_anonymizationConfig=..", "_anonymizationConfig"),
        (
            "_anonymizationConfig=a&_anonymizationConfig=b",
            "_anonymizationConfig",
        ),
    ] {
        for lenient in [false, true] {
            for level in [Level::System, Level::Patient, Level::Group("g".into())] {
                let error = ExportRequest::from_query(level, query, lenient, false).unwrap_err();
                assert_eq!(error.parameter, parameter, "{query}");
                assert!(error.message.contains(parameter), "{}", error.message);
            }
        }
    }
    let request = parse("_anonymizationConfig=team/a.json&_anonymizationConfigEtag=0x8D").unwrap();
    assert_eq!(
        request.anonymization,
        Some(Anonymization {
            config: "team/a.json".into(),
            etag: Some("\"0x8D\"".into())
        })
    );
    let quoted = parse("_anonymizationConfig=a.json&_anonymizationConfigEtag=%220x8D%22").unwrap();
    assert_eq!(
        quoted.anonymization.unwrap().etag.as_deref(),
        Some("\"0x8D\"")
    );
}

#[test]
fn type_filters_split_into_queries_and_elements_parse() {
    let request = parse(
        "_typeFilter=Observation%3Fcode%3D1%2C2,Condition%3Fcode%3D3&_elements=id,Patient.name",
    )
    .unwrap();
    let filters: Vec<&str> = request.type_filters.iter().map(|q| q.as_str()).collect();
    assert_eq!(filters, ["Observation?code=1,2", "Condition?code=3"]);
    assert_eq!(request.filters_for("Observation").len(), 1);
    assert_eq!(
        split_queries("Observation?code=a, Condition ?code=b,c,Unicorn?x=1"),
        ["Observation?code=a", "Condition ?code=b,c,Unicorn?x=1"]
    );
    assert_eq!(request.elements_for("Patient"), ["id", "name"]);
    assert_eq!(request.elements_for("Observation"), ["id"]);
}

#[test]
fn headers_are_checked() {
    let good = KickoffHeaders {
        accept: Some("application/fhir+json"),
        prefer: Some("respond-async"),
    };
    assert!(check_headers(&good).is_ok());
    let no_prefer = KickoffHeaders {
        prefer: None,
        ..good.clone()
    };
    assert_eq!(check_headers(&no_prefer).unwrap_err().parameter, "Prefer");
    let wrong_accept = KickoffHeaders {
        accept: Some("text/html"),
        ..good
    };
    assert_eq!(
        check_headers(&wrong_accept).unwrap_err().parameter,
        "Accept"
    );
    assert!(is_lenient(Some("respond-async, handling=lenient")));
}
