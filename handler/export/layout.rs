//! Where job state lives in the export storage: the reserved container, and job ids.

/// The reserved container (or folder) holding job documents and manifests.
pub const JOBS_CONTAINER: &str = "fhir-export-jobs";

/// Valid job ids: 32 lowercase hex digits (a simple UUID).
pub fn is_job_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_job_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
