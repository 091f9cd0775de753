//! The Bulk Data versions served side by side: STU3 (`$export`, 3.0.0, as it always answered) and
//! STU4 (`$export-v4`, the 4.0.0 ballot). One export path; the version is data that decides how a
//! kickoff's parameters are read and what shape its manifest takes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::{invalid, RequestError};

/// The IG's CodeSystem of `includeAssociatedData` values (STU4 sends them as `valueCoding`).
pub const ASSOCIATED_DATA_SYSTEM: &str =
    "http://hl7.org/fhir/uv/bulkdata/CodeSystem/include-associated-data";
/// STU4's manifest names its logical model.
pub const MANIFEST_TYPE: &str =
    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BulkVersion {
    /// `$export`: GET or POST, comma lists, the STU3 manifest (`error`, `request`).
    #[default]
    Stu3,
    /// `$export-v4`: POST of a `Parameters` body only, repeated parameters, the
    /// `BulkDataManifest` logical model (`outcome`, `manifestType`, `fileSize`).
    Stu4,
}

impl BulkVersion {
    pub fn is_stu3(&self) -> bool {
        *self == BulkVersion::Stu3
    }

    /// The version an operation of a kickoff URL (`$export`, `$export-v4`) asks for.
    pub fn of(operation: &str) -> Option<BulkVersion> {
        match operation {
            "$export" => Some(BulkVersion::Stu3),
            "$export-v4" => Some(BulkVersion::Stu4),
            _ => None,
        }
    }

    /// The operation's name in the CapabilityStatement and its URL (`$` + name).
    pub fn operation_name(&self) -> &'static str {
        match self {
            BulkVersion::Stu3 => "export",
            BulkVersion::Stu4 => "export-v4",
        }
    }

    /// The version of the IG's OperationDefinitions this operation follows.
    pub fn definition_version(&self) -> &'static str {
        match self {
            BulkVersion::Stu3 => "3.0.0",
            BulkVersion::Stu4 => "4.0.0",
        }
    }
}

/// The FHIR type each STU4 kickoff parameter is declared with (the 4.0.0 OperationDefinitions,
/// with the async pattern's file sizes, and Azure's extensions as strings).
fn declared_type(name: &str) -> Option<&'static str> {
    Some(match name {
        "_since" | "_until" => "instant",
        "patient" => "Reference",
        "includeAssociatedData" => "Coding",
        "allowPartialManifests" => "boolean",
        "_maximumFileSize" | "_minimumFileSize" => "positiveInt",
        "_outputFormat"
        | "_type"
        | "_elements"
        | "_typeFilter"
        | "organizeOutputBy"
        | "_container"
        | "_anonymizationConfig"
        | "_anonymizationConfigEtag"
        | "_anonymizationConfigCollectionReference" => "string",
        _ => return None,
    })
}

/// The `value[x]` keys that carry a parameter of `declared` type.
fn accepted_keys(declared: &str) -> &'static [&'static str] {
    match declared {
        // A dateTime with a time zone is an instant; `parse_instant` insists on one.
        "instant" => &["valueInstant", "valueDateTime"],
        "Reference" => &["valueReference"],
        "Coding" => &["valueCoding"],
        "boolean" => &["valueBoolean"],
        "positiveInt" => &["valuePositiveInt", "valueInteger"],
        _ => &["valueString", "valueCode", "valueUri"],
    }
}

/// An STU4 kickoff's `Parameters` body as `(name, value)` pairs, each value checked against its
/// declared type: a `Reference` gives its `reference`, a `Coding` its `code` (from the IG's system,
/// or any system for a custom `_` value). Parameters this server does not know keep any primitive
/// value, to be refused (or noted under lenient handling) by name as in STU3.
pub fn stu4_parameters(body: &[u8]) -> Result<Vec<(String, String)>, RequestError> {
    let parameters = parameters_of(body)?;
    let mut pairs = Vec::with_capacity(parameters.len());
    for (index, parameter) in parameters.iter().enumerate() {
        let name = parameter
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("Parameters", format!("parameter[{index}] has no name")))?;
        let values: Vec<(&String, &Value)> = parameter
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| key.starts_with("value"))
            .collect();
        let [(key, value)] = values.as_slice() else {
            return Err(invalid(
                name,
                format!("parameter[{index}] ({name}) must have exactly one value[x]"),
            ));
        };
        let text = match declared_type(name) {
            Some(declared) if !accepted_keys(declared).contains(&key.as_str()) => {
                return Err(invalid(
                    name,
                    format!(
                        "{name} is a {declared} in Bulk Data STU4: give it as {} (got {key})",
                        accepted_keys(declared).join(" or ")
                    ),
                ))
            }
            Some("Reference") => reference_of(name, value)?,
            Some("Coding") => code_of(name, value)?,
            Some("positiveInt") => match value.as_u64().filter(|n| *n > 0) {
                Some(number) => number.to_string(),
                None => return Err(invalid(name, format!("{name} must be a positive integer"))),
            },
            _ => primitive_text(name, value)?,
        };
        pairs.push((name.to_string(), text));
    }
    Ok(pairs)
}

