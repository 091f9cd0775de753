//! A de-identified export's configuration: read and checked at kickoff, pinned by its ETag with one
//! set of keys for the whole export, and read again by every shard, which refuses any other
//! version. The keys live in the job document until the export ends.

use std::sync::Arc;

use super::request::{invalid, quoted_etag, Anonymization};
use super::schema::Job;
pub use super::schema::PinnedConfig;
use super::{ExportError, Exports};
use crate::deid::{AnonymizationConfig, Engine, Keys};
use crate::fault::Fault;
use crate::source::SinkError;

fn refused(parameter: &str, message: impl Into<String>) -> ExportError {
    ExportError::Request(invalid(parameter, message))
}

/// An export's files never go to the configurations container (any export: its files there would
/// sit among configurations and could not be downloaded).
pub fn check_output_container(
    exports: &Exports,
    request: &super::ExportRequest,
) -> Result<(), ExportError> {
    match &request.container {
        Some(container) if *container == exports.limits.deid.container => Err(refused(
            "_container",
            format!("_container {container:?} holds anonymization configurations (EXPORT_DEID_CONTAINER); name another"),
        )),
        _ => Ok(()),
    }
}

/// Reads and checks the configuration an export names: the settings allow it, it exists, fits the
/// size limit, has the ETag asked for, and parses and validates. Returns what the job pins.
pub async fn pin(
    exports: &Exports,
    request: &super::ExportRequest,
) -> Result<Option<PinnedConfig>, ExportError> {
    let Some(anonymization) = &request.anonymization else {
        return Ok(None);
    };
    let settings = &exports.limits.deid;
    if !settings.enabled {
        return Err(refused(
            "_anonymizationConfig",
            "_anonymizationConfig: de-identified export is turned off on this server (EXPORT_DEID=off); a parameter that protects what is exported is never ignored",
        ));
    }
    if request.organized_by_patient() {
        return Err(refused(
            "organizeOutputBy",
            "organizeOutputBy cannot be combined with _anonymizationConfig: each block's header names its patient by the id as stored",
        ));
    }
    if settings.require_container && request.container.is_none() {
        return Err(refused(
            "_container",
            "a de-identified export (_anonymizationConfig) needs _container: its files go to a container of their own, never beside identified exports",
        ));
    }
    let (bytes, etag) = read(exports, anonymization).await?;
    if let Some(wanted) = &anonymization.etag {
        if *wanted != etag {
            return Err(refused(
                "_anonymizationConfigEtag",
                format!("_anonymizationConfigEtag {wanted} does not match the configuration {:?}, whose ETag is {etag}", anonymization.config),
            ));
        }
    }
    let config = AnonymizationConfig::parse(&bytes).map_err(|error| {
        refused(
            "_anonymizationConfig",
            format!(
                "_anonymizationConfig {:?} is not a usable configuration: {error}",
                anonymization.config
            ),
        )
    })?;
    Ok(Some(PinnedConfig {
        etag,
        keys: Some(Keys::for_export(&config)),
    }))
}

/// The configuration's bytes and quoted ETag, within the size limit.
async fn read(
    exports: &Exports,
    anonymization: &Anonymization,
) -> Result<(bytes::Bytes, String), ExportError> {
    let settings = &exports.limits.deid;
    let path = format!("{}/{}", settings.container, anonymization.config);
    let missing = || {
        refused(
            "_anonymizationConfig",
            format!(
                "_anonymizationConfig {:?}: there is no such configuration in the container {:?}",
                anonymization.config, settings.container
            ),
        )
    };
    let too_large = |size: u64| {
        refused(
            "_anonymizationConfig",
            format!(
                "_anonymizationConfig {:?} is {size} bytes, more than the {} a configuration may have (EXPORT_DEID_MAX_CONFIG_BYTES)",
                anonymization.config, settings.max_config_bytes
            ),
        )
    };
    // The size first, so that a huge blob is never read.
    match exports.storage.read_stream(&path).await {
        Ok(Some((size, _))) if size > settings.max_config_bytes => return Err(too_large(size)),
        Ok(Some(_)) => {}
        Ok(None) | Err(crate::storage::StorageError::InvalidPath(_)) => return Err(missing()),
        Err(error) => return Err(error.into()),
    }
    let (bytes, etag) = exports.storage.get(&path).await?.ok_or_else(missing)?;
    if bytes.len() as u64 > settings.max_config_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok((bytes, quoted_etag(&etag.0)))
}

/// The engine a shard of `job` de-identifies with: the pinned version of the configuration, with
/// the job's keys, "today" the date of the export's transaction time. A configuration changed or
/// removed since the kickoff fails the shard for good.
pub async fn engine_for(exports: &Exports, job: &Job) -> Result<Option<Arc<Engine>>, ExportError> {
    let (Some(anonymization), Some(pinned)) = (&job.request.anonymization, &job.deidentification)
    else {
        return Ok(None);
    };
    let changed = || {
        ExportError::Scan(
            SinkError::Permanent(format!(
                "the anonymization configuration {:?} changed during the export (its ETag is no longer {}); start the export again",
                anonymization.config, pinned.etag
            ))
            .into(),
        )
    };
    let (bytes, etag) = match read(exports, anonymization).await {
        Ok(read) => read,
        Err(ExportError::Request(_)) => return Err(changed()),
        Err(error) => return Err(error),
    };
    if etag != pinned.etag {
        return Err(changed());
    }
    let Some(keys) = pinned.keys.clone() else {
        return Err(changed());
    };
    // The bytes are those checked at kickoff (same ETag): a failure from here on is this
    // version's, not a change, and starting again would fail the same way.
    let unusable = |error: String| {
        ExportError::Scan(
            SinkError::Permanent(format!(
                "the anonymization configuration {:?} cannot be used: {error}",
                anonymization.config
            ))
            .into(),
        )
    };
    let config = AnonymizationConfig::parse(&bytes).map_err(|e| unusable(e.to_string()))?;
    let engine = Engine::new(&config, keys, job.transaction_time.date_naive())
        .map_err(|e| unusable(e.to_string()))?;
    Ok(Some(Arc::new(engine)))
}

/// Whether a shard's failure is one no retry mends (a resource the configuration cannot process,
/// the configuration changed): the export fails at once, as a bad request.
pub fn is_permanent(error: &ExportError) -> Option<(String, Fault)> {
    match error {
        ExportError::Scan(crate::source::ScanError::Sink(SinkError::Permanent(message))) => {
            Some((message.clone(), Fault::Invalid))
        }
        _ => None,
    }
}
