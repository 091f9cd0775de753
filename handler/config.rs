//! Settings: read and checked once at start-up; a bad value stops start-up with its name.

use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_FILE_MAX_BYTES: u64 = 64 << 20;
pub const DEFAULT_STALE_AFTER_SECS: u64 = 600;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_DELAY_SECS: f64 = 30.0;
pub const DEFAULT_RETENTION_HOURS: u64 = 168;
pub const DEFAULT_SHARD_MAX_RESOURCES: u64 = 250_000;
/// Outputs per manifest page (`allowPartialManifests`).
pub const DEFAULT_MANIFEST_PAGE_SIZE: usize = 1_000;
pub const DEFAULT_MAX_RUNNING_EXPORTS: usize = 32;
/// The container (locally: the folder of the exports folder) `_anonymizationConfig` names a blob in.
pub const DEFAULT_DEID_CONTAINER: &str = "anonymization";
/// The largest anonymization configuration read (Azure's limit).
pub const DEFAULT_DEID_MAX_CONFIG_BYTES: u64 = 1 << 20;

/// De-identified export (`_anonymizationConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeidSettings {
    /// `EXPORT_DEID=off` refuses the parameters (never ignores them).
    pub enabled: bool,
    pub container: String,
    pub max_config_bytes: u64,
    /// A de-identified export must name its own `_container` (as Azure requires), so that its
    /// files never sit beside identified ones.
    pub require_container: bool,
}

impl Default for DeidSettings {
    fn default() -> Self {
        DeidSettings {
            enabled: true,
            container: DEFAULT_DEID_CONTAINER.into(),
            max_config_bytes: DEFAULT_DEID_MAX_CONFIG_BYTES,
            require_container: true,
        }
    }
}

