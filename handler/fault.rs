//! The kind of a failure, said by each error type of its own variants, so that the HTTP layer maps
//! kinds to statuses in one small table without knowing any other module's variants.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Fault {
    /// The request is wrong (400).
    Invalid,
    /// What the request names does not exist (404).
    NotFound,
    /// Too much work at once; try again soon (429).
    Busy,
    /// The FHIR source failed or refused (502).
    Upstream,
    /// A dependency (the export storage) cannot be reached or refuses access (503).
    Unavailable,
    /// The export storage is full; space comes back on an operator's time (503).
    Full,
    /// A fault of this service (500).
    Internal,
}
