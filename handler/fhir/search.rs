//! FHIR search queries (`Type?param=value&...`) evaluated on a resource, for `_typeFilter`.
//!
//! Criteria of one query are ANDed, comma-separated values of one criterion ORed. Supported: the
//! parameters in `PARAMETERS` (token, date, reference and string kinds), `_id` and `_lastUpdated` on
//! every type; the modifiers `:missing`, `:not` and `:text` (token), `:exact` and `:contains`
//! (string); the date prefixes `eq ne gt lt ge le sa eb ap`.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::Value;

use super::types::is_resource_type;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Token,
    Date,
    Reference,
    String,
}

/// (resource type, parameter, kind, element paths; a `|` in a path lists choice elements).
const PARAMETERS: &[(&str, &str, Kind, &[&str])] = &[
    ("Patient", "gender", Kind::Token, &["gender"]),
    ("Patient", "birthdate", Kind::Date, &["birthDate"]),
    ("Patient", "name", Kind::String, &["name"]),
    ("Patient", "family", Kind::String, &["name.family"]),
    ("Patient", "given", Kind::String, &["name.given"]),
    ("Patient", "identifier", Kind::Token, &["identifier"]),
    ("Patient", "active", Kind::Token, &["active"]),
    ("Patient", "address-city", Kind::String, &["address.city"]),
    (
        "Patient",
        "organization",
        Kind::Reference,
        &["managingOrganization"],
    ),
    (
        "Patient",
        "general-practitioner",
        Kind::Reference,
        &["generalPractitioner"],
    ),
    ("Practitioner", "name", Kind::String, &["name"]),
    ("Practitioner", "family", Kind::String, &["name.family"]),
    ("Practitioner", "given", Kind::String, &["name.given"]),
    ("Practitioner", "identifier", Kind::Token, &["identifier"]),
    ("Practitioner", "active", Kind::Token, &["active"]),
    ("Practitioner", "gender", Kind::Token, &["gender"]),
    ("Organization", "name", Kind::String, &["name"]),
    ("Organization", "identifier", Kind::Token, &["identifier"]),
    ("Organization", "active", Kind::Token, &["active"]),
    ("Organization", "type", Kind::Token, &["type"]),
    ("Organization", "partof", Kind::Reference, &["partOf"]),
    ("Observation", "code", Kind::Token, &["code"]),
    ("Observation", "category", Kind::Token, &["category"]),
    ("Observation", "status", Kind::Token, &["status"]),
    ("Observation", "subject", Kind::Reference, &["subject"]),
    ("Observation", "patient", Kind::Reference, &["subject"]),
    ("Observation", "encounter", Kind::Reference, &["encounter"]),
    ("Observation", "performer", Kind::Reference, &["performer"]),
    (
        "Observation",
        "date",
        Kind::Date,
        &["effectiveDateTime|effectivePeriod|effectiveInstant"],
    ),
    (
        "Observation",
        "value-concept",
        Kind::Token,
        &["valueCodeableConcept"],
    ),
    ("Condition", "code", Kind::Token, &["code"]),
    ("Condition", "category", Kind::Token, &["category"]),
    (
        "Condition",
        "clinical-status",
        Kind::Token,
        &["clinicalStatus"],
    ),
    (
        "Condition",
        "verification-status",
        Kind::Token,
        &["verificationStatus"],
    ),
    ("Condition", "subject", Kind::Reference, &["subject"]),
    ("Condition", "patient", Kind::Reference, &["subject"]),
    ("Condition", "encounter", Kind::Reference, &["encounter"]),
    (
        "Condition",
        "onset-date",
        Kind::Date,
        &["onsetDateTime|onsetPeriod"],
    ),
    ("Condition", "recorded-date", Kind::Date, &["recordedDate"]),
    ("Encounter", "status", Kind::Token, &["status"]),
    ("Encounter", "class", Kind::Token, &["class"]),
    ("Encounter", "type", Kind::Token, &["type"]),
    ("Encounter", "subject", Kind::Reference, &["subject"]),
    ("Encounter", "patient", Kind::Reference, &["subject"]),
    ("Encounter", "date", Kind::Date, &["period"]),
    (
        "Encounter",
        "participant",
        Kind::Reference,
        &["participant.individual"],
    ),
    (
        "Encounter",
        "service-provider",
        Kind::Reference,
        &["serviceProvider"],
    ),
    ("Procedure", "code", Kind::Token, &["code"]),
    ("Procedure", "status", Kind::Token, &["status"]),
    ("Procedure", "subject", Kind::Reference, &["subject"]),
    ("Procedure", "patient", Kind::Reference, &["subject"]),
    ("Procedure", "encounter", Kind::Reference, &["encounter"]),
    (
        "Procedure",
        "date",
        Kind::Date,
        &["performedDateTime|performedPeriod"],
    ),
    (
        "Procedure",
        "performer",
        Kind::Reference,
        &["performer.actor"],
    ),
    (
        "MedicationRequest",
        "code",
        Kind::Token,
        &["medicationCodeableConcept"],
    ),
    ("MedicationRequest", "status", Kind::Token, &["status"]),
    ("MedicationRequest", "intent", Kind::Token, &["intent"]),
    (
        "MedicationRequest",
        "subject",
        Kind::Reference,
        &["subject"],
    ),
    (
        "MedicationRequest",
        "patient",
        Kind::Reference,
        &["subject"],
    ),
    (
        "MedicationRequest",
        "encounter",
        Kind::Reference,
        &["encounter"],
    ),
    (
        "MedicationRequest",
        "requester",
        Kind::Reference,
        &["requester"],
    ),
    (
        "MedicationRequest",
        "medication",
        Kind::Reference,
        &["medicationReference"],
    ),
    (
        "MedicationRequest",
        "authoredon",
        Kind::Date,
        &["authoredOn"],
    ),
    (
        "Immunization",
        "vaccine-code",
        Kind::Token,
        &["vaccineCode"],
    ),
    ("Immunization", "status", Kind::Token, &["status"]),
    ("Immunization", "patient", Kind::Reference, &["patient"]),
    ("Immunization", "date", Kind::Date, &["occurrenceDateTime"]),
    ("AllergyIntolerance", "code", Kind::Token, &["code"]),
    (
        "AllergyIntolerance",
        "clinical-status",
        Kind::Token,
        &["clinicalStatus"],
    ),
    ("AllergyIntolerance", "category", Kind::Token, &["category"]),
    (
        "AllergyIntolerance",
        "criticality",
        Kind::Token,
        &["criticality"],
    ),
    (
        "AllergyIntolerance",
        "patient",
        Kind::Reference,
        &["patient"],
    ),
    ("DiagnosticReport", "code", Kind::Token, &["code"]),
    ("DiagnosticReport", "category", Kind::Token, &["category"]),
    ("DiagnosticReport", "status", Kind::Token, &["status"]),
    ("DiagnosticReport", "subject", Kind::Reference, &["subject"]),
    ("DiagnosticReport", "patient", Kind::Reference, &["subject"]),
    (
        "DiagnosticReport",
        "encounter",
        Kind::Reference,
        &["encounter"],
    ),
    (
        "DiagnosticReport",
        "date",
        Kind::Date,
        &["effectiveDateTime|effectivePeriod"],
    ),
    ("Claim", "status", Kind::Token, &["status"]),
    ("Claim", "use", Kind::Token, &["use"]),
    ("Claim", "patient", Kind::Reference, &["patient"]),
    ("Claim", "provider", Kind::Reference, &["provider"]),
    ("Claim", "created", Kind::Date, &["created"]),
    ("ExplanationOfBenefit", "status", Kind::Token, &["status"]),
    (
        "ExplanationOfBenefit",
        "patient",
        Kind::Reference,
        &["patient"],
    ),
    (
        "ExplanationOfBenefit",
        "provider",
        Kind::Reference,
        &["provider"],
    ),
    ("ExplanationOfBenefit", "claim", Kind::Reference, &["claim"]),
    ("ExplanationOfBenefit", "created", Kind::Date, &["created"]),
    ("CarePlan", "status", Kind::Token, &["status"]),
    ("CarePlan", "category", Kind::Token, &["category"]),
    ("CarePlan", "subject", Kind::Reference, &["subject"]),
    ("CarePlan", "patient", Kind::Reference, &["subject"]),
    ("CarePlan", "date", Kind::Date, &["period"]),
    ("CareTeam", "status", Kind::Token, &["status"]),
    ("CareTeam", "subject", Kind::Reference, &["subject"]),
    ("CareTeam", "patient", Kind::Reference, &["subject"]),
    ("CareTeam", "date", Kind::Date, &["period"]),
    ("ImagingStudy", "status", Kind::Token, &["status"]),
    ("ImagingStudy", "subject", Kind::Reference, &["subject"]),
    ("ImagingStudy", "patient", Kind::Reference, &["subject"]),
    ("ImagingStudy", "started", Kind::Date, &["started"]),
    ("Device", "type", Kind::Token, &["type"]),
    ("Device", "status", Kind::Token, &["status"]),
    ("Device", "patient", Kind::Reference, &["patient"]),
];

