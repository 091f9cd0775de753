//! What a compiled rule is made of, shared by the engine and the methods: the method, what a
//! method reads besides the node, the labels a method earns, why a resource could not be
//! de-identified, and the marks of nodes a rule already decided.

use chrono::NaiveDate;

use super::config::{Keys, OtherValues, Parameters, RangeType};
use super::fhirpath::Expr;
use super::tree::InvalidInput;

/// What a method reads besides the node: the export's keys, the configuration's parameters, and
/// the date the over-89 rules count from.
pub(crate) struct MethodContext<'a> {
    pub keys: &'a Keys,
    pub parameters: &'a Parameters,
    pub today: NaiveDate,
}

/// What a rule did somewhere in a resource, one bit a label.
pub type Ops = u8;
pub const REDACT: Ops = 1;
pub const ABSTRACT: Ops = 2;
pub const CRYPTO_HASH: Ops = 4;
pub const ENCRYPT: Ops = 8;
pub const PERTURB: Ops = 16;
pub const SUBSTITUTE: Ops = 32;
pub const GENERALIZE: Ops = 64;

/// Why a resource could not be de-identified. Messages name paths and methods, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeidError {
    #[error("the resource is not valid R4: {0}")]
    InvalidInput(String),
    #[error("de-identification failed: {0}")]
    Processing(String),
}

impl From<InvalidInput> for DeidError {
    fn from(error: InvalidInput) -> Self {
        DeidError::InvalidInput(error.0)
    }
}

/// A rule's method, ready to apply.
pub(crate) enum CompiledMethod {
    Keep,
    Redact,
    DateShift,
    CryptoHash,
    Encrypt,
    Substitute(String),
    Perturb {
        span: f64,
        range: RangeType,
        round_to: u32,
    },
    Generalize {
        cases: Vec<(Expr, Expr)>,
        other_values: OtherValues,
    },
}

pub(crate) fn is_visited(visited: &[bool], id: usize) -> bool {
    visited.get(id).copied().unwrap_or(false)
}

pub(crate) fn mark_visited(visited: &mut Vec<bool>, id: usize) {
    if visited.len() <= id {
        visited.resize(id + 1, false);
    }
    visited[id] = true;
}
