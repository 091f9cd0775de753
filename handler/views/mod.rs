//! SQL on FHIR v2 ViewDefinitions: a view read and checked once (`View::parse`: every path parsed
//! by the project's FHIRPath engine, names and unions checked, an error naming the element), then
//! run over each resource to its rows (`rows`), written as CSV or NDJSON (`write`). `suite` runs
//! the specification's conformance tests.
//!
//! Used one way: `definition` (the view), `rows` (evaluation), `write` (formats), then `files`
//! (`handler view run`) and `suite` (`handler view test`).

mod definition;
pub mod files;
pub mod parquet;
mod rows;
pub mod suite;
pub mod write;

pub use definition::{Column, Each, Select, View, ViewError};
pub use rows::{rows_of, Row};