/// Every supported (type, parameter, kind) beyond `_id` and `_lastUpdated`, for the CapabilityStatement.
pub fn supported_parameters() -> impl Iterator<Item = (&'static str, &'static str, Kind)> {
    PARAMETERS.iter().map(|(t, p, k, _)| (*t, *p, *k))
}

fn definition(resource_type: &str, name: &str) -> Option<(Kind, &'static [&'static str])> {
    match name {
        "_id" => Some((Kind::Token, &["id"])),
        "_lastUpdated" => Some((Kind::Date, &["meta.lastUpdated"])),
        _ => PARAMETERS
            .iter()
            .find(|(t, p, _, _)| *t == resource_type && *p == name)
            .map(|(_, _, kind, paths)| (*kind, *paths)),
    }
}

#[derive(Debug, Clone)]
struct Criterion {
    kind: Kind,
    paths: &'static [&'static str],
    modifier: Option<String>,
    /// ORed values.
    values: Vec<String>,
    /// Patient-only reference parameters (`patient`) accept bare ids as `Patient/{id}`.
    target_type: Option<&'static str>,
}

/// One `Type?criteria` query (a `_typeFilter` query, or a search's own), parsed and checked once;
/// kept in job documents as its text.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub resource_type: String,
    criteria: Vec<Criterion>,
    text: String,
}