/// `EXPORT_DEID`: `on` or `off`.
pub fn parse_switch(name: &'static str, value: &str) -> Result<bool, SettingError> {
    match value.trim() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(bad(name, format!("{other:?} is not on or off"))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSetting {
    Sqlite(PathBuf),
    /// A FHIR server's base URL, read over REST search.
    Remote {
        url: String,
        auth: SourceAuth,
    },
}

/// How the remote source signs its requests (`FHIR_SOURCE_AUTH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAuth {
    None,
    /// A token for `{url}/.default`: managed identity in Azure, the developer's sign-in locally.
    Azure,
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSetting {
    Folder(PathBuf),
    /// An Azure Blob account URL; with a SAS in its query no other credential is used.
    AzureBlob {
        url: String,
        sas: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub source: SourceSetting,
    /// How long a FHIR server source's refusals are waited out before it first answers
    /// (`EXPORT_ACCESS_WAIT_SECS`): a role assigned at deployment takes minutes to take effect.
    pub access_wait: Duration,
    pub storage: StorageSetting,
    pub file_max_bytes: u64,
    pub stale_after: Duration,
    pub max_attempts: u32,
    /// The most a failed shard waits before its first retry (doubled for each later one).
    pub retry_delay: Duration,
    pub workers: usize,
    /// How long a finished export's files are kept (the status answer's `Expires`).
    pub retention: Duration,
    /// Public base URL; when unset, taken from each request's `Host`.
    pub base_url: Option<String>,
    /// A type with more resources than this is split into `meta.lastUpdated` ranges, one shard each
    /// (where the source counts cheaply: a FHIR server's `_summary=count`).
    pub shard_max_resources: u64,
    /// Exports running at once; a kickoff beyond this answers 429.
    pub max_running_exports: usize,
    /// How long one run of a shard reads before it pauses and queues its continuation
    /// (`EXPORT_SHARD_MAX_SECS`; under the Functions host 80% of `functionTimeout` by default).
    pub shard_max_time: Option<Duration>,
    /// Outputs per manifest page, for clients that allow partial manifests.
    pub manifest_page_size: usize,
    /// Export files are stored gzip-compressed (`EXPORT_COMPRESSION=gzip`).
    pub gzip_files: bool,
    pub deid: DeidSettings,
    /// Bearer-token checks; `None` leaves every endpoint open.
    pub auth: Option<crate::auth::AuthSetting>,
    /// What the manifest's file URLs point at (`EXPORT_FILE_URLS`).
    pub file_urls: FileUrls,
}

/// `EXPORT_FILE_URLS`: the manifest's URLs lead to this service, which checks the token and
/// streams the file (`proxy`), or straight to the blob, with a short-lived read-only SAS signed by
/// the managed identity (`sas`: no token needed, nothing passes through the app).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileUrls {
    #[default]
    Proxy,
    Sas,
}

/// How long a download URL signed for `EXPORT_FILE_URLS=sas` is valid.
pub const SAS_URL_LIFETIME: chrono::Duration = chrono::Duration::hours(1);

pub fn parse_file_urls(value: &str, storage: &StorageSetting) -> Result<FileUrls, SettingError> {
    match value.trim() {
        "proxy" | "" => Ok(FileUrls::Proxy),
        "sas" => match storage {
            StorageSetting::AzureBlob { sas: false, .. } => Ok(FileUrls::Sas),
            _ => Err(bad(
                "EXPORT_FILE_URLS",
                "sas needs EXPORT_STORAGE to be an Azure Blob account reached by managed identity (it signs with a user delegation key)",
            )),
        },
        other => Err(bad(
            "EXPORT_FILE_URLS",
            format!("{other:?} is not proxy or sas"),
        )),
    }
}

/// `EXPORT_COMPRESSION`: `none` (files stored as NDJSON) or `gzip` (stored compressed); whether
/// files are stored compressed.
pub fn parse_compression(value: &str) -> Result<bool, SettingError> {
    match value.trim() {
        "none" | "" => Ok(false),
        "gzip" => Ok(true),
        other => Err(bad(
            "EXPORT_COMPRESSION",
            format!("{other:?} is not none or gzip"),
        )),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {message}")]
pub struct SettingError {
    pub name: &'static str,
    pub message: String,
}

fn bad(name: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        name,
        message: message.into(),
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            source: SourceSetting::Sqlite(PathBuf::from("./.fhir/store.db")),
            access_wait: crate::source::remote::DEFAULT_ACCESS_WAIT,
            storage: StorageSetting::Folder(PathBuf::from("./exports")),
            file_max_bytes: DEFAULT_FILE_MAX_BYTES,
            stale_after: Duration::from_secs(DEFAULT_STALE_AFTER_SECS),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_delay: Duration::from_secs_f64(DEFAULT_RETRY_DELAY_SECS),
            workers: default_workers(),
            retention: Duration::from_secs(DEFAULT_RETENTION_HOURS * 3600),
            base_url: None,
            shard_max_resources: DEFAULT_SHARD_MAX_RESOURCES,
            max_running_exports: DEFAULT_MAX_RUNNING_EXPORTS,
            shard_max_time: None,
            manifest_page_size: DEFAULT_MANIFEST_PAGE_SIZE,
            gzip_files: false,
            deid: DeidSettings::default(),
            file_urls: FileUrls::Proxy,
            auth: None,
        }
    }
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// `FHIR_SOURCE`: `sqlite:PATH` (a bare path means the same), or a FHIR server's `http(s)://` base URL.
pub fn parse_source(value: &str) -> Result<SourceSetting, SettingError> {
    let path = value.strip_prefix("sqlite:").unwrap_or(value);
    if value.starts_with("http://") || value.starts_with("https://") {
        if value.contains(['?', '#']) || value.split('/').nth(2).is_none_or(str::is_empty) {
            return Err(bad(
                "FHIR_SOURCE",
                format!("{value:?} is not a FHIR base URL"),
            ));
        }
        return Ok(SourceSetting::Remote {
            url: value.trim_end_matches('/').to_string(),
            auth: SourceAuth::None,
        });
    }
    if path.is_empty() {
        return Err(bad("FHIR_SOURCE", "empty path"));
    }
    Ok(SourceSetting::Sqlite(PathBuf::from(path)))
}

/// `EXPORT_STORAGE`: `file:DIR` (a bare path means the same), `https://{account}.blob.core.windows.net`,
/// or an account URL with a SAS (`http://` only with a SAS, as for Azurite).
pub fn parse_storage(value: &str) -> Result<StorageSetting, SettingError> {
    if value.starts_with("http://") || value.starts_with("https://") {
        let (base, query) = value.split_once('?').unwrap_or((value, ""));
        let sas = form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "sig");
        if !sas && !query.is_empty() {
            return Err(bad(
                "EXPORT_STORAGE",
                "the URL has a query but no SAS signature (sig=)",
            ));
        }
        if !sas && value.starts_with("http://") {
            return Err(bad(
                "EXPORT_STORAGE",
                format!(
                    "{base}: plain http needs a SAS in the URL; tokens are only sent over https"
                ),
            ));
        }
        if base.trim_end_matches('/').matches('/').count() > 3 || value.contains('#') {
            return Err(bad(
                "EXPORT_STORAGE",
                format!("{base}: give the account URL, without a container"),
            ));
        }
        return Ok(StorageSetting::AzureBlob {
            url: value.to_string(),
            sas,
        });
    }
    let path = value.strip_prefix("file:").unwrap_or(value);
    if path.is_empty() {
        return Err(bad("EXPORT_STORAGE", "empty path"));
    }
    Ok(StorageSetting::Folder(PathBuf::from(path)))
}

/// `FHIR_SOURCE_AUTH` (`none`, `azure`, `client-credentials`) and, for the last, its four settings.
pub fn parse_source_auth(
    kind: &str,
    token_url: Option<&str>,
    client_id: Option<&str>,
    client_secret: Option<&str>,
    scope: Option<&str>,
) -> Result<SourceAuth, SettingError> {
    match kind.trim() {
        "" | "none" => Ok(SourceAuth::None),
        "azure" => Ok(SourceAuth::Azure),
        "client-credentials" => {
            let need = |name: &'static str, value: Option<&str>| {
                value
                    .filter(|v| !v.trim().is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| bad(name, "required with FHIR_SOURCE_AUTH=client-credentials"))
            };
            Ok(SourceAuth::ClientCredentials {
                token_url: need("FHIR_SOURCE_TOKEN_URL", token_url)?,
                client_id: need("FHIR_SOURCE_CLIENT_ID", client_id)?,
                client_secret: need("FHIR_SOURCE_CLIENT_SECRET", client_secret)?,
                scope: scope.unwrap_or_default().to_string(),
            })
        }
        other => Err(bad(
            "FHIR_SOURCE_AUTH",
            format!("{other:?}: use none, azure or client-credentials"),
        )),
    }
}

/// The access-control settings as given: `EXPORT_AUTH` (`on`, `off` or unset) and
/// `EXPORT_AUTH_ISSUER`, `EXPORT_AUTH_AUDIENCE`, `EXPORT_AUTH_JWKS_URL`, `EXPORT_AUTH_TOKEN_ENDPOINT`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthInput<'a> {
    pub switch: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub jwks_url: Option<&'a str>,
    pub token_endpoint: Option<&'a str>,
}

