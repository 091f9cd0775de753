//! Synthetic FHIR R4 demo data, made here so a fresh clone has data to export.
//!
//! Deterministic for a seed: shared Organizations and Practitioners, Patients with Encounters and
//! the clinical and claims resources of each encounter, and Groups of patients. Every reference
//! resolves; `meta.lastUpdated` is spread over 2015-2025. Written as NDJSON, one file per type.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Patients in the `serve --demo` population.
pub const DEMO_PATIENTS: usize = 300;

const ORGANIZATIONS: usize = 20;
const PRACTITIONERS: usize = 40;

const GIVEN: &[&str] = &[
    "Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena",
    "Mateo", "Noor", "Omar", "Priya",
];
const FAMILY: &[&str] = &[
    "Garcia", "Smith", "Nguyen", "Okafor", "Müller", "Kowalski", "Haddad", "Silva", "Tanaka",
    "Jensen", "Ramírez", "Cohen",
];
/// (LOINC code, display, unit, low, high, category)
const OBSERVATIONS: &[(&str, &str, &str, f64, f64, &str)] = &[
    ("8867-4", "Heart rate", "/min", 55.0, 110.0, "vital-signs"),
    (
        "8310-5",
        "Body temperature",
        "Cel",
        36.0,
        38.5,
        "vital-signs",
    ),
    ("29463-7", "Body weight", "kg", 45.0, 120.0, "vital-signs"),
    ("8302-2", "Body height", "cm", 150.0, 200.0, "vital-signs"),
    (
        "8480-6",
        "Systolic blood pressure",
        "mm[Hg]",
        100.0,
        160.0,
        "vital-signs",
    ),
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        70.0,
        180.0,
        "laboratory",
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        120.0,
        280.0,
        "laboratory",
    ),
    (
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        10.0,
        17.0,
        "laboratory",
    ),
];
/// (SNOMED code, display)
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("40055000", "Chronic sinusitis"),
];
/// (RxNorm code, display)
const MEDICATIONS: &[(&str, &str)] = &[
    ("860975", "metformin 500 MG Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("308182", "amoxicillin 250 MG Oral Capsule"),
    ("310965", "ibuprofen 200 MG Oral Tablet"),
];
const PROCEDURES: &[(&str, &str)] = &[
    ("430193006", "Medication reconciliation"),
    ("171207006", "Depression screening"),
    ("73761001", "Colonoscopy"),
];
const VACCINES: &[(&str, &str)] = &[
    ("140", "Influenza, seasonal, injectable"),
    ("08", "Hep B, adolescent or pediatric"),
    ("115", "Tdap"),
];
const ALLERGIES: &[(&str, &str)] = &[
    ("300916003", "Latex allergy"),
    ("91936005", "Allergy to penicillin"),
    ("417532002", "Allergy to fish"),
];

/// What was written: resources per type.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub counts: BTreeMap<String, u64>,
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        write!(f, "{} resources ({})", self.total(), parts.join(", "))
    }
}

struct Writers<'a> {
    folder: &'a Path,
    files: BTreeMap<&'static str, BufWriter<File>>,
    summary: Summary,
    shape: Shape,
}

impl Writers<'_> {
    fn write(&mut self, resource_type: &'static str, resource: &Value) -> std::io::Result<()> {
        if !self.files.contains_key(resource_type) {
            let file = File::create(self.folder.join(format!("{resource_type}.ndjson")))?;
            self.files
                .insert(resource_type, BufWriter::with_capacity(1 << 20, file));
        }
        let out = self.files.get_mut(resource_type).expect("inserted above");
        serde_json::to_writer(&mut *out, resource)?;
        out.write_all(b"\n")?;
        *self
            .summary
            .counts
            .entry(resource_type.to_string())
            .or_default() += 1;
        Ok(())
    }
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// How much of a record each patient gets.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Encounters per patient.
    pub encounters: std::ops::Range<usize>,
    /// Addresses and contact points, clinical statuses, and the care teams, care plans, devices,
    /// diagnostic reports and imaging studies of a Synthea record (every resource type of
    /// Synthea's R4 sample).
    pub full_record: bool,
    /// Patients a Group has (the last has the rest).
    pub group_size: usize,
}

impl Shape {
    /// The demo's: a few encounters, the common clinical and claims types.
    pub const DEMO: Shape = Shape {
        encounters: 2..8,
        full_record: false,
        group_size: 50,
    };
    /// Like Synthea's 100-patient R4 sample in its types and volume (its resources are smaller,
    /// and more of them).
    pub const SYNTHEA_LIKE: Shape = Shape {
        encounters: 40..100,
        full_record: true,
        group_size: usize::MAX,
    };
}

