//! `GET /metadata`: the CapabilityStatement, instantiating the Bulk Data server CapabilityStatement.

use serde_json::json;

pub fn capability_statement(base_url: &str) -> Vec<u8> {
    let statement = json!({
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
            "operation": [
                {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
            ]
        }]
    });
    serde_json::to_vec(&statement).expect("JSON")
}
