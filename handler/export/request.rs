//! Kickoff parameters: parsed from the query string and headers, validated, with a clear 400 naming
//! the parameter for anything wrong.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::layout::JOBS_CONTAINER;
pub use super::version::BulkVersion;
use crate::fhir::compartment::in_patient_compartment_definition;
use crate::fhir::search::SearchQuery;
use crate::fhir::types::is_resource_type;
use crate::source::VersionKinds;

/// The smallest `_maximumFileSize` taken: a smaller one would write a file for every resource.
const MIN_MAXIMUM_FILE_BYTES: u64 = 1024;

const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// `includeAssociatedData` values this server knows; `_history` and `_deleted` (Azure's) are
/// produced, the Provenance ones are not.
const ASSOCIATED_DATA: &[&str] = &[
    "LatestProvenanceResources",
    "RelevantProvenanceResources",
    "_history",
    "_deleted",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    System,
    Patient,
    Group(String),
}

impl Level {
    pub fn is_patient_scoped(&self) -> bool {
        !matches!(self, Level::System)
    }
}

/// One `_elements` entry: an element of every type, or of one type (`Patient.name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ElementSpec {
    pub resource_type: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportRequest {
    pub level: Level,
    /// `_type`; `None` exports every type.
    pub types: Option<Vec<String>>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub container: Option<String>,
    /// `_typeFilter` queries (`Type?criteria`), checked at kickoff.
    pub type_filters: Vec<SearchQuery>,
    pub elements: Vec<ElementSpec>,
    /// `patient` ids (POST, Patient and Group level).
    pub patients: Option<Vec<String>>,
    /// Unsupported parameters turned into manifest notes by `Prefer: handling=lenient`.
    pub notes: Vec<String>,
    /// `Prefer: separate-export-status` (Bulk Data 3.0.0): a status poll answers 200 when the
    /// poll itself succeeds, and the export's own status in `X-Export-Status`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub separate_export_status: bool,
    /// `allowPartialManifests=true` (Bulk Data 3.0.0): status polls answer with the files done so
    /// far, and manifests come in pages linked by `next`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_partial_manifests: bool,
    /// `includeAssociatedData` `_history` and `_deleted` (Azure's): the versions beside each
    /// resource's version at `transactionTime`.
    #[serde(default, skip_serializing_if = "VersionKinds::is_none")]
    pub versions: VersionKinds,
    /// `$viewdefinition-export`: the views written, in place of the resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<super::views::ViewExport>,
    /// `organizeOutputBy` (Bulk Data 3.0.0; `Patient` only): files of resource blocks, one per
    /// patient, instead of files of one type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organize_output_by: Option<String>,
    /// `_anonymizationConfig`: a de-identified export (the configuration is read, checked and
    /// pinned at kickoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymization: Option<Anonymization>,
    /// The Bulk Data version kicked off (`$export` STU3, `$export-v4` STU4): how the manifest is
    /// shaped.
    #[serde(default, skip_serializing_if = "BulkVersion::is_stu3")]
    pub version: BulkVersion,
    /// `_maximumFileSize` (STU4): files are rolled before they pass it (or the server's own
    /// limit, when that is lower); only a single larger resource makes a larger file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
    /// `_minimumFileSize` (STU4), checked and kept: files are filled to the maximum before they
    /// roll, so every file but the last of a shard's type meets any minimum below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_file_bytes: Option<u64>,
}

/// The anonymization configuration an export names: a blob of the configurations container, and
/// the ETag it must have (quoted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Anonymization {
    pub config: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// A rejected kickoff: HTTP 400 with a message naming the parameter or header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub parameter: String,
    pub message: String,
    pub not_supported: bool,
}

pub(super) fn invalid(parameter: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        parameter: parameter.to_string(),
        message: message.into(),
        not_supported: false,
    }
}

/// The kickoff headers that matter.
#[derive(Debug, Default, Clone)]
pub struct KickoffHeaders<'a> {
    pub accept: Option<&'a str>,
    pub prefer: Option<&'a str>,
}

/// Whether `Prefer` asks for `separate-export-status` (Bulk Data 3.0.0).
pub fn wants_separate_status(prefer: Option<&str>) -> bool {
    prefer_tokens(prefer).any(|token| token.eq_ignore_ascii_case("separate-export-status"))
}