impl PartialEq for SearchQuery {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl serde::Serialize for SearchQuery {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for SearchQuery {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        SearchQuery::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl SearchQuery {
    /// Parses and checks a query; the error says what is wrong or unsupported.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (resource_type, query) = text
            .split_once('?')
            .ok_or_else(|| format!("{text:?} is not a search query (Type?param=value)"))?;
        if !is_resource_type(resource_type) {
            return Err(format!(
                "{resource_type:?} in {text:?} is not a FHIR R4 resource type"
            ));
        }
        let mut criteria = Vec::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let (name, modifier) = match key.split_once(':') {
                Some((name, modifier)) => (name.to_string(), Some(modifier.to_string())),
                None => (key.to_string(), None),
            };
            let Some((kind, paths)) = definition(resource_type, &name) else {
                let known: Vec<&str> = PARAMETERS
                    .iter()
                    .filter(|(t, ..)| *t == resource_type)
                    .map(|(_, p, ..)| *p)
                    .collect();
                return Err(format!(
                    "search parameter {name:?} is not supported for {resource_type} (supported: _id, _lastUpdated{}{})",
                    if known.is_empty() { "" } else { ", " },
                    known.join(", ")
                ));
            };
            let allowed: &[&str] = match kind {
                Kind::Token => &["missing", "not", "text"],
                Kind::String => &["missing", "exact", "contains"],
                Kind::Date | Kind::Reference => &["missing"],
            };
            if let Some(modifier) = &modifier {
                if !allowed.contains(&modifier.as_str()) {
                    return Err(format!(
                        "modifier :{modifier} is not supported on {name} (allowed: :{})",
                        allowed.join(", :")
                    ));
                }
            }
            let values: Vec<String> = value.split(',').map(str::to_string).collect();
            if values.iter().any(String::is_empty) {
                return Err(format!("{name} has an empty value in {text:?}"));
            }
            if modifier.as_deref() == Some("missing")
                && !values.iter().all(|v| v == "true" || v == "false")
            {
                return Err(format!("{name}:missing takes true or false"));
            }
            if kind == Kind::Date && modifier.is_none() {
                for value in &values {
                    DateValue::parse(value).ok_or_else(|| {
                        format!("{name}={value:?} is not a FHIR date search value")
                    })?;
                }
            }
            let target_type = (name == "patient").then_some("Patient");
            criteria.push(Criterion {
                kind,
                paths,
                modifier,
                values,
                target_type,
            });
        }
        if criteria.is_empty() {
            return Err(format!("{text:?} has no search criteria"));
        }
        Ok(Self {
            resource_type: resource_type.to_string(),
            criteria,
            text: text.to_string(),
        })
    }