/// Writes `patients` patients with their resources into `folder` (created if needed).
pub fn write_ndjson(patients: usize, seed: u64, folder: &Path) -> std::io::Result<Summary> {
    write_shaped(patients, seed, &Shape::DEMO, folder)
}

/// Writes `patients` patients with records of `shape` into `folder` (created if needed).
pub fn write_shaped(
    patients: usize,
    seed: u64,
    shape: &Shape,
    folder: &Path,
) -> std::io::Result<Summary> {
    std::fs::create_dir_all(folder)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Writers {
        folder,
        files: BTreeMap::new(),
        summary: Summary::default(),
        shape: shape.clone(),
    };
    for n in 0..ORGANIZATIONS {
        let meta = updated(&mut rng);
        out.write(
            "Organization",
            &json!({"resourceType": "Organization", "id": format!("org-{n}"), "meta": meta,
            "active": true, "name": format!("{} Health Center", pick(&mut rng, FAMILY))}),
        )?;
    }
    for n in 0..PRACTITIONERS {
        let meta = updated(&mut rng);
        let (given, family) = (*pick(&mut rng, GIVEN), *pick(&mut rng, FAMILY));
        out.write(
            "Practitioner",
            &json!({"resourceType": "Practitioner", "id": format!("pract-{n}"), "meta": meta,
            "active": true, "name": [{"family": family, "given": [given], "prefix": ["Dr."]}]}),
        )?;
    }
    for p in 0..patients {
        write_patient(&mut rng, &mut out, seed, p)?;
    }
    for (g, members) in (0..patients)
        .collect::<Vec<_>>()
        .chunks(shape.group_size)
        .enumerate()
    {
        let member: Vec<Value> = members
            .iter()
            .map(|p| json!({"entity": {"reference": format!("Patient/pat-{seed}-{p}")}}))
            .collect();
        let meta = updated(&mut rng);
        out.write("Group", &json!({"resourceType": "Group", "id": format!("group-{seed}-{g}"), "meta": meta, "type": "person",
            "actual": true, "name": format!("Demo cohort {g}"), "quantity": member.len(), "member": member}))?;
    }
    for (_, mut file) in std::mem::take(&mut out.files) {
        file.flush()?;
    }
    Ok(out.summary)
}