/// Whether `Prefer` asks for `handling=lenient`.
pub fn is_lenient(prefer: Option<&str>) -> bool {
    prefer_tokens(prefer).any(|token| token.eq_ignore_ascii_case("handling=lenient"))
}

fn prefer_tokens(prefer: Option<&str>) -> impl Iterator<Item = &str> {
    prefer.unwrap_or_default().split([',', ';']).map(str::trim)
}

pub fn check_headers(headers: &KickoffHeaders<'_>) -> Result<(), RequestError> {
    let accept_ok = headers.accept.is_some_and(|accept| {
        accept.split(',').any(|media| {
            media.split(';').next().unwrap_or_default().trim() == "application/fhir+json"
        })
    });
    if !accept_ok {
        return Err(invalid(
            "Accept",
            format!(
                "header Accept must be application/fhir+json (got {})",
                headers
                    .accept
                    .map(|a| format!("{a:?}"))
                    .unwrap_or_else(|| "none".into())
            ),
        ));
    }
    if !prefer_tokens(headers.prefer).any(|token| token.eq_ignore_ascii_case("respond-async")) {
        return Err(invalid(
            "Prefer",
            "header Prefer must include respond-async",
        ));
    }
    Ok(())
}

/// A de-identification parameter this server does not take: refused, never ignored (not even
/// with `handling=lenient`): it protects what is exported.
fn privacy_refused(name: &str, why: &str) -> RequestError {
    invalid(
        name,
        format!("{name}: {why}; a parameter that protects what is exported is never ignored (not even with handling=lenient)"),
    )
}

/// A blob name in the configurations container: a storage path (`/`-separated segments, none
/// empty, `.` or `..`) of at most 1,024 characters, Azure's limit.
fn check_config_name(name: &str, value: &str) -> Result<(), RequestError> {
    let ok = value.len() <= 1024 && crate::storage::validate_path(value).is_ok();
    match ok {
        true => Ok(()),
        false => Err(invalid(
            name,
            format!("{name} {value:?} is not a blob name in the configurations container (segments separated by '/', none empty, '.' or '..')"),
        )),
    }
}

fn check_output_format(value: &str) -> Result<(), RequestError> {
    if NDJSON_FORMATS.contains(&value) {
        return Ok(());
    }
    Err(RequestError {
        not_supported: true,
        ..invalid(
            "_outputFormat",
            format!(
                "_outputFormat {value:?} is not supported; use one of {}",
                NDJSON_FORMATS.join(", ")
            ),
        )
    })
}

