//! De-identified export (`_anonymizationConfig`, as Azure's `$export` has it): configurations in
//! the format of Microsoft's FHIR anonymizer (version 4.1.1). So far the configuration's loading
//! and checks; the kickoff still refuses the parameters until the engine that applies them exists.

pub mod config;

pub use config::{AnonymizationConfig, ConfigError};