/// `meta` with a `lastUpdated` somewhere in 2015-2024.
fn updated(rng: &mut StdRng) -> Value {
    let epoch = Utc
        .with_ymd_and_hms(2015, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    let span_minutes = 365 * 10 * 24 * 60;
    json!({"lastUpdated": instant(epoch + Duration::minutes(rng.random_range(0..span_minutes)))})
}

/// One patient, perhaps an allergy, and 2-7 encounters with what happened in them.
fn write_patient(
    rng: &mut StdRng,
    out: &mut Writers<'_>,
    seed: u64,
    p: usize,
) -> std::io::Result<()> {
    let patient_id = format!("pat-{seed}-{p}");
    let patient_ref = json!({"reference": format!("Patient/{patient_id}")});
    let birth = Utc
        .with_ymd_and_hms(
            rng.random_range(1930..2020),
            rng.random_range(1..=12),
            rng.random_range(1..=28),
            0,
            0,
            0,
        )
        .single()
        .expect("valid date");
    let meta = updated(rng);
    let (given, family) = (*pick(rng, GIVEN), *pick(rng, FAMILY));
    let mut patient = json!({"resourceType": "Patient", "id": patient_id, "meta": meta,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": if rng.random_bool(0.5) { "female" } else { "male" },
        "birthDate": birth.format("%Y-%m-%d").to_string(),
        "managingOrganization": {"reference": format!("Organization/org-{}", rng.random_range(0..ORGANIZATIONS))}});
    if out.shape.full_record {
        patient["address"] = json!([{"line": [format!("{} {} Street", rng.random_range(1..999), pick(rng, FAMILY))],
            "city": "Springfield", "state": "MA", "postalCode": format!("0{}", rng.random_range(1000..2800)), "country": "US"}]);
        patient["telecom"] = json!([{"system": "phone", "value": format!("555-{:04}", rng.random_range(0..10_000)), "use": "home"}]);
    }
    out.write("Patient", &patient)?;

    if rng.random_bool(0.3) {
        let (code, display) = *pick(rng, ALLERGIES);
        let meta = updated(rng);
        out.write("AllergyIntolerance", &json!({"resourceType": "AllergyIntolerance", "id": format!("{patient_id}-allergy"),
            "meta": meta, "patient": patient_ref, "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]}}))?;
    }
    for e in 0..rng.random_range(out.shape.encounters.clone()) {
        write_encounter(rng, out, &patient_id, &patient_ref, birth, e)?;
    }
    if out.shape.full_record {
        write_care(rng, out, &patient_id, &patient_ref)?;
    }
    Ok(())
}

/// An encounter's claim and its explanation of benefit.
fn write_claim(
    rng: &mut StdRng,
    out: &mut Writers<'_>,
    encounter_id: &str,
    patient_ref: &Value,
    encounter_ref: &Value,
    organization: &Value,
    start: DateTime<Utc>,
) -> std::io::Result<()> {
    let total = (rng.random_range(50.0..900.0_f64) * 100.0).round() / 100.0;
    let claim_id = format!("{encounter_id}-claim");
    let meta = updated(rng);
    out.write("Claim", &json!({"resourceType": "Claim", "id": claim_id, "meta": meta, "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim", "patient": patient_ref, "created": instant(start), "provider": organization,
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": "Self-pay"}}],
        "item": [{"sequence": 1, "productOrService": {"text": "Encounter"}, "encounter": [encounter_ref]}],
        "total": {"value": total, "currency": "USD"}}))?;
    let meta = updated(rng);
    out.write("ExplanationOfBenefit", &json!({"resourceType": "ExplanationOfBenefit", "id": format!("{encounter_id}-eob"), "meta": meta,
        "status": "active", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim", "patient": patient_ref, "created": instant(start), "insurer": {"display": "Self-pay"},
        "provider": organization, "claim": {"reference": format!("Claim/{claim_id}")}, "outcome": "complete",
        "insurance": [{"focal": true, "coverage": {"display": "Self-pay"}}],
        "total": [{"category": {"coding": [{"code": "submitted"}]}, "amount": {"value": total, "currency": "USD"}}]}))?;
    Ok(())
}

/// A full record's report of some encounters' observations, and now and then an imaging study.
fn write_reports(
    rng: &mut StdRng,
    out: &mut Writers<'_>,
    encounter_id: &str,
    patient_ref: &Value,
    encounter_ref: &Value,
    start: DateTime<Utc>,
    observations: usize,
) -> std::io::Result<()> {
    if rng.random_bool(0.3) {
        let result: Vec<Value> = (0..observations)
            .map(|o| json!({"reference": format!("Observation/{encounter_id}-obs-{o}")}))
            .collect();
        let meta = updated(rng);
        out.write("DiagnosticReport", &json!({"resourceType": "DiagnosticReport", "id": format!("{encounter_id}-report"), "meta": meta,
            "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "51990-0", "display": "Basic metabolic panel"}]},
            "subject": patient_ref, "encounter": encounter_ref, "effectiveDateTime": instant(start), "issued": instant(start),
            "result": result}))?;
    }
    if rng.random_bool(0.01) {
        let meta = updated(rng);
        out.write("ImagingStudy", &json!({"resourceType": "ImagingStudy", "id": format!("{encounter_id}-imaging"), "meta": meta,
            "status": "available", "subject": patient_ref, "encounter": encounter_ref, "started": instant(start),
            "numberOfSeries": 1, "numberOfInstances": 1}))?;
    }
    Ok(())
}

/// A full record's care teams and plans, and perhaps a device.
fn write_care(
    rng: &mut StdRng,
    out: &mut Writers<'_>,
    patient_id: &str,
    patient_ref: &Value,
) -> std::io::Result<()> {
    for c in 0..rng.random_range(1..4usize) {
        let team_id = format!("{patient_id}-team-{c}");
        let practitioner = format!("Practitioner/pract-{}", rng.random_range(0..PRACTITIONERS));
        let meta = updated(rng);
        out.write(
            "CareTeam",
            &json!({"resourceType": "CareTeam", "id": team_id, "meta": meta, "status": "active",
            "subject": patient_ref, "participant": [{"member": {"reference": practitioner}}]}),
        )?;
        let (code, display) = *pick(rng, CONDITIONS);
        let meta = updated(rng);
        out.write("CarePlan", &json!({"resourceType": "CarePlan", "id": format!("{patient_id}-plan-{c}"), "meta": meta,
            "status": "active", "intent": "order", "subject": patient_ref,
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]}],
            "careTeam": [{"reference": format!("CareTeam/{team_id}")}]}))?;
    }
    if rng.random_bool(0.05) {
        let meta = updated(rng);
        out.write("Device", &json!({"resourceType": "Device", "id": format!("{patient_id}-device"), "meta": meta,
            "status": "active", "patient": patient_ref, "distinctIdentifier": format!("{}", rng.random_range(0..1_000_000)),
            "type": {"coding": [{"system": "http://snomed.info/sct", "code": "72506001", "display": "Implantable defibrillator"}]}}))?;
    }
    Ok(())
}

/// One encounter: observations, perhaps a condition, medication, procedure and immunization, a
/// claim and its explanation of benefit.
fn write_encounter(
    rng: &mut StdRng,
    out: &mut Writers<'_>,
    patient_id: &str,
    patient_ref: &Value,
    birth: DateTime<Utc>,
    e: usize,
) -> std::io::Result<()> {
    let encounter_id = format!("{patient_id}-enc-{e}");
    let encounter_ref = json!({"reference": format!("Encounter/{encounter_id}")});
    let start = birth + Duration::days(rng.random_range(0..(Utc::now() - birth).num_days().max(1)));
    let practitioner =
        json!({"reference": format!("Practitioner/pract-{}", rng.random_range(0..PRACTITIONERS))});
    let organization =
        json!({"reference": format!("Organization/org-{}", rng.random_range(0..ORGANIZATIONS))});
    let meta = updated(rng);
    out.write("Encounter", &json!({"resourceType": "Encounter", "id": encounter_id, "meta": meta, "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": patient_ref, "participant": [{"individual": practitioner}], "serviceProvider": organization,
        "period": {"start": instant(start), "end": instant(start + Duration::minutes(30))}}))?;
    let observations = rng.random_range(2..6usize);
    for o in 0..observations {
        let (code, display, unit, low, high, category) = *pick(rng, OBSERVATIONS);
        let value = (rng.random_range(low..high) * 10.0_f64).round() / 10.0;
        let meta = updated(rng);
        out.write("Observation", &json!({"resourceType": "Observation", "id": format!("{encounter_id}-obs-{o}"), "meta": meta,
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
            "subject": patient_ref, "encounter": encounter_ref, "performer": [practitioner],
            "effectiveDateTime": instant(start), "issued": instant(start),
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}))?;
    }
    if rng.random_bool(0.3) {
        let (code, display) = *pick(rng, CONDITIONS);
        let meta = updated(rng);
        let mut condition = json!({"resourceType": "Condition", "id": format!("{encounter_id}-cond"), "meta": meta,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
            "subject": patient_ref, "encounter": encounter_ref, "onsetDateTime": instant(start)});
        if out.shape.full_record {
            let status = if rng.random_bool(0.4) {
                "active"
            } else {
                "resolved"
            };
            condition["clinicalStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]});
        }
        out.write("Condition", &condition)?;
    }
    if rng.random_bool(0.4) {
        let (code, display) = *pick(rng, MEDICATIONS);
        let meta = updated(rng);
        out.write("MedicationRequest", &json!({"resourceType": "MedicationRequest", "id": format!("{encounter_id}-med"), "meta": meta,
            "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code, "display": display}]},
            "subject": patient_ref, "encounter": encounter_ref, "requester": practitioner, "authoredOn": instant(start)}))?;
    }
    if rng.random_bool(0.3) {
        let (code, display) = *pick(rng, PROCEDURES);
        let meta = updated(rng);
        out.write("Procedure", &json!({"resourceType": "Procedure", "id": format!("{encounter_id}-proc"), "meta": meta,
            "status": "completed", "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
            "subject": patient_ref, "encounter": encounter_ref, "performedDateTime": instant(start)}))?;
    }
    if rng.random_bool(0.2) {
        let (code, display) = *pick(rng, VACCINES);
        let meta = updated(rng);
        out.write("Immunization", &json!({"resourceType": "Immunization", "id": format!("{encounter_id}-imm"), "meta": meta,
            "status": "completed", "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": code, "display": display}]},
            "patient": patient_ref, "encounter": encounter_ref, "occurrenceDateTime": instant(start)}))?;
    }
    if out.shape.full_record {
        write_reports(
            rng,
            out,
            &encounter_id,
            patient_ref,
            &encounter_ref,
            start,
            observations,
        )?;
    }
    write_claim(
        rng,
        out,
        &encounter_id,
        patient_ref,
        &encounter_ref,
        &organization,
        start,
    )
}
