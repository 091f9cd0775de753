//! De-identified export (`_anonymizationConfig`, as Azure's `$export` has it): configurations in
//! the format of Microsoft's FHIR anonymizer, applied by an engine that gives the same output as
//! its version 4.1.1.

pub mod config;
pub mod engine;
pub mod methods;
pub mod rule_path;
pub mod rules;

pub use crate::fhirpath::{self, r4, tree};

pub use config::{AnonymizationConfig, ConfigError, Keys};
pub use engine::Engine;
pub use rules::DeidError;
