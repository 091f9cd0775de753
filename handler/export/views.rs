//! `$viewdefinition-export` (SQL on FHIR v2): the kickoff's `Parameters` read into an export of
//! views. Each `view` (an inline `viewResource`, with an optional `name`) is checked whole at
//! kickoff, so a view the engine cannot run is a 400 naming its element, never a failure halfway.
//! `patient`, `group` and `_since` select resources as `$export` does; `_format` (csv, ndjson or
//! their media types) and `header` say how rows are written.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::request::{invalid, RequestError};
use super::{ExportRequest, Level};
use crate::views::write::Format;
use crate::views::View;

/// The container (locally: the folder of the exports folder) a `viewReference` names a view in:
/// `ViewDefinition/{name}` is the blob `views/{name}.json`.
pub const VIEWS_CONTAINER: &str = "views";

/// Replaces each `view.viewReference` of a `$viewdefinition-export` body by the `viewResource`
/// stored in the views container, so that the body names every view inline.
pub async fn with_referenced_views(
    storage: &dyn crate::storage::ObjectStore,
    body: &[u8],
) -> Result<Vec<u8>, super::ExportError> {
    let Ok(mut parameters) = serde_json::from_slice::<Value>(body) else {
        return Ok(body.to_vec());
    };
    let mut changed = false;
    let views = parameters["parameter"].as_array_mut().into_iter().flatten();
    for (index, view) in views.filter(|p| p["name"] == "view").enumerate() {
        for part in view["part"].as_array_mut().into_iter().flatten() {
            if part["name"] != "viewReference" {
                continue;
            }
            let reference = part["valueReference"]["reference"]
                .as_str()
                .unwrap_or_default();
            let name = reference
                .strip_prefix("ViewDefinition/")
                .unwrap_or(reference);
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                && !name.starts_with('.');
            if !valid {
                let message = format!(
                    "view[{index}].viewReference {reference:?} is not ViewDefinition/{{name}}"
                );
                return Err(invalid("view", message).into());
            }
            let path = format!("{VIEWS_CONTAINER}/{name}.json");
            let Some((bytes, _)) = storage.get(&path).await? else {
                let message = format!("view[{index}].viewReference: no view {path:?} is stored");
                return Err(invalid("view", message).into());
            };
            let resource: Value = serde_json::from_slice(&bytes).map_err(|e| {
                invalid(
                    "view",
                    format!("view[{index}].viewReference: {path} is not JSON: {e}"),
                )
            })?;
            *part = json!({"name": "viewResource", "resource": resource});
            changed = true;
        }
    }
    Ok(match changed {
        true => serde_json::to_vec(&parameters).expect("JSON"),
        false => body.to_vec(),
    })
}

/// The views a job writes, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewExport {
    pub views: Vec<NamedView>,
    /// `csv`, `ndjson` or `parquet`.
    pub format: String,
    /// CSV: a header line at the top of every file.
    pub header: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tracking_id: Option<String>,
}

/// One view of a job: its output name and its ViewDefinition as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedView {
    pub name: String,
    pub definition: Value,
}

impl ViewExport {
    /// The view `index`, parsed (it was checked at kickoff).
    pub fn view(&self, index: usize) -> Result<View, crate::views::ViewError> {
        View::parse(&self.views[index].definition)
    }

    /// The format rows are written in.
    pub fn row_format(&self) -> Format {
        match self.format.as_str() {
            "ndjson" => Format::Ndjson,
            "parquet" => Format::Parquet,
            _ => Format::Csv {
                header: self.header,
            },
        }
    }
}

