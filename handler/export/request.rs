//! Kickoff parameters: parsed from the query string and headers, validated, with a clear 400 naming
//! the parameter for anything wrong.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::fhir::types::is_resource_type;
use crate::jobs::JOBS_CONTAINER;

const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Parameters this version recognises but cannot honour yet.
const NOT_YET_SUPPORTED: &[&str] = &["_typeFilter", "_elements", "includeAssociatedData"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    System,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportRequest {
    pub level: Level,
    /// `_type`; `None` exports every type.
    pub types: Option<Vec<String>>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub output_format: String,
    pub container: Option<String>,
    /// Unsupported parameters turned into manifest notes by `Prefer: handling=lenient`.
    pub notes: Vec<String>,
}

/// A rejected kickoff: HTTP 400 with a message naming the parameter or header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub parameter: String,
    pub message: String,
    pub not_supported: bool,
}

fn invalid(parameter: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        parameter: parameter.to_string(),
        message: message.into(),
        not_supported: false,
    }
}

/// The kickoff headers that matter.
#[derive(Debug, Default, Clone)]
pub struct KickoffHeaders<'a> {
    pub accept: Option<&'a str>,
    pub prefer: Option<&'a str>,
}

/// Whether `Prefer` asks for `handling=lenient`.
pub fn is_lenient(prefer: Option<&str>) -> bool {
    prefer_tokens(prefer).any(|token| token.eq_ignore_ascii_case("handling=lenient"))
}

fn prefer_tokens(prefer: Option<&str>) -> impl Iterator<Item = &str> {
    prefer.unwrap_or_default().split([',', ';']).map(str::trim)
}

pub fn check_headers(headers: &KickoffHeaders<'_>) -> Result<(), RequestError> {
    let accept_ok = headers.accept.is_some_and(|accept| {
        accept.split(',').any(|media| {
            media.split(';').next().unwrap_or_default().trim() == "application/fhir+json"
        })
    });
    if !accept_ok {
        return Err(invalid(
            "Accept",
            format!(
                "header Accept must be application/fhir+json (got {})",
                headers
                    .accept
                    .map(|a| format!("{a:?}"))
                    .unwrap_or_else(|| "none".into())
            ),
        ));
    }
    if !prefer_tokens(headers.prefer).any(|token| token.eq_ignore_ascii_case("respond-async")) {
        return Err(invalid(
            "Prefer",
            "header Prefer must include respond-async",
        ));
    }
    Ok(())
}

impl ExportRequest {
    /// Parses a kickoff's query string (`raw_query` without the `?`).
    pub fn from_query(level: Level, raw_query: &str, lenient: bool) -> Result<Self, RequestError> {
        let mut request = ExportRequest {
            level,
            types: None,
            since: None,
            until: None,
            output_format: NDJSON_FORMATS[0].to_string(),
            container: None,
            notes: Vec::new(),
        };
        let mut seen_until = None::<String>;
        for (name, value) in form_urlencoded::parse(raw_query.as_bytes()) {
            let (name, value) = (name.as_ref(), value.trim());
            if value.is_empty() {
                return Err(invalid(name, format!("parameter {name} has no value")));
            }
            match name {
                "_outputFormat" => {
                    if !NDJSON_FORMATS.contains(&value) {
                        return Err(RequestError {
                            not_supported: true,
                            ..invalid(name, format!("_outputFormat {value:?} is not supported; use one of {}", NDJSON_FORMATS.join(", ")))
                        });
                    }
                    request.output_format = NDJSON_FORMATS[0].to_string();
                }
                "_since" => request.since = Some(parse_instant(name, value)?),
                "_until" | "_till" => {
                    if let Some(first) = seen_until.replace(name.to_string()) {
                        return Err(invalid(name, format!("give the end of the window once (_until, alias _till); got {first} and {name}")));
                    }
                    request.until = Some(parse_instant(name, value)?);
                }
                "_type" => {
                    let types = request.types.get_or_insert_with(Vec::new);
                    for resource_type in value.split(',').map(str::trim) {
                        if !is_resource_type(resource_type) {
                            return Err(invalid(name, format!("_type {resource_type:?} is not a FHIR R4 resource type")));
                        }
                        if !types.iter().any(|t| t == resource_type) {
                            types.push(resource_type.to_string());
                        }
                    }
                }
                "_container" => {
                    if request.container.is_some() {
                        return Err(invalid(name, "_container is given more than once"));
                    }
                    check_container_name(value)?;
                    request.container = Some(value.to_string());
                }
                "patient" => {
                    return Err(invalid(name, "parameter patient is only allowed on Patient and Group level exports (by POST)"))
                }
                other => {
                    let message = if NOT_YET_SUPPORTED.contains(&other) {
                        format!("parameter {other} is not supported by this server yet")
                    } else {
                        format!("parameter {other} is not a Bulk Data export parameter")
                    };
                    if lenient {
                        request.notes.push(format!("{message}; ignored (handling=lenient)"));
                    } else {
                        return Err(RequestError { not_supported: true, ..invalid(other, message) });
                    }
                }
            }
        }
        if let (Some(since), Some(until)) = (request.since, request.until) {
            if since >= until {
                return Err(invalid("_until", "_until must be later than _since"));
            }
        }
        if request.since.is_some_and(|since| since > Utc::now()) {
            return Err(invalid("_since", "_since is in the future"));
        }
        Ok(request)
    }
}

/// A FHIR `instant`: date, time and zone (`2020-01-01T00:00:00Z`).
fn parse_instant(parameter: &str, value: &str) -> Result<DateTime<Utc>, RequestError> {
    DateTime::parse_from_rfc3339(value).map(|t| t.with_timezone(&Utc)).map_err(|_| {
        invalid(
            parameter,
            format!("{parameter} {value:?} is not a FHIR instant (e.g. 2020-01-01T00:00:00Z, with a time zone)"),
        )
    })
}

/// Azure container naming: 3 to 63 of lowercase letters, digits and single hyphens, starting and
/// ending with a letter or digit; the job-state container is reserved.
pub fn check_container_name(name: &str) -> Result<(), RequestError> {
    let bytes = name.as_bytes();
    let well_formed = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !name.contains("--");
    if !well_formed {
        return Err(invalid(
            "_container",
            format!("_container {name:?} is not a valid container name (3-63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit)"),
        ));
    }
    if name == JOBS_CONTAINER {
        return Err(invalid(
            "_container",
            format!("_container {name:?} is reserved for job state"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<ExportRequest, RequestError> {
        ExportRequest::from_query(Level::System, query, false)
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
            ("patient=Patient/1", "patient"),
            ("_typeFilter=Patient%3Factive%3Dtrue", "_typeFilter"),
            ("_bogus=1", "_bogus"),
            ("_type=", "_type"),
            (
                "_since=2020-01-02T00:00:00Z&_until=2020-01-01T00:00:00Z",
                "_until",
            ),
            ("_since=2999-01-01T00:00:00Z", "_since"),
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
        let request =
            ExportRequest::from_query(Level::System, "_elements=id&_type=Patient", true).unwrap();
        assert_eq!(request.notes.len(), 1);
        assert!(request.notes[0].contains("_elements"));
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
}
