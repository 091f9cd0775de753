//! `GET /metadata` (the CapabilityStatement, instantiating the Bulk Data server CapabilityStatement)
//! and `GET /.well-known/smart-configuration`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::export::version::BulkVersion;
use crate::fhir::search::{supported_parameters, Kind};

const EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

const TYPE_FILTER_NOTE: &str = "_typeFilter supports, on every type, _id and _lastUpdated, and per type the searchParam entries listed; modifiers :missing, :not, :text (token), :exact, :contains (string); date prefixes eq ne gt lt ge le sa eb ap.";

/// What of each Bulk Data IG version the server does (clients of STU1 and STU2 never send what
/// STU3 added, and see no change).
const IG_FEATURES_NOTE: &str = "Bulk Data IG: STU1/STU2 (1.0, 2.0) $export at system, Patient and Group level with _type, _since, _typeFilter, _elements, patient, includeAssociatedData refused; STU3 (3.0.0) _until, Prefer: separate-export-status (X-Export-Status), gzip-compressed downloads (Accept-Encoding: gzip), allowPartialManifests (202 with the files finished so far; manifests in pages linked by next), organizeOutputBy=Patient (resource blocks, continuesInFile). Each STU3 feature only when the client asks for it: STU1/STU2 clients see no change.";

/// What `$export-v4` (STU4, the 4.0.0 ballot) does, and the IG's Provenance rule, which this
/// server does not follow (the IG allows saying so here).
const STU4_NOTE: &str = "Bulk Data STU4 (4.0.0 ballot): $export-v4 at system, Patient and Group level, by POST of a Parameters body only; one value per parameter, repeated (a comma list is a 400, a note under handling=lenient); includeAssociatedData as valueCoding, patient as valueReference; _maximumFileSize (bytes, 1024 at the least; files never pass it or the server's own 64 MB limit, except a file holding a single larger resource); _minimumFileSize is checked and kept, and files are filled to the maximum before they roll, so each file but the last of a shard meets a minimum below it; the manifest is the BulkDataManifest logical model (manifestType, outputFormat, fileSize counting the NDJSON bytes, outcome with countSeverity, no request). Provenance: a Patient-level export includes the Provenance resources in the Patient compartment (Provenance.target names the patient), not those whose targets are only other resources of the patient; LatestProvenanceResources and RelevantProvenanceResources are refused (noted under handling=lenient). $export keeps STU3 (3.0.0) as it was.";

/// The Bulk Data export of `definition` (an IG OperationDefinition), in each version served.
fn export_operations(definition: &str) -> Value {
    let versions = [BulkVersion::Stu3, BulkVersion::Stu4];
    versions
        .iter()
        .map(|v| json!({"name": v.operation_name(), "definition": format!("{definition}|{}", v.definition_version())}))
        .collect::<Vec<_>>()
        .into()
}

/// Scopes a client may ask for: SMART v1 and v2 read scopes, for all types or one (`Patient` shown).
const SCOPES: &[&str] = &[
    "system/*.read",
    "system/*.rs",
    "system/Patient.read",
    "system/Patient.rs",
];

/// The CapabilityStatement; with access control on, `token_endpoint` is the issuer's token
/// endpoint, advertised in `rest.security` (SMART's `oauth-uris` extension).
pub fn capability_statement(base_url: &str, token_endpoint: Option<&str>) -> Vec<u8> {
    let kind_name = |kind: Kind| match kind {
        Kind::Token => "token",
        Kind::Date => "date",
        Kind::Reference => "reference",
        Kind::String => "string",
    };
    let common = [
        json!({"name": "_id", "type": "token"}),
        json!({"name": "_lastUpdated", "type": "date"}),
    ];
    let mut per_type: BTreeMap<&str, Vec<Value>> = crate::fhir::types::R4_RESOURCE_TYPES
        .iter()
        .map(|t| (*t, common.to_vec()))
        .collect();
    for (resource_type, name, kind) in supported_parameters() {
        per_type
            .entry(resource_type)
            .or_insert_with(|| common.to_vec())
            .push(json!({"name": name, "type": kind_name(kind)}));
    }
    let resources: Vec<Value> = per_type
        .into_iter()
        .map(|(resource_type, search_params)| {
            let mut resource = json!({
                "type": resource_type,
                "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "history-type"}, {"code": "history-instance"}],
                "searchParam": search_params,
                "extension": [{"url": "https://github.com/fhir-export/typeFilter", "valueString": "searchParam lists the parameters _typeFilter supports for this type"}],
            });
            match resource_type {
                "Patient" => resource["operation"] = export_operations(PATIENT_EXPORT),
                "Group" => resource["operation"] = export_operations(GROUP_EXPORT),
                _ => {}
            }
            resource
        })
        .collect();
    let mut statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": {"name": "fhir-export", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "FHIR Bulk Data $export", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": format!("{TYPE_FILTER_NOTE} {IG_FEATURES_NOTE} {STU4_NOTE}"),
            "resource": resources,
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            "operation": export_operations(EXPORT)
        }]
    });
    if let Some(token_endpoint) = token_endpoint {
        statement["rest"][0]["security"] = json!({
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": token_endpoint}]
            }],
            "description": "SMART Backend Services: client_credentials with a private_key_jwt client assertion; bearer tokens with system/*.read, system/*.rs or per-type read scopes"
        });
    }
    serde_json::to_vec(&statement).expect("JSON")
}

/// SMART discovery, for access control on: SMART Backend Services, the issuer's token endpoint,
/// `client_credentials` with `private_key_jwt`. Without access control there is nothing to
/// discover, and SMART requires `token_endpoint`: the document is not served (404).
pub fn smart_configuration(token_endpoint: &str) -> Vec<u8> {
    let configuration = json!({
        "token_endpoint": token_endpoint,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SCOPES,
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    });
    serde_json::to_vec(&configuration).expect("JSON")
}
