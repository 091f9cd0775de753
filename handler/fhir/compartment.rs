//! Patient compartment membership, from the R4 Patient CompartmentDefinition.
//!
//! Each entry names the element paths behind the definition's search parameters, and the
//! parameters; a resource is in the compartment of every patient that one of those paths
//! references.

use serde_json::Value;

/// (resource type, element paths, search parameters) for every type in the R4 Patient compartment.
/// The paths decide membership here; the parameters (`Patient` adds `_id`, its own compartment) let a
/// server that supports them find a compartment's members with a type search, many patients per
/// request.
const PATIENT_COMPARTMENT: &[(&str, &[&str], &[&str])] = &[
    ("Account", &["subject"], &["subject"]),
    ("AdverseEvent", &["subject"], &["subject"]),
    (
        "AllergyIntolerance",
        &["patient", "recorder", "asserter"],
        &["patient", "recorder", "asserter"],
    ),
    ("Appointment", &["participant.actor"], &["actor"]),
    ("AppointmentResponse", &["actor"], &["actor"]),
    ("AuditEvent", &["agent.who", "entity.what"], &["patient"]),
    ("Basic", &["subject", "author"], &["patient", "author"]),
    ("BodyStructure", &["patient"], &["patient"]),
    (
        "CarePlan",
        &["subject", "activity.detail.performer"],
        &["patient", "performer"],
    ),
    (
        "CareTeam",
        &["subject", "participant.member"],
        &["patient", "participant"],
    ),
    ("ChargeItem", &["subject"], &["subject"]),
    ("Claim", &["patient", "payee.party"], &["patient", "payee"]),
    ("ClaimResponse", &["patient"], &["patient"]),
    ("ClinicalImpression", &["subject"], &["subject"]),
    (
        "Communication",
        &["subject", "sender", "recipient"],
        &["subject", "sender", "recipient"],
    ),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
        &["subject", "sender", "recipient", "requester"],
    ),
    (
        "Composition",
        &["subject", "author", "attester.party"],
        &["subject", "author", "attester"],
    ),
    (
        "Condition",
        &["subject", "asserter"],
        &["patient", "asserter"],
    ),
    ("Consent", &["patient"], &["patient"]),
    (
        "Coverage",
        &["policyHolder", "subscriber", "beneficiary", "payor"],
        &["policy-holder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"], &["patient"]),
    ("CoverageEligibilityResponse", &["patient"], &["patient"]),
    ("DetectedIssue", &["patient"], &["patient"]),
    (
        "DeviceRequest",
        &["subject", "performer"],
        &["subject", "performer"],
    ),
    ("DeviceUseStatement", &["subject"], &["subject"]),
    ("DiagnosticReport", &["subject"], &["subject"]),
    (
        "DocumentManifest",
        &["subject", "author", "recipient"],
        &["subject", "author", "recipient"],
    ),
    (
        "DocumentReference",
        &["subject", "author"],
        &["subject", "author"],
    ),
    ("Encounter", &["subject"], &["subject"]),
    ("EnrollmentRequest", &["candidate"], &["subject"]),
    ("EpisodeOfCare", &["patient"], &["patient"]),
    (
        "ExplanationOfBenefit",
        &["patient", "payee.party"],
        &["patient", "payee"],
    ),
    ("FamilyMemberHistory", &["patient"], &["patient"]),
    ("Flag", &["subject"], &["patient"]),
    ("Goal", &["subject"], &["patient"]),
    ("Group", &["member.entity"], &["member"]),
    ("ImagingStudy", &["subject"], &["patient"]),
    ("Immunization", &["patient"], &["patient"]),
    ("ImmunizationEvaluation", &["patient"], &["patient"]),
    ("ImmunizationRecommendation", &["patient"], &["patient"]),
    (
        "Invoice",
        &["subject", "recipient"],
        &["subject", "patient", "recipient"],
    ),
    ("List", &["subject", "source"], &["subject", "source"]),
    ("MeasureReport", &["subject"], &["patient"]),
    ("Media", &["subject"], &["subject"]),
    (
        "MedicationAdministration",
        &["subject", "performer.actor"],
        &["patient", "performer", "subject"],
    ),
    (
        "MedicationDispense",
        &["subject", "receiver"],
        &["subject", "patient", "receiver"],
    ),
    ("MedicationRequest", &["subject"], &["subject"]),
    ("MedicationStatement", &["subject"], &["subject"]),
    ("MolecularSequence", &["patient"], &["patient"]),
    ("NutritionOrder", &["patient"], &["patient"]),
    (
        "Observation",
        &["subject", "performer"],
        &["subject", "performer"],
    ),
    ("Patient", &["link.other"], &["_id", "link"]),
    ("Person", &["link.target"], &["patient"]),
    (
        "Procedure",
        &["subject", "performer.actor"],
        &["patient", "performer"],
    ),
    ("Provenance", &["target"], &["patient"]),
    (
        "QuestionnaireResponse",
        &["subject", "author"],
        &["subject", "author"],
    ),
    ("RelatedPerson", &["patient"], &["patient"]),
    (
        "RequestGroup",
        &["subject", "action.participant"],
        &["subject", "participant"],
    ),
    ("ResearchSubject", &["individual"], &["individual"]),
    ("RiskAssessment", &["subject"], &["subject"]),
    ("Schedule", &["actor"], &["actor"]),
    (
        "ServiceRequest",
        &["subject", "performer"],
        &["subject", "performer"],
    ),
    ("Specimen", &["subject"], &["subject"]),
    ("SupplyDelivery", &["patient"], &["patient"]),
    ("SupplyRequest", &["requester"], &["subject"]),
    ("VisionPrescription", &["patient"], &["patient"]),
];

