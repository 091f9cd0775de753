//! fhir-export: a FHIR Bulk Data `$export` service, as an Azure Functions custom handler and as one
//! local process on embedded defaults.
//!
//! # Layout
//! - [`app`]: the service wired together (settings, source, storage, jobs, queue); the local server;
//!   the stale-work sweep; Azure credentials.
//! - [`invoke`]: custom-handler mode: the Functions host's invocation protocol.
//! - [`package`]: the Azure Functions deployment zip.
//! - [`client`]: `handler export`, a Bulk Data client with progress.
//! - [`config`]: settings, read and checked once at start-up.
//! - [`auth`]: bearer-token checks (JWT against the issuer's keys, scopes, the export's owner).
//! - [`blocking`]: short blocking work a request waits for, on its own thread.
//! - [`crashpoint`]: the points where the crash-recovery tests kill the process.
//! - [`http`]: the warp HTTP API; errors become OperationOutcomes in one place.
//! - [`export`]: kickoff parameters, planning, the shard worker, the manifest.
//! - [`source`]: the `ResourceSource` trait; the embedded SQLite store and its importer; a FHIR
//!   server over REST.
//! - [`storage`]: the `ObjectStore` trait; the local folder and Azure Blob; the rolling NDJSON writer.
//! - [`jobs`]: job documents on storage, changed by compare-and-swap.
//! - [`queue`]: the `WorkQueue` trait; the in-process queue and worker pool.
//! - [`fhir`]: resource types, the Patient compartment, lossless JSON edits, OperationOutcome.
//! - [`generate`]: synthetic demo data; [`synth`]: N rewritten copies of a dataset.
//! - [`os`]: the operating-system tricks (page-cache hints, direct I/O, thread scheduling class,
//!   malloc arenas, the crash points' kill) behind a safe API; everything else denies `unsafe`.
#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod blocking;
pub mod client;
pub mod config;
pub mod crashpoint;
pub mod export;
pub mod fhir;
pub mod generate;
pub mod http;
pub mod invoke;
pub mod jobs;
pub mod os;
pub mod package;
pub mod queue;
pub mod source;
pub mod storage;
pub mod synth;
