//! What a shard writes of each resource: `_typeFilter` decides whether (on the data as stored),
//! the anonymization configuration what is left of it, and `_elements` what of that.

use std::sync::Arc;

use crate::fhir::elements::subset;
use crate::fhir::json::Json;
use crate::source::{SinkError, Version};

/// The `meta` extension by which Azure's FHIR service marks a soft-deleted version
/// (`KnownFhirPaths.AzureSoftDeletedExtensionUrl`, valued `soft-deleted`).
pub const SOFT_DELETED_EXTENSION: &str =
    "http://azurehealthcareapis.com/data-extensions/deleted-state";

/// Sets `meta.versionId` where the resource states none (`meta` placed after `id` when new) and,
/// for a deletion, adds the soft-delete extension to `meta.extension`.
fn with_version_meta(resource: &mut Json<'_>, version_id: &str, deleted: bool) {
    if !matches!(resource.get("meta"), Some(Json::Object(_))) {
        let position = resource.position("id").map_or(usize::MAX, |at| at + 1);
        resource.set("meta", Json::Object(Vec::new()), position);
    }
    let meta = resource.get_mut("meta").expect("set above");
    if meta.get("versionId").is_none() {
        meta.set("versionId", Json::string(version_id), 0);
    }
    if deleted {
        let marker = Json::Object(vec![
            ("url".into(), Json::string(SOFT_DELETED_EXTENSION)),
            ("valueString".into(), Json::string("soft-deleted")),
        ]);
        match meta.get_mut("extension") {
            Some(Json::Array(extensions)) => extensions.push(marker),
            _ => meta.set("extension", Json::Array(vec![marker]), 0),
        }
    }
}

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
                        SinkError::Permanent(format!(
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

    /// A version for Azure's `includeAssociatedData`, in the shape microsoft/fhir-server writes
    /// and its `$import` in incremental mode reads: `meta.versionId` set (from the store, when the
    /// stored JSON states none) and, a deletion, marked soft-deleted by Azure's `meta` extension.
    /// Then shaped as any resource; `None` when that leaves it out.
    pub fn version(&self, version: &Version) -> Result<Option<Vec<u8>>, SinkError> {
        let edited = match Json::parse_slice(&version.json) {
            Ok(mut resource) => {
                with_version_meta(&mut resource, &version.version_id, version.deleted);
                resource.to_bytes()
            }
            Err(_) => version.json.clone(),
        };
        Ok(self.shape(&edited)?.map(|bytes| bytes.into_owned()))
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
                    SinkError::Permanent(format!("a {} resource: {error}", self.resource_type))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_gets_its_version_id_and_a_deletion_the_soft_delete_mark() {
        let edit = |json: &str, deleted: bool| {
            let mut resource = Json::parse(json).unwrap();
            with_version_meta(&mut resource, "7", deleted);
            String::from_utf8(resource.to_bytes()).unwrap()
        };
        assert_eq!(
            edit(
                r#"{"resourceType":"Patient","id":"a","active":true}"#,
                false
            ),
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"7"},"active":true}"#
        );
        assert_eq!(
            edit(
                r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"3","lastUpdated":"2020-01-01T00:00:00Z"}}"#,
                false
            ),
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"3","lastUpdated":"2020-01-01T00:00:00Z"}}"#
        );
        assert_eq!(
            edit(
                r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"2","lastUpdated":"2021-01-01T00:00:00.000Z"}}"#,
                true
            ),
            format!(
                r#"{{"resourceType":"Patient","id":"a","meta":{{"extension":[{{"url":"{SOFT_DELETED_EXTENSION}","valueString":"soft-deleted"}}],"versionId":"2","lastUpdated":"2021-01-01T00:00:00.000Z"}}}}"#
            )
        );
    }
}