fn parameters_of(body: &[u8]) -> Result<Vec<Value>, RequestError> {
    let refused = |message: String| invalid("Parameters", message);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(refused(
            "Bulk Data STU4 kicks off with a FHIR Parameters resource in the POST body; the body is empty".into(),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| refused(format!("the POST body is not JSON: {e}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(refused(
            "the POST body must be a FHIR Parameters resource".into(),
        ));
    }
    match value.get("parameter") {
        None => Ok(Vec::new()),
        Some(Value::Array(parameters)) => Ok(parameters.clone()),
        Some(_) => Err(refused("Parameters.parameter must be an array".into())),
    }
}

fn reference_of(name: &str, value: &Value) -> Result<String, RequestError> {
    match value.get("reference").and_then(Value::as_str) {
        Some(reference) => Ok(reference.to_string()),
        None => Err(invalid(
            name,
            format!("{name} is a valueReference without a reference"),
        )),
    }
}

fn code_of(name: &str, value: &Value) -> Result<String, RequestError> {
    let Some(code) = value.get("code").and_then(Value::as_str) else {
        return Err(invalid(
            name,
            format!("{name} is a valueCoding without a code"),
        ));
    };
    match value.get("system").and_then(Value::as_str) {
        Some(system) if system != ASSOCIATED_DATA_SYSTEM && !code.starts_with('_') => {
            Err(invalid(
                name,
                format!("{name} {code:?} is from {system}; the IG's values are from {ASSOCIATED_DATA_SYSTEM}"),
            ))
        }
        _ => Ok(code.to_string()),
    }
}

fn primitive_text(name: &str, value: &Value) -> Result<String, RequestError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Bool(flag) => Ok(flag.to_string()),
        Value::Number(number) => Ok(number.to_string()),
        _ => Err(invalid(name, format!("{name} must have a primitive value"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(parameters: Value) -> Result<Vec<(String, String)>, RequestError> {
        let body = serde_json::json!({"resourceType": "Parameters", "parameter": parameters});
        stu4_parameters(body.to_string().as_bytes())
    }

    #[test]
    fn parameters_are_read_by_their_declared_types() {
        let got = pairs(serde_json::json!([
            {"name": "_type", "valueString": "Patient"},
            {"name": "_type", "valueString": "Observation"},
            {"name": "patient", "valueReference": {"reference": "Patient/a"}},
            {"name": "includeAssociatedData", "valueCoding": {"system": ASSOCIATED_DATA_SYSTEM, "code": "LatestProvenanceResources"}},
            {"name": "includeAssociatedData", "valueCoding": {"system": "http://example.org", "code": "_history"}},
            {"name": "_maximumFileSize", "valuePositiveInt": 2048},
            {"name": "_since", "valueInstant": "2020-01-01T00:00:00Z"},
        ]))
        .unwrap();
        let names: Vec<(&str, &str)> = got.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            names,
            [
                ("_type", "Patient"),
                ("_type", "Observation"),
                ("patient", "Patient/a"),
                ("includeAssociatedData", "LatestProvenanceResources"),
                ("includeAssociatedData", "_history"),
                ("_maximumFileSize", "2048"),
                ("_since", "2020-01-01T00:00:00Z"),
            ]
        );
    }

    #[test]
    fn a_value_of_another_type_is_refused_naming_the_parameter() {
        for (parameter, named) in [
            (
                serde_json::json!({"name": "includeAssociatedData", "valueCode": "_history"}),
                "includeAssociatedData",
            ),
            (
                serde_json::json!({"name": "patient", "valueString": "Patient/a"}),
                "patient",
            ),
            (
                serde_json::json!({"name": "_maximumFileSize", "valuePositiveInt": 0}),
                "_maximumFileSize",
            ),
            (
                serde_json::json!({"name": "_maximumFileSize", "valueString": "10"}),
                "_maximumFileSize",
            ),
            (
                serde_json::json!({"name": "allowPartialManifests", "valueString": "true"}),
                "allowPartialManifests",
            ),
            (
                serde_json::json!({"name": "includeAssociatedData", "valueCoding": {"system": "http://x", "code": "LatestProvenanceResources"}}),
                "includeAssociatedData",
            ),
        ] {
            let error = pairs(serde_json::json!([parameter])).unwrap_err();
            assert_eq!(error.parameter, named, "{parameter}");
        }
        assert!(stu4_parameters(b"").is_err());
        assert!(stu4_parameters(br#"{"resourceType":"Patient"}"#).is_err());
    }
}