    /// The query as written: `Type?criteria`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The criteria of the query (the part after `?`) that every FHIR server evaluates as this
    /// module does, which a source may send to the server as a pre-filter: token, reference and
    /// date parameters (`_id` and `_lastUpdated` among them) without a modifier. String parameters
    /// and modifiers (`:text`, `:contains`, `:exact`, ...) differ between servers and are left to the
    /// local check. Empty: nothing can be sent, the whole type must be read.
    pub fn server_exact_criteria(&self) -> String {
        let (resource_type, query) = self.text.split_once('?').unwrap_or_default();
        let mut exact = form_urlencoded::Serializer::new(String::new());
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let sendable = !name.contains(':')
                && definition(resource_type, &name).is_some_and(|(kind, _)| {
                    matches!(kind, Kind::Token | Kind::Reference | Kind::Date)
                });
            if sendable {
                exact.append_pair(&name, &value);
            }
        }
        exact.finish()
    }

    /// Whether the resource meets every criterion.
    pub fn matches(&self, resource: &Value) -> bool {
        self.criteria
            .iter()
            .all(|criterion| criterion.matches(resource))
    }
}

impl Criterion {
    fn matches(&self, resource: &Value) -> bool {
        let mut elements = Vec::new();
        for path in self.paths {
            for choice in path.split('|') {
                collect(resource, choice, &mut elements);
            }
        }
        match self.modifier.as_deref() {
            Some("missing") => (self.values[0] == "true") == elements.is_empty(),
            Some("not") => !self
                .values
                .iter()
                .any(|v| elements.iter().any(|e| token_matches(e, v, false))),
            modifier => self.values.iter().any(|value| {
                elements.iter().any(|element| match self.kind {
                    Kind::Token => token_matches(element, value, modifier == Some("text")),
                    Kind::String => string_matches(element, value, modifier),
                    Kind::Reference => reference_matches(element, value, self.target_type),
                    Kind::Date => DateValue::parse(value).is_some_and(|d| d.matches(element)),
                })
            }),
        }
    }
}

/// The values reached by a dotted path, arrays flattened.
fn collect<'a>(value: &'a Value, path: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| collect(item, path, out)),
        Value::Object(map) => {
            let (head, rest) = match path.split_once('.') {
                Some((head, rest)) => (head, Some(rest)),
                None => (path, None),
            };
            match (map.get(head), rest) {
                (Some(child), Some(rest)) => collect(child, rest, out),
                (Some(Value::Array(items)), None) => out.extend(items.iter()),
                (Some(child), None) => out.push(child),
                (None, _) => {}
            }
        }
        _ => {}
    }
}

fn token_matches(element: &Value, value: &str, text: bool) -> bool {
    if text {
        let wanted = value.to_lowercase();
        let mut texts = Vec::new();
        collect(element, "text", &mut texts);
        collect(element, "coding.display", &mut texts);
        collect(element, "display", &mut texts);
        return texts
            .iter()
            .filter_map(|t| t.as_str())
            .any(|t| t.to_lowercase().starts_with(&wanted));
    }
    let (system, code) = match value.split_once('|') {
        Some((system, code)) => (Some(system), code),
        None => (None, value),
    };
    let coding_matches = |coding: &Value, code_key: &str| {
        let code_ok = code.is_empty() || coding.get(code_key).and_then(Value::as_str) == Some(code);
        let system_ok = match system {
            None => true,
            Some("") => coding.get("system").is_none(),
            Some(system) => coding.get("system").and_then(Value::as_str) == Some(system),
        };
        code_ok && system_ok
    };
    match element {
        Value::String(s) => system.is_none() && s == code,
        Value::Bool(b) => system.is_none() && b.to_string() == code,
        Value::Object(map) if map.contains_key("coding") => {
            let mut codings = Vec::new();
            collect(element, "coding", &mut codings);
            codings.iter().any(|coding| coding_matches(coding, "code"))
        }
        Value::Object(map) if map.contains_key("value") => coding_matches(element, "value"),
        Value::Object(_) => coding_matches(element, "code"),
        _ => false,
    }
}

