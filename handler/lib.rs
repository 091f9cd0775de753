//! fhir-export: a FHIR Bulk Data `$export` service, as an Azure Functions custom handler and as one
//! local process on embedded defaults.
//!
//! # Layout
//! Dependencies run one way: [`app`] → [`invoke`] → [`http`] → [`export`] → [`source`],
//! [`storage`], [`queue`] → [`fhir`].
//! - [`app`]: wiring only (settings into a source, a storage, [`export::Exports`] and the
//!   [`http::Api`]); the local server with its worker pool and upkeep timer; Azure credentials.
//!   Used by `main.rs` and the tests alone.
//! - [`invoke`]: custom-handler mode: the Functions host's invocation protocol.
//! - [`http`]: the warp HTTP API: routes parsed once, errors become OperationOutcomes in one place.
//! - [`export`]: what exports run on ([`export::Exports`]), kickoff parameters and planning, job
//!   documents changed by compare-and-swap, the shard worker, the manifest, upkeep.
//! - [`source`]: the `ResourceSource` trait (each source plans its own parts); the embedded SQLite
//!   store and its importer; a FHIR server over REST.
//! - [`storage`]: the `ObjectStore` trait; the local folder and Azure Blob; the rolling NDJSON writer.
//! - [`queue`]: the shard message, the `WorkQueue` trait, the in-process queue.
//! - [`fhir`]: resource types, the Patient compartment, search queries, lossless JSON edits,
//!   OperationOutcome.
//! - [`deid`]: de-identification as Microsoft's anonymizer (4.1.1) does it: configurations, the
//!   R4 element table, FHIRPath, the methods and the engine (→ [`fhir`]); [`export`] applies it.
//! - [`fault`]: the kind of a failure, which each error type tells of itself.
//! - [`config`]: settings, read and checked once at start-up; [`auth`]: bearer-token checks (JWT
//!   against the issuer's keys, scopes, the export's owner).
//! - [`blocking`]: short blocking work a request waits for; [`crashpoint`]: the points where the
//!   crash-recovery tests kill the process.
//! - [`package`]: the Azure Functions deployment zip; [`client`]: `handler export`, a Bulk Data
//!   client with progress; [`load`]: `handler load`, uploads to a FHIR server; [`generate`]: synthetic demo data; [`synth`]: N rewritten copies of a
//!   dataset.
//! - [`os`]: the operating-system tricks (page-cache hints, direct I/O, thread scheduling class,
//!   malloc arenas, the crash points' kill) behind a safe API; everything else denies `unsafe`.
#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod blocking;
pub mod client;
pub mod config;
pub mod crashpoint;
pub mod deid;
pub mod export;
pub mod fault;
pub mod fhir;
pub mod fhirpath;
pub mod generate;
pub mod http;
pub mod invoke;
pub mod load;
pub mod os;
pub mod package;
pub mod queue;
pub mod source;
pub mod storage;
pub mod synth;
pub mod views;