/// Access control: on when an issuer is given (and then an audience, or a comma-separated list of
/// them, is needed), off otherwise. `EXPORT_AUTH=on` without an issuer, or `off` with one, is a
/// contradiction and refused. Returns the token checks, and whether running open was asked for
/// (`EXPORT_AUTH=off`).
pub fn parse_auth(
    input: AuthInput<'_>,
) -> Result<(Option<crate::auth::AuthSetting>, bool), SettingError> {
    fn given(value: Option<&str>) -> Option<&str> {
        value.map(str::trim).filter(|v| !v.is_empty())
    }
    let open_by_choice = match given(input.switch) {
        None | Some("on") => false,
        Some("off") => true,
        Some(other) => return Err(bad("EXPORT_AUTH", format!("{other:?} is not on or off"))),
    };
    let Some(issuer) = given(input.issuer) else {
        if [input.audience, input.jwks_url, input.token_endpoint]
            .into_iter()
            .any(|v| given(v).is_some())
        {
            return Err(bad(
                "EXPORT_AUTH_ISSUER",
                "required when EXPORT_AUTH_AUDIENCE, EXPORT_AUTH_JWKS_URL or EXPORT_AUTH_TOKEN_ENDPOINT is set",
            ));
        }
        if given(input.switch) == Some("on") {
            return Err(bad(
                "EXPORT_AUTH_ISSUER",
                "required with EXPORT_AUTH=on (the tokens' issuer)",
            ));
        }
        return Ok((None, open_by_choice));
    };
    if open_by_choice {
        return Err(bad(
            "EXPORT_AUTH",
            "off contradicts EXPORT_AUTH_ISSUER, which turns access control on: unset one of them",
        ));
    }
    let is_url = |v: &str| v.starts_with("https://") || v.starts_with("http://");
    if !is_url(issuer) {
        return Err(bad(
            "EXPORT_AUTH_ISSUER",
            format!("{issuer:?} is not an issuer URL (the tokens' iss claim)"),
        ));
    }
    let audiences: Vec<String> = given(input.audience)
        .into_iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|audience| !audience.is_empty())
        .map(str::to_string)
        .collect();
    if audiences.is_empty() {
        return Err(bad(
            "EXPORT_AUTH_AUDIENCE",
            "required with EXPORT_AUTH_ISSUER (the tokens' aud claim; several separated by commas)",
        ));
    }
    if let Some(url) = given(input.jwks_url).filter(|url| !is_url(url)) {
        return Err(bad(
            "EXPORT_AUTH_JWKS_URL",
            format!("{url:?} is not an http(s) URL"),
        ));
    }
    if let Some(url) = given(input.token_endpoint).filter(|url| !is_url(url)) {
        return Err(bad(
            "EXPORT_AUTH_TOKEN_ENDPOINT",
            format!("{url:?} is not an http(s) URL"),
        ));
    }
    let setting = crate::auth::AuthSetting {
        issuer: issuer.to_string(),
        audiences,
        jwks_url: given(input.jwks_url).map(str::to_string),
        token_endpoint: given(input.token_endpoint).map(str::to_string),
    };
    Ok((Some(setting), false))
}

