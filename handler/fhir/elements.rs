//! `_elements`: a resource cut down to chosen top-level elements, the mandatory ones, and a
//! `SUBSETTED` tag.

use super::json::Json;

/// Elements with a minimum cardinality of 1 in R4, for the types commonly exported.
const MANDATORY: &[(&str, &[&str])] = &[
    ("AllergyIntolerance", &["patient"]),
    ("CarePlan", &["status", "intent", "subject"]),
    ("CareTeam", &[]),
    (
        "Claim",
        &[
            "status",
            "type",
            "use",
            "patient",
            "created",
            "provider",
            "priority",
            "insurance",
        ],
    ),
    ("Condition", &["subject"]),
    ("Coverage", &["status", "beneficiary", "payor"]),
    ("DiagnosticReport", &["status", "code"]),
    ("DocumentReference", &["status", "content"]),
    ("Encounter", &["status", "class"]),
    (
        "ExplanationOfBenefit",
        &[
            "status",
            "type",
            "use",
            "patient",
            "created",
            "insurer",
            "provider",
            "outcome",
            "insurance",
        ],
    ),
    ("Group", &["type", "actual"]),
    ("ImagingStudy", &["status", "subject"]),
    (
        "Immunization",
        &["status", "vaccineCode", "patient", "occurrence"],
    ),
    (
        "MedicationRequest",
        &["status", "intent", "medication", "subject"],
    ),
    ("Observation", &["status", "code"]),
    ("Procedure", &["status", "subject"]),
];

const ALWAYS: &[&str] = &["resourceType", "id", "meta"];

/// Whether a JSON key carries the element `name` (`value` covers `valueQuantity`; `_name` too).
fn key_is_element(key: &str, name: &str) -> bool {
    let key = key.strip_prefix('_').unwrap_or(key);
    key == name
        || key
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// The resource with only `elements` (plus the mandatory ones), tagged `SUBSETTED`; what it keeps
/// stays as written.
pub fn subset<'a>(resource: Json<'a>, resource_type: &str, elements: &[String]) -> Json<'a> {
    let Json::Object(members) = resource else {
        return resource;
    };
    let mandatory = MANDATORY
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map_or(&[][..], |(_, m)| *m);
    let keep = |key: &str| {
        ALWAYS.contains(&key)
            || elements.iter().any(|e| key_is_element(key, e))
            || mandatory.iter().any(|m| key_is_element(key, m))
    };
    let mut kept = Json::Object(members.into_iter().filter(|(key, _)| keep(key)).collect());
    let subsetted = SUBSETTED_TAG.clone();
    match kept.get_mut("meta") {
        Some(meta @ Json::Object(_)) => match meta.get_mut("tag") {
            Some(Json::Array(tags)) => tags.push(subsetted),
            Some(_) => {}
            None => meta.set("tag", Json::Array(vec![subsetted]), usize::MAX),
        },
        Some(_) => {}
        None => {
            let meta = Json::Object(vec![("tag".into(), Json::Array(vec![subsetted]))]);
            kept.set("meta", meta, usize::MAX);
        }
    }
    kept
}

/// The tag of a trimmed resource, parsed once.
static SUBSETTED_TAG: std::sync::LazyLock<Json<'static>> = std::sync::LazyLock::new(|| {
    Json::parse(r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}"#)
        .expect("valid JSON")
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_listed_mandatory_and_choice_elements() {
        let obs = Json::parse(r#"{"resourceType": "Observation", "id": "o", "meta": {"lastUpdated": "2020-01-01T00:00:00Z"},
            "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p"},
            "valueQuantity": {"value": 1.50}, "issued": "2020-01-01T00:00:00Z"}"#).unwrap();
        let cut = subset(obs, "Observation", &["value".to_string()]).to_value();
        let keys: Vec<&str> = cut
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "valueQuantity"
            ]
        );
        assert_eq!(cut["meta"]["tag"][0]["code"], "SUBSETTED");
        assert_eq!(cut["meta"]["lastUpdated"], "2020-01-01T00:00:00Z");
    }
}