/// Reads a `$viewdefinition-export` body into the export it asks for.
pub fn from_parameters(body: &[u8]) -> Result<ExportRequest, RequestError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| invalid("Parameters", format!("the POST body is not JSON: {e}")))?;
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid(
            "Parameters",
            "the POST body must be a FHIR Parameters resource",
        ));
    }
    let mut views = Vec::new();
    let mut format = None;
    let mut header = true;
    let mut client_tracking_id = None;
    let mut group = None;
    let mut query = form_urlencoded::Serializer::new(String::new());
    for parameter in body["parameter"].as_array().into_iter().flatten() {
        let name = parameter["name"].as_str().unwrap_or_default();
        let text =
            || primitive(parameter).ok_or_else(|| invalid(name, format!("{name} needs a value")));
        match name {
            "view" => views.push(named_view(parameter, views.len())?),
            "_format" => format = Some(output_format(&text()?)?),
            "header" => {
                header = parameter["valueBoolean"]
                    .as_bool()
                    .ok_or_else(|| invalid("header", "header is a valueBoolean"))?
            }
            "clientTrackingId" => client_tracking_id = Some(text()?),
            "group" => {
                if group.is_some() {
                    return Err(invalid("group", "give one group"));
                }
                let reference = text()?;
                let id = reference
                    .strip_prefix("Group/")
                    .filter(|id| crate::fhir::is_valid_id(id))
                    .ok_or_else(|| {
                        invalid(
                            "group",
                            format!("group {reference:?} is not a Group/{{id}} reference"),
                        )
                    })?;
                group = Some(id.to_string());
            }
            "patient" | "_since" => {
                query.append_pair(name, &text()?);
            }
            "source" => {
                return Err(RequestError {
                    not_supported: true,
                    ..invalid(
                        "source",
                        "source is not supported: views read this service's own source",
                    )
                })
            }
            other => {
                return Err(invalid(
                    other,
                    format!("{other} is not a parameter of $viewdefinition-export"),
                ))
            }
        }
    }
    if views.is_empty() {
        return Err(invalid("view", "give at least one view"));
    }
    for (index, view) in views.iter().enumerate() {
        if views[..index]
            .iter()
            .any(|earlier| earlier.name == view.name)
        {
            return Err(invalid(
                "view",
                format!("view[{index}]: the name {:?} is given twice", view.name),
            ));
        }
    }
    let query = query.finish();
    let level = match (&group, query.contains("patient=")) {
        (Some(id), _) => Level::Group(id.clone()),
        (None, true) => Level::Patient,
        (None, false) => Level::System,
    };
    let mut request = ExportRequest::from_query(level, &query, false, true)?;
    let mut types: Vec<String> = Vec::new();
    for view in &views {
        let resource = View::parse(&view.definition).expect("checked").resource;
        if !types.contains(&resource) {
            types.push(resource);
        }
    }
    request.types = Some(types);
    request.views = Some(ViewExport {
        views,
        format: format.unwrap_or_else(|| "ndjson".into()),
        header,
        client_tracking_id,
    });
    Ok(request)
}

/// A parameter's single primitive value as text (a reference's `reference`).
fn primitive(parameter: &Value) -> Option<String> {
    let object = parameter.as_object()?;
    let (key, value) = object.iter().find(|(key, _)| key.starts_with("value"))?;
    match (key.as_str(), value) {
        ("valueReference", reference) => reference["reference"].as_str().map(str::to_string),
        (_, Value::String(text)) => Some(text.clone()),
        (_, Value::Bool(flag)) => Some(flag.to_string()),
        (_, Value::Number(number)) => Some(number.to_string()),
        _ => None,
    }
}

fn output_format(text: &str) -> Result<String, RequestError> {
    match text {
        "csv" | "text/csv" => Ok("csv".into()),
        "ndjson" | "application/x-ndjson" | "application/ndjson" | "application/fhir+ndjson" => {
            Ok("ndjson".into())
        }
        "parquet" | "application/vnd.apache.parquet" => Ok("parquet".into()),
        other => Err(invalid(
            "_format",
            format!("_format {other:?} is not csv, ndjson or parquet"),
        )),
    }
}

/// One `view` parameter: its parts `name` and `viewResource` (a `viewReference` is refused:
/// views are given inline).
fn named_view(parameter: &Value, index: usize) -> Result<NamedView, RequestError> {
    let at = format!("view[{index}]");
    let mut name = None;
    let mut definition = None;
    for part in parameter["part"].as_array().into_iter().flatten() {
        match part["name"].as_str().unwrap_or_default() {
            "name" => name = primitive(part),
            "viewResource" => definition = Some(part["resource"].clone()),
            "viewReference" => {
                return Err(invalid(
                    "view",
                    format!("{at}.viewReference was not resolved"),
                ))
            }
            other => {
                return Err(invalid(
                    "view",
                    format!("{at}: {other} is not a part of view"),
                ))
            }
        }
    }
    let definition =
        definition.ok_or_else(|| invalid("view", format!("{at}: a viewResource is required")))?;
    let view = View::parse(&definition)
        .map_err(|error| invalid("view", format!("{at}.viewResource: {error}")))?;
    let name = name
        .or(view.name.clone())
        .unwrap_or_else(|| format!("view_{}", index + 1));
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "view",
            format!("{at}.name {name:?}: letters, digits, _ and - only"),
        ));
    }
    Ok(NamedView { name, definition })
}
