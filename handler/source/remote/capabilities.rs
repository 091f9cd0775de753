//! What the server declares (types, search parameters, the patient compartment), and the
//! searches a scan makes of it.

use std::collections::HashSet;

use crate::fhir::compartment::compartment_search_params;
use crate::fhir::is_resource_type;

pub(super) const PATIENT_COMPARTMENT: &str = "http://hl7.org/fhir/CompartmentDefinition/patient";

/// What the server's CapabilityStatement declares.
#[derive(Default)]
pub(super) struct Capabilities {
    /// Resource types, with the search parameters declared for each.
    pub(super) types: std::collections::BTreeMap<String, HashSet<String>>,
    /// `rest.compartment` names the patient compartment (`Patient/{id}/{type}` works).
    pub(super) patient_compartment: bool,
    /// The types whose `interaction` includes `history-type` (`[type]/_history`).
    pub(super) history_types: HashSet<String>,
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
    /// The types declared among those `wanted`, by name.
    pub(super) fn declared(&self, wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.types.keys().filter(|t| wanted(t)).cloned().collect()
    }

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
            let has_history = resource
                .get("interaction")
                .and_then(|i| i.as_array())
                .into_iter()
                .flatten()
                .any(|i| i.get("code").and_then(|c| c.as_str()) == Some("history-type"));
            if has_history {
                capabilities.history_types.insert(resource_type.to_string());
            }
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