impl ExportRequest {
    /// Whether `_type` lets the export read `resource_type` (no `_type`: every type).
    pub fn names_type(&self, resource_type: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == resource_type))
    }

    /// Parses an STU3 kickoff's parameters (`raw_query`: a query string without the `?`; a
    /// POST's Parameters body arrives converted to one, with `via_post`).
    pub fn from_query(
        level: Level,
        raw_query: &str,
        lenient: bool,
        via_post: bool,
    ) -> Result<Self, RequestError> {
        let pairs = form_urlencoded::parse(raw_query.as_bytes()).into_owned();
        Self::from_pairs(level, pairs, lenient, via_post, BulkVersion::Stu3)
    }

    /// Parses an STU4 (`$export-v4`) kickoff's `Parameters` body.
    pub fn from_stu4_parameters(
        level: Level,
        body: &[u8],
        lenient: bool,
    ) -> Result<Self, RequestError> {
        let pairs = super::version::stu4_parameters(body)?;
        Self::from_pairs(level, pairs, lenient, true, BulkVersion::Stu4)
    }

    fn from_pairs(
        level: Level,
        pairs: impl IntoIterator<Item = (String, String)>,
        lenient: bool,
        via_post: bool,
        version: BulkVersion,
    ) -> Result<Self, RequestError> {
        let mut request = ExportRequest::at(level);
        request.version = version;
        let mut anonymization_etag = None::<String>;
        let mut seen_until = None::<String>;
        let mut seen_once = Vec::<&'static str>::new();
        let mut filter_bytes = 0;
        for (name, value) in pairs {
            let (name, value) = (name.as_str(), value.trim());
            if version == BulkVersion::Stu4 {
                request.refuse_comma_list(name, value, lenient)?;
            }
            if name.is_empty() {
                return Err(invalid(
                    "query",
                    format!("a parameter has no name (={value})"),
                ));
            }
            if value.is_empty() {
                return Err(invalid(name, format!("parameter {name} has no value")));
            }
            if is_privacy_parameter(name) {
                request.add_anonymization(name, value, &mut seen_once, &mut anonymization_etag)?;
                continue;
            }
            match name {
                "_outputFormat" => check_output_format(value)?,
                "_since" => {
                    if request.since.is_some() {
                        return Err(invalid(name, "give _since once"));
                    }
                    request.since = Some(parse_instant(name, value)?);
                }
                "_until" | "_till" => {
                    if let Some(first) = seen_until.replace(name.to_string()) {
                        return Err(invalid(name, format!("give the end of the window once (_until, alias _till); got {first} and {name}")));
                    }
                    request.until = Some(parse_instant(name, value)?);
                }
                "_type" => request.add_types(value)?,
                "_typeFilter" => request.add_type_filters(value, &mut filter_bytes, lenient)?,
                "_elements" => {
                    for element in value.split(',').map(str::trim) {
                        request.elements.push(parse_element(element)?);
                    }
                }
                "_container" => {
                    if request.container.is_some() {
                        return Err(invalid(name, "_container is given more than once"));
                    }
                    check_container_name(value)?;
                    request.container = Some(value.to_string());
                }
                "patient" => request.add_patients(value, via_post)?,
                "includeAssociatedData" => request.add_associated_data(value, lenient)?,
                "allowPartialManifests" => {
                    once(&mut seen_once, "allowPartialManifests")?;
                    request.allow_partial_manifests = match value {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(invalid(
                                name,
                                format!("{name} {other:?} is not true or false"),
                            ))
                        }
                    };
                }
                "organizeOutputBy" => {
                    once(&mut seen_once, "organizeOutputBy")?;
                    request.organize_output_by(value, lenient)?;
                }
                "_maximumFileSize" | "_minimumFileSize" if version == BulkVersion::Stu4 => {
                    request.set_file_size(name, value, &mut seen_once)?;
                }
                other => {
                    let message = format!("parameter {other} is not a Bulk Data export parameter");
                    let error = RequestError {
                        not_supported: true,
                        ..invalid(other, message)
                    };
                    request.refuse(error, lenient)?;
                }
            }
        }
        request.pin_anonymization_etag(anonymization_etag)?;
        request.check_window()?;
        request.check_file_sizes()?;
        request.check_associated_data()?;
        if request.level.is_patient_scoped() || request.organize_output_by.is_some() {
            request.keep_patient_level_types(lenient)?;
        }
        if request.organize_output_by.is_some() && request.level == Level::System {
            request.notes.push(ORGANIZED_SYSTEM_NOTE.to_string());
        }
        Ok(request)
    }

    /// A request at `level` with no parameter given yet.
    fn at(level: Level) -> ExportRequest {
        ExportRequest {
            level,
            types: None,
            since: None,
            until: None,
            container: None,
            type_filters: Vec::new(),
            elements: Vec::new(),
            patients: None,
            notes: Vec::new(),
            separate_export_status: false,
            allow_partial_manifests: false,
            organize_output_by: None,
            anonymization: None,
            versions: VersionKinds::default(),
            views: None,
            version: BulkVersion::Stu3,
            max_file_bytes: None,
            min_file_bytes: None,
        }
    }

    /// The size files are rolled at: the client's `_maximumFileSize` when it is below the
    /// server's `limit`.
    pub fn file_max_bytes(&self, limit: u64) -> u64 {
        self.max_file_bytes.map_or(limit, |max| max.min(limit))
    }

    /// STU4 repeats a parameter for each value: "A Data Consumer SHALL NOT represent multiple
    /// values by comma-delimiting them within a single parameter value." A comma list is refused;
    /// under lenient handling it is read as STU3 reads it, with a note.
    fn refuse_comma_list(
        &mut self,
        name: &str,
        value: &str,
        lenient: bool,
    ) -> Result<(), RequestError> {
        let is_list = match name {
            "_type" | "_elements" | "includeAssociatedData" | "patient" => value.contains(','),
            "_typeFilter" => split_queries(value).len() > 1,
            _ => false,
        };
        if !is_list {
            return Ok(());
        }
        let message = format!(
            "{name} {value:?} is a comma-separated list; Bulk Data STU4 ($export-v4) takes one value per parameter, repeated"
        );
        if !lenient {
            return Err(invalid(name, message));
        }
        self.notes
            .push(format!("{message}; read as a list (handling=lenient)"));
        Ok(())
    }

    /// `_maximumFileSize` or `_minimumFileSize`, in bytes, given once.
    fn set_file_size(
        &mut self,
        name: &str,
        value: &str,
        seen_once: &mut Vec<&'static str>,
    ) -> Result<(), RequestError> {
        let bytes = value
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(name, format!("{name} {value:?} is not a positive integer")))?;
        if name == "_maximumFileSize" {
            once(seen_once, "_maximumFileSize")?;
            if bytes < MIN_MAXIMUM_FILE_BYTES {
                return Err(invalid(
                    name,
                    format!("_maximumFileSize {bytes} is below the {MIN_MAXIMUM_FILE_BYTES} bytes this server writes a file with at the least"),
                ));
            }
            self.max_file_bytes = Some(bytes);
        } else {
            once(seen_once, "_minimumFileSize")?;
            self.min_file_bytes = Some(bytes);
        }
        Ok(())
    }

    /// "[_maximumFileSize] SHALL be greater than `_minimumFileSize` if both are specified."
    fn check_file_sizes(&self) -> Result<(), RequestError> {
        match (self.min_file_bytes, self.max_file_bytes) {
            (Some(min), Some(max)) if max <= min => Err(invalid(
                "_maximumFileSize",
                format!("_maximumFileSize {max} must be greater than _minimumFileSize {min}"),
            )),
            _ => Ok(()),
        }
    }

    /// A de-identification parameter (or one spelled nearly so, which is refused: a parameter that
    /// protects privacy is never ignored).
    fn add_anonymization(
        &mut self,
        name: &str,
        value: &str,
        seen_once: &mut Vec<&'static str>,
        etag: &mut Option<String>,
    ) -> Result<(), RequestError> {
        match name {
            "_anonymizationConfig" => {
                once(seen_once, "_anonymizationConfig")?;
                check_config_name(name, value)?;
                self.anonymization = Some(Anonymization {
                    config: value.to_string(),
                    etag: None,
                });
            }
            "_anonymizationConfigEtag" => {
                once(seen_once, "_anonymizationConfigEtag")?;
                if value.chars().any(|c| c.is_control()) || value.len() > 256 {
                    return Err(invalid(name, format!("{name} is not an ETag")));
                }
                *etag = Some(quoted_etag(value));
            }
            "_anonymizationConfigCollectionReference" => {
                return Err(privacy_refused(
                    name,
                    "configurations from an Azure Container Registry are not supported; put the configuration in the configurations container and name it with _anonymizationConfig",
                ))
            }
            _ => {
                return Err(privacy_refused(
                    name,
                    "this is not a de-identification parameter (they are _anonymizationConfig, _anonymizationConfigEtag and _anonymizationConfigCollectionReference, spelled so)",
                ))
            }
        }
        Ok(())
    }

    /// `_anonymizationConfigEtag` goes with `_anonymizationConfig`, never alone.
    fn pin_anonymization_etag(&mut self, etag: Option<String>) -> Result<(), RequestError> {
        match (&mut self.anonymization, etag) {
            (Some(anonymization), etag) => anonymization.etag = etag,
            (None, Some(_)) => {
                return Err(invalid(
                    "_anonymizationConfig",
                    "_anonymizationConfigEtag names the version of a configuration: give the configuration too (_anonymizationConfig)",
                ))
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// `organizeOutputBy`: `Patient`, or (lenient) a note that the value was ignored.
    fn organize_output_by(&mut self, value: &str, lenient: bool) -> Result<(), RequestError> {
        if value == "Patient" {
            self.organize_output_by = Some(value.to_string());
            return Ok(());
        }
        let message = match is_resource_type(value) {
            true => format!("organizeOutputBy {value:?} is not supported: this server organizes output by Patient only"),
            false => format!("organizeOutputBy {value:?} is not a FHIR R4 resource type; this server organizes output by Patient only"),
        };
        let error = RequestError {
            not_supported: true,
            ..invalid("organizeOutputBy", message)
        };
        self.refuse(error, lenient)
    }

    /// Whether the output is organized in resource blocks by patient.
    pub fn organized_by_patient(&self) -> bool {
        self.organize_output_by.as_deref() == Some("Patient")
    }

    fn check_window(&self) -> Result<(), RequestError> {
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since >= until {
                return Err(invalid("_until", "_until must be later than _since"));
            }
        }
        if self.since.is_some_and(|since| since > Utc::now()) {
            return Err(invalid("_since", "_since is in the future"));
        }
        Ok(())
    }

    /// A parameter this server does not support: an error, or under lenient handling a note.
    fn refuse(&mut self, error: RequestError, lenient: bool) -> Result<(), RequestError> {
        if !(lenient && error.not_supported) {
            return Err(error);
        }
        self.notes
            .push(format!("{}; ignored (handling=lenient)", error.message));
        Ok(())
    }

    fn add_types(&mut self, value: &str) -> Result<(), RequestError> {
        let types = self.types.get_or_insert_with(Vec::new);
        for resource_type in value.split(',').map(str::trim) {
            if !is_resource_type(resource_type) {
                return Err(invalid(
                    "_type",
                    format!("_type {resource_type:?} is not a FHIR R4 resource type"),
                ));
            }
            if !types.iter().any(|t| t == resource_type) {
                types.push(resource_type.to_string());
            }
        }
        Ok(())
    }

    /// Each query parsed and checked once, here; `filter_bytes` counts all `_typeFilter` values.
    fn add_type_filters(
        &mut self,
        value: &str,
        filter_bytes: &mut usize,
        lenient: bool,
    ) -> Result<(), RequestError> {
        let name = "_typeFilter";
        *filter_bytes += value.len();
        if *filter_bytes > MAX_TYPE_FILTER_BYTES {
            return Err(invalid(
                name,
                format!("_typeFilter is longer than {MAX_TYPE_FILTER_BYTES} bytes in all"),
            ));
        }
        for query in split_queries(value) {
            if self.type_filters.len() >= MAX_TYPE_FILTERS {
                return Err(invalid(
                    name,
                    format!("more than {MAX_TYPE_FILTERS} _typeFilter queries"),
                ));
            }
            match SearchQuery::parse(query) {
                Ok(query) => self.type_filters.push(query),
                Err(message) => {
                    let error = RequestError {
                        not_supported: message.contains("not supported"),
                        ..invalid(name, format!("_typeFilter: {message}"))
                    };
                    self.refuse(error, lenient)?
                }
            }
        }
        Ok(())
    }

    fn add_patients(&mut self, value: &str, via_post: bool) -> Result<(), RequestError> {
        let name = "patient";
        if !self.level.is_patient_scoped() {
            return Err(invalid(
                name,
                "parameter patient is only allowed on Patient and Group level exports",
            ));
        }
        if !via_post {
            return Err(invalid(
                name,
                "parameter patient is only accepted in a POST kickoff's Parameters body",
            ));
        }
        let patients = self.patients.get_or_insert_with(Vec::new);
        for reference in value.split(',').map(str::trim) {
            let id = reference
                .strip_prefix("Patient/")
                .filter(|id| crate::fhir::is_valid_id(id))
                .ok_or_else(|| {
                    invalid(
                        name,
                        format!("patient {reference:?} is not a Patient/{{id}} reference"),
                    )
                })?;
            if !patients.iter().any(|p| p == id) {
                patients.push(id.to_string());
            }
        }
        Ok(())
    }

    /// Azure's `_history` and `_deleted`; any other value is refused (lenient: noted).
    fn add_associated_data(&mut self, value: &str, lenient: bool) -> Result<(), RequestError> {
        for item in value.split(',').map(str::trim) {
            match item {
                "_history" => {
                    self.versions.history = true;
                    continue;
                }
                "_deleted" => {
                    self.versions.deleted = true;
                    continue;
                }
                _ => {}
            }
            let message = if ASSOCIATED_DATA.contains(&item) || item.starts_with('_') {
                format!("includeAssociatedData {item:?} is not supported by this server")
            } else {
                format!(
                    "includeAssociatedData {item:?} is not a known value ({})",
                    ASSOCIATED_DATA.join(", ")
                )
            };
            let error = RequestError {
                not_supported: true,
                ..invalid("includeAssociatedData", message)
            };
            self.refuse(error, lenient)?;
        }
        Ok(())
    }

    /// `_history` and `_deleted` export a whole store's versions, as Azure does: at system level
    /// only, and never with `_typeFilter` (which Azure refuses with them too).
    fn check_associated_data(&self) -> Result<(), RequestError> {
        if !self.versions.any() {
            return Ok(());
        }
        if self.level.is_patient_scoped() {
            return Err(invalid(
                "includeAssociatedData",
                "includeAssociatedData (_history, _deleted) is supported at system level ([base]/$export) only",
            ));
        }
        if !self.type_filters.is_empty() {
            return Err(invalid(
                "_typeFilter",
                "_typeFilter cannot be used with an export of historical or soft-deleted resources (includeAssociatedData _history or _deleted)",
            ));
        }
        if self.organize_output_by.is_some() {
            return Err(invalid(
                "organizeOutputBy",
                "organizeOutputBy cannot be used with includeAssociatedData (_history, _deleted)",
            ));
        }
        Ok(())
    }

    /// At Patient and Group level, `_type` keeps the Patient compartment's types and notes the others
    /// in the manifest; with none of its types in scope the kickoff is refused (lenient: an empty
    /// export with a note).
    fn keep_patient_level_types(&mut self, lenient: bool) -> Result<(), RequestError> {
        let Some(types) = self.types.as_mut() else {
            return Ok(());
        };
        let (kept, out_of_scope): (Vec<String>, Vec<String>) =
            types.drain(..).partition(|t| is_patient_level_type(t));
        *types = kept;
        if out_of_scope.is_empty() {
            return Ok(());
        }
        let message = format!(
            "_type {} not in the Patient compartment, so not part of an export of patients' compartments (Patient or Group level, or organizeOutputBy=Patient)",
            match out_of_scope.as_slice() {
                [one] => format!("{one} is"),
                many => format!("{} are", many.join(", ")),
            }
        );
        if types.is_empty() && !lenient {
            return Err(invalid("_type", message));
        }
        self.notes.push(format!("{message}; not exported"));
        Ok(())
    }

    /// The `_typeFilter` queries of one type (empty: no filter).
    pub fn filters_for(&self, resource_type: &str) -> Vec<SearchQuery> {
        self.type_filters
            .iter()
            .filter(|q| q.resource_type == resource_type)
            .cloned()
            .collect()
    }

    /// The `_elements` that apply to one type (empty: the whole resource).
    pub fn elements_for(&self, resource_type: &str) -> Vec<String> {
        self.elements
            .iter()
            .filter(|e| {
                e.resource_type
                    .as_deref()
                    .is_none_or(|t| t == resource_type)
            })
            .map(|e| e.name.clone())
            .collect()
    }
}

/// The note a system-level export organized by patient carries.
const ORGANIZED_SYSTEM_NOTE: &str = "organizeOutputBy=Patient: the output is made of resource blocks, one per patient, so resources in no patient's compartment (Organization, Practitioner, Medication, ...) are not exported; export them without organizeOutputBy";

/// Refuses a parameter given a second time.
fn once(seen: &mut Vec<&'static str>, name: &'static str) -> Result<(), RequestError> {
    if seen.contains(&name) {
        return Err(invalid(name, format!("give {name} once")));
    }
    seen.push(name);
    Ok(())
}

/// An ETag as compared: quoted (`"0x8D"`; a weak `W/"x"` as given).
pub fn quoted_etag(value: &str) -> String {
    let value = value.trim();
    match value.starts_with('"') || value.starts_with("W/") {
        true => value.to_string(),
        false => format!("\"{value}\""),
    }
}

/// Parameters that protect what is exported (de-identification): never ignorable. Matched without
/// regard to case, so no spelling slips past as "unknown".
fn is_privacy_parameter(name: &str) -> bool {
    name.get(..14)
        .is_some_and(|head| head.eq_ignore_ascii_case("_anonymization"))
}

/// Types exported at Patient and Group level: the Patient compartment, without Group itself.
pub fn is_patient_level_type(resource_type: &str) -> bool {
    resource_type != "Group" && in_patient_compartment_definition(resource_type)
}

/// `_typeFilter` values are comma lists of queries; a comma inside a query is escaped as `%2C`
/// there, so a comma followed by `Type?` starts the next query. Linear: after each comma only a
/// type name's length is looked at.
fn split_queries(value: &str) -> Vec<&str> {
    let mut queries = Vec::new();
    let mut rest = value;
    let mut query_start = value;
    while let Some(comma) = rest.find(',') {
        let after = rest.get(comma + 1..).unwrap_or_default();
        if starts_with_type_and_question_mark(after) {
            let taken = query_start.len() - rest.len() + comma;
            queries.push(query_start.get(..taken).unwrap_or_default().trim());
            query_start = after;
        }
        rest = after;
    }
    queries.push(query_start.trim());
    queries
}

/// Whether `text` begins (after blanks) with `Type?`; reads at most a type name's length.
fn starts_with_type_and_question_mark(text: &str) -> bool {
    let text = text.trim_start();
    let name_length = text
        .bytes()
        .take(MAX_TYPE_NAME + 1)
        .take_while(u8::is_ascii_alphabetic)
        .count();
    name_length <= MAX_TYPE_NAME
        && text
            .get(name_length..)
            .is_some_and(|after| after.trim_start().starts_with('?'))
        && text.get(..name_length).is_some_and(is_resource_type)
}

/// Longer than any R4 resource type name (`MedicinalProductAuthorization`, 29).
const MAX_TYPE_NAME: usize = 40;
/// `_typeFilter` queries one kickoff may give: every one is evaluated on every resource of its
/// type, so their number bounds the export's CPU time per resource.
pub const MAX_TYPE_FILTERS: usize = 100;
/// The most `_typeFilter` text one kickoff may give, in bytes, all queries together.
pub const MAX_TYPE_FILTER_BYTES: usize = 16 * 1024;

fn parse_element(element: &str) -> Result<ElementSpec, RequestError> {
    let is_name = |n: &str| {
        n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && n.chars().all(|c| c.is_ascii_alphanumeric())
    };
    let (resource_type, name) = match element.split_once('.') {
        Some((resource_type, name)) => (Some(resource_type), name),
        None => (None, element),
    };
    if resource_type.is_some_and(|t| !is_resource_type(t)) || !is_name(name) {
        return Err(invalid(
            "_elements",
            format!("_elements {element:?} is not an element name (name or Type.name)"),
        ));
    }
    Ok(ElementSpec {
        resource_type: resource_type.map(str::to_string),
        name: name.to_string(),
    })
}

/// A FHIR `instant`: date, time and zone (`2020-01-01T00:00:00Z`).
fn parse_instant(parameter: &str, value: &str) -> Result<DateTime<Utc>, RequestError> {
    DateTime::parse_from_rfc3339(value).map(|t| t.with_timezone(&Utc)).map_err(|_| {
        invalid(
            parameter,
            format!("{parameter} {value:?} is not a FHIR instant (e.g. 2020-01-01T00:00:00Z, with a time zone)"),
        )
    })
}

/// Azure container naming: 3 to 63 of lowercase letters, digits and single hyphens, starting and
/// ending with a letter or digit; the job-state container is reserved.
pub fn check_container_name(name: &str) -> Result<(), RequestError> {
    let bytes = name.as_bytes();
    let well_formed = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !name.contains("--");
    if !well_formed {
        return Err(invalid(
            "_container",
            format!("_container {name:?} is not a valid container name (3-63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit)"),
        ));
    }
    if is_export_container_name(name) {
        return Err(invalid(
            "_container",
            format!("_container {name:?} has the form of the container an export without _container gets ({{yyyymmdd}}t{{hhmmss}}-{{jobId}}); an export's files belong to it alone, so name another"),
        ));
    }
    if name == JOBS_CONTAINER {
        return Err(invalid(
            "_container",
            format!("_container {name:?} is reserved for job state"),
        ));
    }
    Ok(())
}

/// The container name an export without `_container` gets: `{yyyymmdd}t{hhmmss}-{jobId}`.
fn is_export_container_name(name: &str) -> bool {
    let Some((stamp, id)) = name.split_once('-') else {
        return false;
    };
    let digits = |text: Option<&str>| text.is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()));
    stamp.len() == 15
        && digits(stamp.get(..8))
        && stamp.get(8..9) == Some("t")
        && digits(stamp.get(9..))
        && super::layout::is_job_id(id)
}

#[cfg(test)]
mod tests;