/// In Azure the handler serves patient data to the internet: it does not start without access
/// control unless running open was asked for (`EXPORT_AUTH=off`, for a private network).
pub fn refuse_open_in_azure(
    auth: Option<&crate::auth::AuthSetting>,
    open_by_choice: bool,
    in_azure: bool,
) -> Result<(), SettingError> {
    if auth.is_none() && !open_by_choice && in_azure {
        return Err(bad(
            "EXPORT_AUTH_ISSUER",
            "required in Azure: without it anyone who finds the app's URL could export the whole FHIR store. Set EXPORT_AUTH_ISSUER and EXPORT_AUTH_AUDIENCE (the Bicep sets them for Entra ID), or EXPORT_AUTH=off to run without access control on a private network",
        ));
    }
    Ok(())
}

pub fn check_file_max_bytes(value: u64) -> Result<u64, SettingError> {
    if value < 1024 {
        return Err(bad(
            "EXPORT_FILE_MAX_BYTES",
            format!("{value} is too small (at least 1024)"),
        ));
    }
    Ok(value)
}

/// Seconds from 0.01 to a day.
pub fn check_retry_delay(seconds: f64) -> Result<Duration, SettingError> {
    if !(0.01..=86_400.0).contains(&seconds) {
        return Err(bad(
            "EXPORT_RETRY_DELAY_SECS",
            format!("{seconds} is out of range (0.01 to 86400 seconds)"),
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `EXPORT_SHARD_MAX_SECS`: seconds up to a day; 0 for no time box.
pub fn check_shard_max_secs(seconds: f64) -> Result<Option<Duration>, SettingError> {
    if !(0.0..=86_400.0).contains(&seconds) {
        return Err(bad(
            "EXPORT_SHARD_MAX_SECS",
            format!("{seconds} is out of range (0 for none, up to 86400 seconds)"),
        ));
    }
    Ok((seconds > 0.0).then(|| Duration::from_secs_f64(seconds)))
}

/// The function timeout when host.json sets none: Flex Consumption's default, 30 minutes.
pub const DEFAULT_FUNCTION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The time box of a shard's run under the Functions host when `EXPORT_SHARD_MAX_SECS` is not set:
/// 80% of host.json's `functionTimeout` (`hh:mm:ss`, or `d.hh:mm:ss`), so that a run stops well
/// before the host kills the whole process (and every other invocation on it). `None` for an
/// unbounded timeout (`-1`).
pub fn shard_time_box(host_json: &str) -> Result<Option<Duration>, SettingError> {
    let invalid = |why: String| bad("EXPORT_SHARD_MAX_SECS", format!("host.json: {why}"));
    let host: serde_json::Value =
        serde_json::from_str(host_json).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let timeout = match host.get("functionTimeout") {
        None | Some(serde_json::Value::Null) => DEFAULT_FUNCTION_TIMEOUT,
        Some(serde_json::Value::String(text)) if text.trim() == "-1" => return Ok(None),
        Some(serde_json::Value::String(text)) => parse_timespan(text.trim())
            .ok_or_else(|| invalid(format!("functionTimeout {text:?} is not hh:mm:ss")))?,
        Some(other) => return Err(invalid(format!("functionTimeout {other} is not a string"))),
    };
    Ok(Some(timeout.mul_f64(0.8)))
}

/// A .NET TimeSpan as host.json writes it: `[d.]hh:mm:ss[.fff]`.
fn parse_timespan(text: &str) -> Option<Duration> {
    let (days, clock) = match text.split_once('.') {
        Some((days, clock)) if clock.contains(':') => (days.parse::<u64>().ok()?, clock),
        _ => (0, text),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let [hours, minutes, seconds] = parts[..] else {
        return None;
    };
    let hours: u64 = hours.parse().ok()?;
    let minutes: u64 = minutes.parse().ok()?;
    let seconds: f64 = seconds.parse().ok()?;
    if minutes >= 60 || !(0.0..60.0).contains(&seconds) {
        return None;
    }
    Some(
        Duration::from_secs((days * 24 + hours) * 3600 + minutes * 60)
            + Duration::from_secs_f64(seconds),
    )
}

/// Under the Functions host without `EXPORT_BASE_URL`: `https://` and the app's default host name,
/// which App Service sets as `WEBSITE_HOSTNAME`.
pub fn base_url_from_site_host(host: Option<&str>) -> Result<Option<String>, SettingError> {
    match host.map(str::trim).filter(|h| !h.is_empty()) {
        None => Ok(None),
        Some(host)
            if host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)) =>
        {
            Ok(Some(format!("https://{}", host.to_ascii_lowercase())))
        }
        Some(host) => Err(bad(
            "WEBSITE_HOSTNAME",
            format!("{host:?} is not a host name; set EXPORT_BASE_URL"),
        )),
    }
}

pub fn check_base_url(value: &str) -> Result<String, SettingError> {
    if !(value.starts_with("http://") || value.starts_with("https://"))
        || value.contains(['?', '#'])
    {
        return Err(bad(
            "EXPORT_BASE_URL",
            format!("{value:?} is not an http(s) base URL"),
        ));
    }
    Ok(value.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_box_is_four_fifths_of_the_function_timeout() {
        let of = |host: &str| shard_time_box(host).map_err(|e| e.to_string());
        let secs = |s: u64| Ok(Some(Duration::from_secs(s)));
        assert_eq!(of(crate::package::HOST_JSON), secs(480));
        assert_eq!(of(r#"{"functionTimeout": "00:30:00"}"#), secs(1440));
        assert_eq!(of(r#"{"functionTimeout": "1.02:00:00"}"#), secs(26 * 2880));
        assert_eq!(of(r#"{"version": "2.0"}"#), secs(1440));
        assert_eq!(of(r#"{"functionTimeout": "-1"}"#), Ok(None));
        for bad in [
            r#"{"functionTimeout": "10 minutes"}"#,
            r#"{"functionTimeout": 600}"#,
            "{",
        ] {
            let error = of(bad).unwrap_err();
            assert!(error.contains("EXPORT_SHARD_MAX_SECS"), "{error}");
        }
        assert_eq!(check_shard_max_secs(0.0).unwrap(), None);
        assert_eq!(
            check_shard_max_secs(1.5).unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert!(check_shard_max_secs(-1.0).is_err());
    }

    #[test]
    fn sas_file_urls_need_azure_blob_under_an_identity() {
        let identity = StorageSetting::AzureBlob {
            url: "https://a.blob.core.windows.net".into(),
            sas: false,
        };
        let by_sas = StorageSetting::AzureBlob {
            url: "https://a.blob.core.windows.net?sv=x&sig=y".into(),
            sas: true,
        };
        let folder = StorageSetting::Folder("exports".into());
        assert_eq!(parse_file_urls("sas", &identity).unwrap(), FileUrls::Sas);
        assert_eq!(parse_file_urls("proxy", &folder).unwrap(), FileUrls::Proxy);
        for storage in [by_sas, folder] {
            let refused = parse_file_urls("sas", &storage).unwrap_err();
            assert_eq!(refused.name, "EXPORT_FILE_URLS");
        }
        assert!(parse_file_urls("direct", &identity).is_err());
    }

    #[test]
    fn settings_parse_and_name_themselves_when_wrong() {
        assert_eq!(
            parse_source("sqlite:/x/db").unwrap(),
            SourceSetting::Sqlite("/x/db".into())
        );
        assert_eq!(
            parse_storage("file:./e").unwrap(),
            StorageSetting::Folder("./e".into())
        );
        assert_eq!(
            parse_storage("https://a.blob.core.windows.net").unwrap(),
            StorageSetting::AzureBlob {
                url: "https://a.blob.core.windows.net".into(),
                sas: false
            }
        );
        assert!(matches!(
            parse_storage("http://127.0.0.1:10000/devstoreaccount1?sv=1&sig=x").unwrap(),
            StorageSetting::AzureBlob { sas: true, .. }
        ));
        for bad in [
            "http://a.blob.core.windows.net",
            "https://a.blob.core.windows.net/c/d/e",
            "https://a.blob.core.windows.net?x=1",
        ] {
            assert!(parse_storage(bad)
                .unwrap_err()
                .to_string()
                .contains("EXPORT_STORAGE"));
        }
        assert!(check_file_max_bytes(10)
            .unwrap_err()
            .to_string()
            .contains("EXPORT_FILE_MAX_BYTES"));
        assert_eq!(
            check_base_url("http://h:1/fhir/").unwrap(),
            "http://h:1/fhir"
        );
        assert!(check_base_url("ftp://x").is_err());
        assert_eq!(
            base_url_from_site_host(Some("fx-abc.azurewebsites.net")).unwrap(),
            Some("https://fx-abc.azurewebsites.net".into())
        );
        assert_eq!(base_url_from_site_host(None).unwrap(), None);
        assert!(base_url_from_site_host(Some("evil/x")).is_err());
    }
}
