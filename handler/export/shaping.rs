//! What a shard writes of each resource: `_typeFilter` decides whether (on the data as stored),
//! the anonymization configuration what is left of it, and `_elements` what of that.

use std::sync::Arc;

use crate::fhir::elements::subset;
use crate::fhir::json::Json;
use crate::source::SinkError;

/// What a shard writes of each resource: `_typeFilter` decides whether (on the data as stored),
/// the anonymization configuration what is left of it, and `_elements` what of that. Only
/// filtered, de-identified or trimmed types pay for parsing, each for what it needs; the rest flow
/// as stored bytes.
pub struct Shaping {
    resource_type: String,
    pub filters: Vec<crate::fhir::search::SearchQuery>,
    elements: Vec<String>,
    deid: Option<Arc<crate::deid::Engine>>,
}

impl Shaping {
    /// How the export shapes resources of one type.
    pub fn of(request: &super::ExportRequest, resource_type: &str) -> Shaping {
        Shaping {
            resource_type: resource_type.to_string(),
            filters: request.filters_for(resource_type),
            elements: request.elements_for(resource_type),
            deid: None,
        }
    }

    /// The same shaping, de-identifying with `engine`.
    pub fn deidentified_by(self, engine: Option<Arc<crate::deid::Engine>>) -> Shaping {
        Shaping {
            deid: engine,
            ..self
        }
    }

    /// The line a file of deletions holds for one deleted resource of the type: a transaction
    /// Bundle deleting it. In a de-identified export the id is the one the configuration's rules
    /// give the resource (`None` when they leave it none): never the identified one.
    pub fn deletion(&self, id: &str) -> Result<Option<Vec<u8>>, SinkError> {
        let id = match &self.deid {
            None => id.to_string(),
            Some(engine) => {
                let stub = serde_json::json!({"resourceType": self.resource_type, "id": id});
                let rewritten = engine
                    .deidentify(&serde_json::to_vec(&stub).expect("JSON"))
                    .map_err(|error| {
                        SinkError::Deidentify(format!(
                            "a deleted {} resource: {error}",
                            self.resource_type
                        ))
                    })?;
                let rewritten: serde_json::Value =
                    serde_json::from_slice(&rewritten).unwrap_or_default();
                match rewritten.get("id").and_then(serde_json::Value::as_str) {
                    Some(id) => id.to_string(),
                    None => return Ok(None),
                }
            }
        };
        let bundle = serde_json::json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": format!("{}/{id}", self.resource_type)}}],
        });
        Ok(Some(serde_json::to_vec(&bundle).expect("JSON")))
    }

    /// The bytes to write, or `None` when the filters leave the resource out. A resource that
    /// cannot be parsed is written as stored, unless it is to be de-identified: then it fails.
    pub fn shape<'a>(
        &self,
        resource: &'a [u8],
    ) -> Result<Option<std::borrow::Cow<'a, [u8]>>, SinkError> {
        if !self.filters.is_empty() {
            match serde_json::from_slice::<serde_json::Value>(resource) {
                Ok(value) if !self.filters.iter().any(|query| query.matches(&value)) => {
                    return Ok(None)
                }
                Ok(_) => {}
                Err(_) if self.deid.is_none() => return Ok(Some(resource.into())),
                Err(_) => {}
            }
        }
        let resource: std::borrow::Cow<'a, [u8]> = match &self.deid {
            None => resource.into(),
            Some(engine) => engine
                .deidentify(resource)
                .map_err(|error| {
                    SinkError::Deidentify(format!("a {} resource: {error}", self.resource_type))
                })?
                .into(),
        };
        if self.elements.is_empty() {
            return Ok(Some(resource));
        }
        let trimmed = match Json::parse_slice(&resource) {
            Ok(parsed) => subset(parsed, &self.resource_type, &self.elements).to_bytes(),
            Err(_) => return Ok(Some(resource)),
        };
        Ok(Some(trimmed.into()))
    }
}