fn fold(text: &str) -> String {
    text.to_lowercase()
}

fn string_matches(element: &Value, value: &str, modifier: Option<&str>) -> bool {
    let mut texts = Vec::new();
    match element {
        Value::String(_) => texts.push(element),
        Value::Object(_) => {
            for key in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                collect(element, key, &mut texts);
            }
        }
        _ => {}
    }
    texts
        .iter()
        .filter_map(|t| t.as_str())
        .any(|text| match modifier {
            Some("exact") => text == value,
            Some("contains") => fold(text).contains(&fold(value)),
            _ => fold(text).starts_with(&fold(value)),
        })
}

fn reference_matches(element: &Value, value: &str, target_type: Option<&str>) -> bool {
    let Some(reference) = element.get("reference").and_then(Value::as_str) else {
        return false;
    };
    let reference = reference.split("/_history/").next().unwrap_or(reference);
    let wanted = match (value.contains('/'), target_type) {
        (false, Some(target)) => format!("{target}/{value}"),
        _ => value.to_string(),
    };
    if let Some(target) = target_type {
        let is_target = reference.starts_with(&format!("{target}/"))
            || reference.contains(&format!("/{target}/"));
        if !is_target {
            return false;
        }
    }
    if wanted.contains('/') {
        reference == wanted
            || reference.ends_with(&format!("/{wanted}"))
            || wanted.ends_with(&format!("/{reference}"))
    } else {
        reference.rsplit('/').next() == Some(wanted.as_str())
    }
}