/// The search parameters that find a type's members of a patient compartment (`_id` takes a bare
/// id, the others a `Patient/{id}` reference); empty for a type outside the compartment.
pub fn compartment_search_params(resource_type: &str) -> &'static [&'static str] {
    entry(resource_type)
        .map(|(_, _, params)| *params)
        .unwrap_or_default()
}

type Entry = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

fn entry(resource_type: &str) -> Option<&'static Entry> {
    PATIENT_COMPARTMENT
        .iter()
        .find(|(name, _, _)| *name == resource_type)
}

pub fn in_patient_compartment_definition(resource_type: &str) -> bool {
    paths_for(resource_type).is_some()
}

fn paths_for(resource_type: &str) -> Option<&'static [&'static str]> {
    entry(resource_type).map(|(_, paths, _)| *paths)
}

/// The top-level elements `patient_ids` reads for a type (the first step of each path).
pub fn elements_read(resource_type: &str) -> impl Iterator<Item = &'static str> {
    paths_for(resource_type)
        .unwrap_or_default()
        .iter()
        .map(|path| path.split('.').next().unwrap_or(path))
}

/// Whether `member` is the first step of a compartment path of some type: a top-level member a
/// resource may name a patient in. A superset of every type's `elements_read`.
pub fn may_name_a_patient(member: &str) -> bool {
    matches!(
        member,
        "subject"
            | "patient"
            | "recorder"
            | "asserter"
            | "participant"
            | "actor"
            | "agent"
            | "entity"
            | "author"
            | "activity"
            | "payee"
            | "sender"
            | "recipient"
            | "requester"
            | "attester"
            | "policyHolder"
            | "subscriber"
            | "beneficiary"
            | "payor"
            | "performer"
            | "candidate"
            | "member"
            | "source"
            | "receiver"
            | "link"
            | "target"
            | "individual"
            | "action"
    )
}

/// The ids of the patients whose compartment holds `resource` (a Patient is in its own).
pub fn patient_ids(resource_type: &str, id: &str, resource: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    if resource_type == "Patient" {
        ids.push(id.to_string());
    }
    for path in paths_for(resource_type).unwrap_or_default() {
        collect_references(resource, path, &mut |reference| {
            if let Some(patient) = patient_id_of(reference) {
                if !ids.iter().any(|known| known == patient) {
                    ids.push(patient.to_string());
                }
            }
        });
    }
    ids
}

/// The patient id of a `Patient/{id}` reference, relative or absolute, without a version.
pub fn patient_id_of(reference: &str) -> Option<&str> {
    let reference = reference.split("/_history/").next().unwrap_or(reference);
    let start = if reference.starts_with("Patient/") {
        0
    } else {
        reference.rfind("/Patient/").map(|at| at + 1)?
    };
    let id = &reference[start + "Patient/".len()..];
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Calls `found` with the `reference` string of every Reference reached by the dotted `path`.
fn collect_references(value: &Value, path: &str, found: &mut dyn FnMut(&str)) {
    match value {
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_references(item, path, found)),
        Value::Object(map) => match path.split_once('.') {
            Some((head, rest)) => {
                if let Some(child) = map.get(head) {
                    collect_references(child, rest, found);
                }
            }
            None => match map.get(path) {
                Some(Value::Array(items)) => {
                    items.iter().for_each(|item| reference_of(item, found))
                }
                Some(item) => reference_of(item, found),
                None => {}
            },
        },
        _ => {}
    }
}

fn reference_of(value: &Value, found: &mut dyn FnMut(&str)) {
    if let Some(reference) = value.get("reference").and_then(Value::as_str) {
        found(reference);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_compartment_type_has_search_params() {
        for (resource_type, _, _) in PATIENT_COMPARTMENT {
            assert!(
                !compartment_search_params(resource_type).is_empty(),
                "{resource_type}"
            );
        }
    }

    #[test]
    fn every_element_read_may_name_a_patient() {
        for (resource_type, _, _) in PATIENT_COMPARTMENT {
            for element in elements_read(resource_type) {
                assert!(may_name_a_patient(element), "{resource_type}.{element}");
            }
        }
    }

    #[test]
    fn finds_patients_through_nested_and_repeated_paths() {
        let team = json!({"resourceType": "CareTeam", "subject": {"reference": "Patient/a"},
            "participant": [{"member": {"reference": "Practitioner/x"}}, {"member": {"reference": "Patient/b"}}]});
        assert_eq!(patient_ids("CareTeam", "t", &team), vec!["a", "b"]);
    }

    #[test]
    fn a_patient_is_in_its_own_compartment_and_linked_ones() {
        let patient =
            json!({"link": [{"other": {"reference": "http://x/fhir/Patient/old/_history/2"}}]});
        assert_eq!(patient_ids("Patient", "p", &patient), vec!["p", "old"]);
        assert_eq!(compartment_search_params("Patient"), ["_id", "link"]);
        assert!(compartment_search_params("Medication").is_empty());
    }

    #[test]
    fn non_patient_references_and_unknown_types_are_ignored() {
        let obs = json!({"subject": {"reference": "Group/g"}, "performer": [{"reference": "Practitioner/p"}]});
        assert!(patient_ids("Observation", "o", &obs).is_empty());
        assert!(patient_ids(
            "Organization",
            "o",
            &json!({"partOf": {"reference": "Patient/a"}})
        )
        .is_empty());
        assert_eq!(patient_id_of("Patient/"), None);
    }
}
