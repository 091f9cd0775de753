//! A kickoff's FHIR `Parameters` body, turned into the equivalent query string.

use serde_json::Value;
use warp::http::StatusCode;

use super::ApiError;
use crate::fhir::IssueType;

/// `Parameters.parameter[{name, value[x]}]` as `name=value&...`; a `resource` or `part` is refused.
pub fn to_query(body: &[u8]) -> Result<String, ApiError> {
    let invalid =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, IssueType::Invalid, message);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the POST body is not JSON: {e}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid(
            "the POST body must be a FHIR Parameters resource".into(),
        ));
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    let parameters = match value.get("parameter") {
        None => return Ok(String::new()),
        Some(Value::Array(parameters)) => parameters,
        Some(_) => return Err(invalid("Parameters.parameter must be an array".into())),
    };
    for (index, parameter) in parameters.iter().enumerate() {
        let name = parameter
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("Parameters.parameter[{index}] has no name")))?;
        let object = parameter.as_object().expect("has a name, so is an object");
        let values: Vec<(&String, &Value)> = object
            .iter()
            .filter(|(key, _)| key.starts_with("value"))
            .collect();
        let text = match values.as_slice() {
            [(_, Value::String(text))] => text.clone(),
            [(_, Value::Bool(flag))] => flag.to_string(),
            [(_, Value::Number(number))] => number.to_string(),
            [(key, Value::Object(reference))] if key.as_str() == "valueReference" => {
                match reference.get("reference") {
                    Some(Value::String(reference)) => reference.clone(),
                    _ => {
                        return Err(invalid(format!(
                    "Parameters.parameter[{index}] ({name}) has a valueReference without reference"
                )))
                    }
                }
            }
            _ => {
                return Err(invalid(format!(
                "Parameters.parameter[{index}] ({name}) must have exactly one primitive value[x]"
            )))
            }
        };
        query.append_pair(name, &text);
    }
    Ok(query.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_a_query() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Patient,Observation"},
            {"name":"_since","valueInstant":"2020-01-01T00:00:00Z"}]}"#;
        assert_eq!(
            to_query(body).unwrap(),
            "_type=Patient%2CObservation&_since=2020-01-01T00%3A00%3A00Z"
        );
        let patients = br#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/a"}}]}"#;
        assert_eq!(to_query(patients).unwrap(), "patient=Patient%2Fa");
        assert!(to_query(br#"{"resourceType":"Patient"}"#).is_err());
        assert!(to_query(br#"{"resourceType":"Parameters","parameter":[{"name":"x"}]}"#).is_err());
        assert!(to_query(b"{nope").is_err());
    }
}
