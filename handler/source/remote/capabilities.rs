//! What the server declares (types, search parameters, the patient compartment), and the
//! searches a scan makes of it.

use std::collections::HashSet;

use super::*;
use super::{PatientScope, ScanRequest, SourceError};
use crate::fhir::compartment::compartment_search_params;
use crate::fhir::is_resource_type;
use crate::fhir::search::SearchQuery;

/// What the server's CapabilityStatement declares.
#[derive(Default)]
pub(super) struct Capabilities {
    /// Resource types, with the search parameters declared for each.
    pub(super) types: std::collections::BTreeMap<String, HashSet<String>>,
    /// `rest.compartment` names the patient compartment (`Patient/{id}/{type}` works).
    pub(super) patient_compartment: bool,
}

/// How a scan reaches the members of some patients' compartments.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum CompartmentAccess {
    /// `{type}?{param}=Patient/a,Patient/b`, for each compartment search parameter.
    TypeSearch,
    /// `Patient/{id}/{type}`, one search per patient.
    CompartmentRoute,
    /// The whole type, filtered here.
    WholeType,
}

impl Capabilities {
    pub(super) fn parse(statement: &serde_json::Value) -> Self {
        let mut capabilities = Capabilities::default();
        let rest = statement.pointer("/rest/0");
        for resource in rest
            .and_then(|r| r.get("resource"))
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
        {
            let Some(resource_type) = resource.get("type").and_then(|t| t.as_str()) else {
                continue;
            };
            if !is_resource_type(resource_type) {
                continue;
            }
            let params = resource
                .get("searchParam")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("name")?.as_str())
                .map(str::to_string);
            capabilities
                .types
                .entry(resource_type.to_string())
                .or_default()
                .extend(params);
        }
        capabilities.patient_compartment = rest
            .and_then(|r| r.get("compartment"))
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .any(|c| c.as_str() == Some(PATIENT_COMPARTMENT));
        capabilities
    }

    pub(super) fn compartment_access(&self, resource_type: &str) -> CompartmentAccess {
        let params = compartment_search_params(resource_type);
        let declared = self.types.get(resource_type);
        let supports = |p: &&str| *p == "_id" || declared.is_some_and(|d| d.contains(*p));
        if !params.is_empty() && params.iter().all(supports) {
            CompartmentAccess::TypeSearch
        } else if self.patient_compartment {
            CompartmentAccess::CompartmentRoute
        } else {
            CompartmentAccess::WholeType
        }
    }
}

impl Inner {
    pub(super) async fn capabilities(&self) -> Result<&Capabilities, SourceError> {
        self.capabilities
            .get_or_try_init(|| async {
                let body = self.get_body(&format!("{}/metadata", self.base)).await?;
                let statement: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                    SourceError::Remote(format!("{}/metadata is not JSON: {e}", self.base))
                })?;
                Ok(Capabilities::parse(&statement))
            })
            .await
    }

    /// The searches of a scan. `_typeFilter` queries go to the server only in the criteria it
    /// evaluates exactly as the exporter does (a superset of the match, which the exporter then
    /// filters); a query with none makes the read whole.
    pub(super) fn searches(
        &self,
        request: &ScanRequest<'_>,
        access: &CompartmentAccess,
    ) -> Vec<Search> {
        let mut queries: Vec<String> = request
            .type_filters
            .iter()
            .map(SearchQuery::server_exact_criteria)
            .collect();
        if queries.is_empty() || queries.iter().any(String::is_empty) {
            queries = vec![String::new()];
        }
        queries.sort();
        queries.dedup();
        let resource_type = request.resource_type;
        let whole = format!("{}/{resource_type}", self.base);
        let encode = |id: &str| percent_encoding::utf8_percent_encode(id, COMPONENT).to_string();
        // (target, compartment criterion) pairs.
        let targets: Vec<(String, String)> = match (request.scope, access) {
            (PatientScope::Only(patients), CompartmentAccess::TypeSearch) => {
                let mut targets = Vec::new();
                for param in compartment_search_params(resource_type) {
                    let value = |id: &str| match *param {
                        "_id" => encode(id),
                        _ => format!("Patient/{}", encode(id)),
                    };
                    let mut batch: Vec<String> = Vec::new();
                    let mut bytes = 0;
                    for id in patients {
                        let value = value(id);
                        if bytes + value.len() > MAX_IDS_BYTES && !batch.is_empty() {
                            targets.push((whole.clone(), format!("{param}={}", batch.join(","))));
                            batch.clear();
                            bytes = 0;
                        }
                        bytes += value.len() + 1;
                        batch.push(value);
                    }
                    if !batch.is_empty() {
                        targets.push((whole.clone(), format!("{param}={}", batch.join(","))));
                    }
                }
                targets
            }
            (PatientScope::Only(patients), CompartmentAccess::CompartmentRoute) => patients
                .iter()
                .map(|p| {
                    let target = format!("{}/Patient/{}/{resource_type}", self.base, encode(p));
                    (target, String::new())
                })
                .collect(),
            _ => vec![(whole, String::new())],
        };
        let mut searches = Vec::new();
        for (target, compartment) in &targets {
            for query in &queries {
                let criteria = [compartment.as_str(), query.as_str()]
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
                    .join("&");
                searches.push(Search {
                    target: target.clone(),
                    criteria,
                });
            }
        }
        searches
    }
}
