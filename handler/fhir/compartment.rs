//! Patient compartment membership, from the R4 Patient CompartmentDefinition.
//!
//! Each entry names the element paths behind the definition's search parameters; a resource is in
//! the compartment of every patient that one of those paths references.

use serde_json::Value;

/// (resource type, element paths) for every type in the R4 Patient compartment.
const PATIENT_COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["participant.actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["agent.who", "entity.what"]),
    ("Basic", &["subject", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["subject", "activity.detail.performer"]),
    ("CareTeam", &["subject", "participant.member"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee.party"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester.party"]),
    ("Condition", &["subject", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policyHolder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["subject"]),
    ("EnrollmentRequest", &["candidate"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee.party"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["subject"]),
    ("Goal", &["subject"]),
    ("Group", &["member.entity"]),
    ("ImagingStudy", &["subject"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["subject"]),
    ("Media", &["subject"]),
    ("MedicationAdministration", &["subject", "performer.actor"]),
    ("MedicationDispense", &["subject", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["link.other"]),
    ("Person", &["link.target"]),
    ("Procedure", &["subject", "performer.actor"]),
    ("Provenance", &["target"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "action.participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["requester"]),
    ("VisionPrescription", &["patient"]),
];

/// The search parameters of the R4 Patient CompartmentDefinition per type (`Patient` adds `_id`,
/// its own compartment): a server that supports them finds a compartment's members with a type
/// search, many patients per request.
const PATIENT_COMPARTMENT_PARAMS: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["patient"]),
    ("Basic", &["patient", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["patient", "performer"]),
    ("CareTeam", &["patient", "participant"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester"]),
    ("Condition", &["patient", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policy-holder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["subject"]),
    ("EnrollmentRequest", &["subject"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["patient"]),
    ("Goal", &["patient"]),
    ("Group", &["member"]),
    ("ImagingStudy", &["patient"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "patient", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["patient"]),
    ("Media", &["subject"]),
    (
        "MedicationAdministration",
        &["patient", "performer", "subject"],
    ),
    ("MedicationDispense", &["subject", "patient", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["_id", "link"]),
    ("Person", &["patient"]),
    ("Procedure", &["patient", "performer"]),
    ("Provenance", &["patient"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["subject"]),
    ("VisionPrescription", &["patient"]),
];

/// The search parameters that find a type's members of a patient compartment (`_id` takes a bare
/// id, the others a `Patient/{id}` reference); empty for a type outside the compartment.
pub fn compartment_search_params(resource_type: &str) -> &'static [&'static str] {
    PATIENT_COMPARTMENT_PARAMS
        .iter()
        .find(|(name, _)| *name == resource_type)
        .map(|(_, params)| *params)
        .unwrap_or_default()
}

pub fn in_patient_compartment_definition(resource_type: &str) -> bool {
    paths_for(resource_type).is_some()
}

fn paths_for(resource_type: &str) -> Option<&'static [&'static str]> {
    PATIENT_COMPARTMENT
        .iter()
        .find(|(name, _)| *name == resource_type)
        .map(|(_, paths)| *paths)
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
        for (resource_type, _) in PATIENT_COMPARTMENT {
            assert!(
                !compartment_search_params(resource_type).is_empty(),
                "{resource_type}"
            );
        }
    }

    #[test]
    fn every_element_read_may_name_a_patient() {
        for (resource_type, _) in PATIENT_COMPARTMENT {
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
