//! FHIR knowledge the exporter needs: resource type names, the Patient compartment, lossless JSON
//! edits, OperationOutcome.

pub mod compartment;
pub mod elements;
pub mod json;
pub mod outcome;
pub mod search;
pub mod types;

pub use outcome::{IssueType, OperationOutcome};
pub use types::{is_resource_type, is_valid_id};