/// A date search value: prefix and the range its precision covers, in microseconds.
#[derive(Debug, Clone, Copy)]
struct DateValue {
    prefix: Prefix,
    low: i64,
    high: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl DateValue {
    fn parse(text: &str) -> Option<Self> {
        let prefixes = [
            ("eq", Prefix::Eq),
            ("ne", Prefix::Ne),
            ("gt", Prefix::Gt),
            ("lt", Prefix::Lt),
            ("ge", Prefix::Ge),
            ("le", Prefix::Le),
            ("sa", Prefix::Sa),
            ("eb", Prefix::Eb),
            ("ap", Prefix::Ap),
        ];
        let (prefix, rest) = prefixes
            .iter()
            .find_map(|(p, prefix)| text.strip_prefix(p).map(|rest| (*prefix, rest)))
            .unwrap_or((Prefix::Eq, text));
        let (low, high) = date_range(rest)?;
        Some(Self { prefix, low, high })
    }

    fn matches(&self, element: &Value) -> bool {
        let target = match element {
            Value::String(text) => date_range(text),
            Value::Object(period) => {
                let start = period
                    .get("start")
                    .and_then(Value::as_str)
                    .and_then(date_range)
                    .map_or(i64::MIN, |r| r.0);
                let end = period
                    .get("end")
                    .and_then(Value::as_str)
                    .and_then(date_range)
                    .map_or(i64::MAX, |r| r.1);
                Some((start, end))
            }
            _ => None,
        };
        let Some((low, high)) = target else {
            return false;
        };
        let contains = self.low <= low && high <= self.high;
        match self.prefix {
            Prefix::Eq => contains,
            Prefix::Ne => !contains,
            Prefix::Gt => high > self.high,
            Prefix::Lt => low < self.low,
            Prefix::Ge => high > self.high || contains,
            Prefix::Le => low < self.low || contains,
            Prefix::Sa => low >= self.high,
            Prefix::Eb => high <= self.low,
            Prefix::Ap => low < self.high && self.low < high,
        }
    }
}

/// The instant range `[low, high)` a FHIR date, dateTime or instant covers at its precision.
fn date_range(text: &str) -> Option<(i64, i64)> {
    let day = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    let micros = |date: NaiveDate| {
        date.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros())
    };
    match text.len() {
        4 => {
            let year: i32 = text.parse().ok()?;
            Some((micros(day(year, 1, 1)?)?, micros(day(year + 1, 1, 1)?)?))
        }
        7 => {
            let (year, month) = (text.get(..4)?.parse().ok()?, text.get(5..7)?.parse().ok()?);
            let next = if month == 12 {
                day(year + 1, 1, 1)?
            } else {
                day(year, month + 1, 1)?
            };
            Some((micros(day(year, month, 1)?)?, micros(next)?))
        }
        10 => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            Some((micros(date)?, micros(date.succ_opt()?)?))
        }
        _ => {
            let instant = DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .or_else(|_| {
                    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
                })
                .ok()?;
            let seconds_precision = !text.contains('.');
            let low = instant.timestamp_micros();
            Some((low, low + if seconds_precision { 1_000_000 } else { 1_000 }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matches(query: &str, resource: Value) -> bool {
        SearchQuery::parse(query).unwrap().matches(&resource)
    }

    #[test]
    fn tokens_match_codes_systems_and_text() {
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]}});
        assert!(matches("Observation?code=8867-4", obs.clone()));
        assert!(matches(
            "Observation?code=http://loinc.org|8867-4",
            obs.clone()
        ));
        assert!(!matches(
            "Observation?code=http://snomed.info/sct|8867-4",
            obs.clone()
        ));
        assert!(matches("Observation?code=1234,8867-4", obs.clone()));
        assert!(matches("Observation?code:text=heart", obs.clone()));
        assert!(matches("Observation?status:not=amended", obs.clone()));
        assert!(!matches("Observation?status=final&code=1234", obs.clone()));
        assert!(matches("Observation?category:missing=true", obs));
        assert!(matches("Patient?active=true", json!({"active": true})));
    }

    #[test]
    fn dates_compare_by_range_and_prefix() {
        let enc =
            json!({"period": {"start": "2019-05-01T10:00:00Z", "end": "2019-05-01T11:00:00Z"}});
        assert!(matches("Encounter?date=2019", enc.clone()));
        assert!(matches("Encounter?date=2019-05-01", enc.clone()));
        assert!(matches(
            "Encounter?date=ge2019-01-01&date=lt2020-01-01",
            enc.clone()
        ));
        assert!(!matches("Encounter?date=gt2019-06", enc.clone()));
        assert!(matches("Encounter?date=sa2018", enc.clone()));
        assert!(matches(
            "Patient?birthdate=le1990-01-01",
            json!({"birthDate": "1970-03-04"})
        ));
        assert!(matches(
            "Patient?_lastUpdated=gt2020-01-01T00:00:00Z",
            json!({"meta": {"lastUpdated": "2021-01-01T00:00:00.000Z"}})
        ));
    }

    #[test]
    fn references_and_strings() {
        let obs = json!({"subject": {"reference": "Patient/p1"}});
        assert!(matches("Observation?subject=Patient/p1", obs.clone()));
        assert!(matches("Observation?patient=p1", obs.clone()));
        assert!(!matches("Observation?patient=p2", obs));
        assert!(!matches(
            "Observation?patient=g1",
            json!({"subject": {"reference": "Group/g1"}})
        ));
        let patient = json!({"name": [{"family": "Müller", "given": ["Ana"]}]});
        assert!(matches("Patient?name=mü", patient.clone()));
        assert!(matches("Patient?family:exact=Müller", patient.clone()));
        assert!(!matches("Patient?family:exact=müller", patient.clone()));
        assert!(matches("Patient?given:contains=n", patient));
        assert!(matches("Patient?_id=a,b", json!({"id": "b"})));
    }

    #[test]
    fn unsupported_or_malformed_queries_say_why() {
        for (query, mention) in [
            ("Observation", "not a search query"),
            ("Unicorn?x=1", "not a FHIR R4 resource type"),
            ("Observation?_count=10", "_count"),
            ("Observation?foo=1", "foo"),
            ("Observation?code:below=1", ":below"),
            ("Observation?date=yesterday", "date"),
            ("Observation?", "no search criteria"),
            ("Observation?code=", "empty value"),
        ] {
            let error = SearchQuery::parse(query).unwrap_err();
            assert!(error.contains(mention), "{query}: {error}");
        }
    }
}
