//! `handler`: the command line of fhir-export (see `handler --help`).
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use fhir_export::app::{serve_local, App};
use fhir_export::config::{self, Settings, SourceSetting};
use fhir_export::source::{import, EmbeddedStore};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(Parser)]
#[command(name = "handler", version, about = "FHIR Bulk Data $export service")]
struct Cli {
    /// Without a command: custom-handler mode when FUNCTIONS_CUSTOMHANDLER_PORT is set.
    #[command(subcommand)]
    command: Option<Command>,
}

/// Custom-handler mode takes its settings from the environment (the Function App's settings).
#[derive(Parser)]
struct FromEnvironment {
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local service: HTTP API, worker pool, embedded store, exports on local disk.
    Serve(Box<ServeArgs>),
    /// Load NDJSON / Bundle files (or folders, or .gz of either) into the embedded store.
    Import {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a Bulk Data export against BASE_URL (this server or any other) and download the files.
    Export(Box<ExportArgs>),
    /// Upload NDJSON / Bundle files (or folders, or .gz of either), or generated demo data, to a
    /// FHIR server: batch Bundles of PUT entries (an upsert by id), 4 at a time, retried on 429 and
    /// 5xx. The token: --token, else for an https server the Azure sign-in (azd auth login).
    Load(Box<LoadArgs>),
    /// Write N copies of a dataset, every id and reference rewritten per copy, as NDJSON per type.
    Synth {
        #[arg(long, required = true)]
        from: Vec<PathBuf>,
        #[arg(long)]
        copies: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a synthetic FHIR R4 population as NDJSON, one file per type.
    Generate {
        #[arg(long)]
        patients: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// De-identification (`_anonymizationConfig`) tools.
    #[command(subcommand)]
    Deid(DeidCommand),
    /// SQL on FHIR v2 views: run one over files, or run the conformance suite.
    #[command(subcommand)]
    View(ViewCommand),
    /// Write the Azure Functions deployment zip: this binary, host.json, one folder per function.
    Package {
        #[arg(long, default_value = "app.zip")]
        out: PathBuf,
        /// The binary to ship as `handler` (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ViewCommand {
    /// Run a ViewDefinition over NDJSON files (or .gz of them); the rows go to --out or stdout.
    Run {
        view: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// csv (with a header line), ndjson or parquet.
        #[arg(long, default_value = "csv")]
        format: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run a folder of SQL on FHIR conformance test files; print the count of cases passed and
    /// each failure; --report writes the report sql-on-fhir.org reads. Exits 1 when a case fails.
    Test {
        dir: PathBuf,
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeidCommand {
    /// Check an anonymization configuration as a kickoff does and print its local ETag; with
    /// --input, de-identify a resource or NDJSON file to stdout.
    Check {
        config: PathBuf,
        #[arg(long)]
        input: Option<PathBuf>,
        /// The date the over-89 rules count from (default: today).
        #[arg(long)]
        today: Option<chrono::NaiveDate>,
    },
}

#[derive(Args)]
struct LoadArgs {
    /// The FHIR server's base URL.
    fhir_url: String,
    /// Files or folders to upload.
    #[arg(long = "data", required_unless_present = "demo")]
    data: Vec<PathBuf>,
    /// Generate a demo population (as `handler serve --demo` does) and upload it.
    #[arg(long, conflicts_with = "data")]
    demo: bool,
    /// Patients of the demo population.
    #[arg(long, default_value_t = fhir_export::generate::DEMO_PATIENTS)]
    patients: usize,
    /// Bearer token sent with every request (default: for an https server, a token from the
    /// Azure sign-in for {FHIR_URL}/.default).
    #[arg(long, env = "FHIR_BEARER_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
struct ExportArgs {
    /// The FHIR server's base URL (not needed with --resume).
    #[arg(required_unless_present = "resume")]
    base_url: Option<String>,
    /// system, patient or group:ID
    #[arg(long, default_value = "system")]
    level: String,
    /// Resource types (comma list or repeated).
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// Only resources changed after this instant (e.g. 2020-01-01T00:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// A `_typeFilter` query such as `Observation?code=8867-4` (repeatable).
    #[arg(long = "type-filter")]
    type_filters: Vec<String>,
    /// `_container`: where the server writes the files (required with --anonymization-config).
    #[arg(long)]
    container: Option<String>,
    /// `_anonymizationConfig`: a de-identified export with this configuration, a name in the
    /// server's `anonymization` container.
    #[arg(long)]
    anonymization_config: Option<String>,
    /// `_anonymizationConfigEtag`: the configuration's version the export must use.
    #[arg(long, requires = "anonymization_config")]
    anonymization_config_etag: Option<String>,
    #[arg(long, default_value = "./out")]
    out: PathBuf,
    /// Continue an export that was started before, from its status URL.
    #[arg(long)]
    resume: Option<String>,
    /// Bearer token sent with every request.
    #[arg(long, env = "FHIR_BEARER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The Bulk Data version to speak: 3 (`$export`, GET with a query) or 4 (`$export-v4`, the
    /// STU4 ballot: POST of a Parameters body).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=4))]
    version: u8,
}

#[derive(Args)]
struct StoreArgs {
    /// The source: the embedded store (`sqlite:PATH` or a path), or a FHIR server (`https://...`).
    #[arg(
        long = "source",
        visible_alias = "store",
        env = "FHIR_SOURCE",
        default_value = "sqlite:./.fhir/store.db"
    )]
    source: String,
}

impl StoreArgs {
    /// The source, refused when the flag and `FHIR_SOURCE` both name one and they differ (which
    /// would serve, say, an empty store while the environment names a FHIR server).
    fn source(&self) -> anyhow::Result<SourceSetting> {
        let named = std::env::var("FHIR_SOURCE")
            .ok()
            .filter(|s| !s.trim().is_empty());
        if let Some(named) = named.filter(|named| named.trim() != self.source.trim()) {
            anyhow::bail!(
                "--source {} and FHIR_SOURCE={named} name different sources; give one of them",
                self.source
            );
        }
        Ok(config::parse_source(&self.source)?)
    }
}

#[derive(Args)]
struct SourceAuthArgs {
    /// How to sign requests to a FHIR server source: none, azure (a token for {url}/.default from
    /// the managed identity or your sign-in) or client-credentials.
    #[arg(long = "source-auth", env = "FHIR_SOURCE_AUTH", default_value = "none")]
    auth: String,
    #[arg(long = "source-token-url", env = "FHIR_SOURCE_TOKEN_URL")]
    token_url: Option<String>,
    #[arg(long = "source-client-id", env = "FHIR_SOURCE_CLIENT_ID")]
    client_id: Option<String>,
    #[arg(
        long = "source-client-secret",
        env = "FHIR_SOURCE_CLIENT_SECRET",
        hide_env_values = true
    )]
    client_secret: Option<String>,
    #[arg(long = "source-scope", env = "FHIR_SOURCE_SCOPE")]
    scope: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, env = "EXPORT_PORT", default_value_t = 7071)]
    port: u16,
    /// Files or folders to import before serving.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Generate and import a demo population when the store is empty.
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    source_auth: SourceAuthArgs,
    /// Where export files and job state go (`file:DIR` or a path).
    #[arg(
        long = "exports",
        env = "EXPORT_STORAGE",
        default_value = "file:./exports"
    )]
    exports: String,
    #[arg(long, env = "EXPORT_FILE_MAX_BYTES", default_value_t = config::DEFAULT_FILE_MAX_BYTES)]
    file_max_bytes: u64,
    #[arg(long, env = "EXPORT_STALE_AFTER_SECS", default_value_t = config::DEFAULT_STALE_AFTER_SECS)]
    stale_after_secs: u64,
    #[arg(long, env = "EXPORT_MAX_ATTEMPTS", default_value_t = config::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Seconds a failed shard waits, at most, before its first retry (doubled for each later one).
    #[arg(long, env = "EXPORT_RETRY_DELAY_SECS", default_value_t = config::DEFAULT_RETRY_DELAY_SECS)]
    retry_delay_secs: f64,
    /// Hours a finished export's files are kept.
    #[arg(long, env = "EXPORT_RETENTION_HOURS", default_value_t = config::DEFAULT_RETENTION_HOURS)]
    retention_hours: u64,
    /// Split a type with more resources than this into lastUpdated ranges (FHIR server sources).
    #[arg(long, env = "EXPORT_SHARD_MAX_RESOURCES", default_value_t = config::DEFAULT_SHARD_MAX_RESOURCES)]
    shard_max_resources: u64,
    /// Seconds one run of a shard reads before it pauses and queues its continuation (0: no time
    /// box; under the Functions host 80% of host.json's functionTimeout by default).
    #[arg(long, env = "EXPORT_SHARD_MAX_SECS")]
    shard_max_secs: Option<f64>,
    /// Outputs per manifest page for clients that send allowPartialManifests=true.
    #[arg(long, env = "EXPORT_MANIFEST_PAGE_SIZE", default_value_t = config::DEFAULT_MANIFEST_PAGE_SIZE)]
    manifest_page_size: usize,
    /// How export files are stored: none (NDJSON) or gzip (compressed; served compressed to
    /// clients that accept gzip, and decompressed for the others).
    #[arg(long, env = "EXPORT_COMPRESSION", default_value = "none")]
    compression: String,
    /// De-identified export (_anonymizationConfig): on, or off to refuse its parameters.
    #[arg(long, env = "EXPORT_DEID", default_value = "on")]
    deid: String,
    /// The container (locally: the folder of the exports folder) anonymization configs are read from.
    #[arg(long, env = "EXPORT_DEID_CONTAINER", default_value = config::DEFAULT_DEID_CONTAINER)]
    deid_container: String,
    /// The largest anonymization config read, in bytes.
    #[arg(long, env = "EXPORT_DEID_MAX_CONFIG_BYTES", default_value_t = config::DEFAULT_DEID_MAX_CONFIG_BYTES)]
    deid_max_config_bytes: u64,
    /// Whether a de-identified export must name its own _container (on, as Azure), or may not (off).
    #[arg(long, env = "EXPORT_DEID_REQUIRE_CONTAINER", default_value = "on")]
    deid_require_container: String,
    /// Shard workers (default: one per core).
    #[arg(long, env = "EXPORT_WORKERS")]
    workers: Option<usize>,
    /// Public base URL of the service (default: from each request's Host header).
    #[arg(long, env = "EXPORT_BASE_URL")]
    base_url: Option<String>,
    /// The manifest's file URLs: proxy (this service streams each file, checking the token) or
    /// sas (short-lived read-only SAS URLs straight to Azure Blob, signed by the managed identity).
    #[arg(long, env = "EXPORT_FILE_URLS", default_value = "proxy")]
    file_urls: String,
    /// Exports running at once; a kickoff beyond this answers 429 with Retry-After.
    #[arg(long, env = "EXPORT_MAX_RUNNING_EXPORTS", default_value_t = config::DEFAULT_MAX_RUNNING_EXPORTS)]
    max_running_exports: usize,
    /// Require bearer tokens issued by this issuer (the tokens' iss), e.g.
    /// https://login.microsoftonline.com/{tenant}/v2.0.
    #[arg(long, env = "EXPORT_AUTH_ISSUER")]
    auth_issuer: Option<String>,
    /// Seconds a FHIR server source's refusals (401, 403) are waited out before it first answers:
    /// a role assigned at deployment takes minutes to reach the FHIR service.
    #[arg(long, env = "EXPORT_ACCESS_WAIT_SECS", default_value_t = 600)]
    access_wait_secs: u64,
    /// Access control: on (needs EXPORT_AUTH_ISSUER) or off. Unset, it is on when an issuer is
    /// given; in Azure (WEBSITE_INSTANCE_ID set) the handler refuses to run open unless it is off.
    #[arg(long = "auth", env = "EXPORT_AUTH")]
    access_control: Option<String>,
    /// The audiences the tokens may name (aud), separated by commas: for Entra ID, the API's
    /// client id and its Application ID URI.
    #[arg(long, env = "EXPORT_AUTH_AUDIENCE")]
    auth_audience: Option<String>,
    /// The issuer's signing keys (default: jwks_uri of its OpenID configuration).
    #[arg(long, env = "EXPORT_AUTH_JWKS_URL")]
    auth_jwks_url: Option<String>,
    /// The token endpoint advertised to clients in SMART discovery (default: token_endpoint of the
    /// issuer's OpenID configuration).
    #[arg(long, env = "EXPORT_AUTH_TOKEN_ENDPOINT")]
    auth_token_endpoint: Option<String>,
}

fn main() -> ExitCode {
    fhir_export::os::limit_malloc_arenas();
    let cli = Cli::parse();
    // The Functions host logs every line a custom handler writes to stderr as an error: under
    // it, logs go to stdout.
    let under_host =
        cli.command.is_none() && std::env::var_os("FUNCTIONS_CUSTOMHANDLER_PORT").is_some();
    let (writer, ansi) = match under_host {
        true => (BoxMakeWriter::new(std::io::stdout), false),
        false => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,warp=warn,hyper=warn".into()),
        )
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(command) = cli.command else {
        if let Ok(port) = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT") {
            return custom_handler(&port);
        }
        <Cli as clap::CommandFactory>::command().print_help()?;
        return Ok(ExitCode::from(2));
    };
    match command {
        Command::Deid(DeidCommand::Check {
            config,
            input,
            today,
        }) => deid_check(&config, input.as_deref(), today),
        Command::View(command) => view(command),
        Command::Package { out, binary } => {
            let binary = match binary {
                Some(binary) => binary,
                None => std::env::current_exe()?,
            };
            let summary = fhir_export::package::write_package(&out, &binary)?;
            println!(
                "wrote {} ({:.1} MB): {}",
                out.display(),
                summary.bytes as f64 / 1e6,
                summary.entries.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Import { paths, store } => {
            let SourceSetting::Sqlite(path) = store.source()? else {
                anyhow::bail!("import loads the embedded store; --store must be sqlite:PATH, not a FHIR server");
            };
            let store = EmbeddedStore::open(path)?;
            Ok(if import_files(&store, &paths)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Generate {
            patients,
            seed,
            out,
        } => {
            let started = Instant::now();
            let summary = fhir_export::generate::write_ndjson(patients, seed, &out)?;
            println!(
                "{summary} in {:.2} s, in {}",
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth { from, copies, out } => {
            let started = Instant::now();
            let summary = fhir_export::synth::synth(&from, copies, &out)?;
            println!(
                "wrote {} resources ({:.1} MB) in {} types in {:.2} s into {}",
                summary.resources,
                summary.bytes as f64 / 1e6,
                summary.per_type.len(),
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(*args),
        Command::Export(args) => export(*args),
        Command::Load(args) => load(*args),
    }
}

fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    use fhir_export::load::{LoadAuth, LoadOptions};
    let demo_folder = tempfile::tempdir()?;
    let paths = match args.demo {
        true => {
            let summary =
                fhir_export::generate::write_ndjson(args.patients, 1, demo_folder.path())?;
            println!("generated demo data: {summary}");
            vec![demo_folder.path().to_path_buf()]
        }
        false => args.data,
    };
    let auth = match args.token.filter(|token| !token.trim().is_empty()) {
        Some(token) => LoadAuth::Token(token),
        None if args.fhir_url.starts_with("https://") => LoadAuth::Azure(
            azure_identity::DeveloperToolsCredential::new(None)
                .map_err(|e| anyhow::anyhow!("the Azure sign-in (azd auth login): {e}"))?,
        ),
        None => LoadAuth::None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(fhir_export::load::run(LoadOptions {
        base_url: args.fhir_url.clone(),
        paths,
        auth,
    }))?;
    let seconds = summary.elapsed.as_secs_f64();
    println!(
        "loaded {} resources into {} in {} Bundles, in {seconds:.1} s ({:.0} resources/s); {} retries",
        summary.loaded,
        args.fhir_url,
        summary.bundles,
        summary.loaded as f64 / seconds.max(1e-9),
        summary.retries
    );
    for file in &summary.unreadable {
        eprintln!("could not read {file}");
    }
    if summary.refused > 0 {
        eprintln!(
            "{} resources were refused by the server; the first: {}",
            summary.refused,
            summary.first_refusal.as_deref().unwrap_or("")
        );
    }
    Ok(
        match summary.refused == 0 && summary.unreadable.is_empty() {
            true => ExitCode::SUCCESS,
            false => ExitCode::from(1),
        },
    )
}

fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let options = fhir_export::client::ExportOptions {
        base_url: args.base_url.unwrap_or_default(),
        level: args.level,
        types: args.types,
        since: args.since,
        type_filters: args.type_filters,
        container: args.container,
        anonymization_config: args.anonymization_config,
        anonymization_config_etag: args.anonymization_config_etag,
        out: args.out,
        resume: args.resume,
        bearer_token: args.token,
        stu4: args.version == 4,
    };
    let out = options.out.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(fhir_export::client::run(options)) {
        Ok(summary) => {
            let seconds = summary.elapsed.as_secs_f64();
            println!(
                "exported {} resources in {} files, {:.1} MB, in {seconds:.2} s ({:.0} resources/s) into {}",
                summary.resources,
                summary.files,
                summary.bytes as f64 / 1e6,
                summary.resources as f64 / seconds.max(1e-9),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error @ fhir_export::client::ClientError::Interrupted(_)) => {
            println!("{error}");
            Ok(ExitCode::from(130))
        }
        Err(fhir_export::client::ClientError::Other(error)) => Err(error),
    }
}

/// Imports and prints the report; false when a file failed or an entry was refused (the rest
/// of its file was imported).
fn import_files(store: &EmbeddedStore, paths: &[PathBuf]) -> anyhow::Result<bool> {
    let started = Instant::now();
    let report = import::import(store, paths)?;
    for failure in &report.failed {
        eprintln!("import failed: {failure}");
    }
    for refusal in &report.refused {
        eprintln!("entry refused: {refusal}");
    }
    println!(
        "imported {report} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(report.failed.is_empty() && report.refused.is_empty())
}

/// Under the Functions host: settings from the environment, no in-process workers.
fn custom_handler(port: &str) -> anyhow::Result<ExitCode> {
    let port: u16 = port.trim().parse().map_err(|_| {
        anyhow::anyhow!("setting FUNCTIONS_CUSTOMHANDLER_PORT: {port:?} is not a port number")
    })?;
    let args = FromEnvironment::try_parse_from(["handler"])?.serve;
    let mut settings = settings_from(&args)?;
    check_source_under_host(
        &settings.source,
        std::env::var_os("FHIR_SOURCE").is_some(),
        std::env::var_os("WEBSITE_INSTANCE_ID").is_some(),
    )?;
    let (_, open_by_choice) = config::parse_auth(auth_input(&args))?;
    config::refuse_open_in_azure(
        settings.auth.as_ref(),
        open_by_choice,
        std::env::var_os("WEBSITE_INSTANCE_ID").is_some(),
    )?;
    if args.shard_max_secs.is_none() {
        // The host's working directory is the app's root, which holds the deployed host.json.
        let host_json = std::fs::read_to_string("host.json")
            .unwrap_or_else(|_| fhir_export::package::HOST_JSON.to_string());
        settings.shard_max_time = config::shard_time_box(&host_json)?;
    }
    if settings.base_url.is_none() {
        // App Service names the app's own host; a client's Host header never decides the URLs.
        settings.base_url =
            config::base_url_from_site_host(std::env::var("WEBSITE_HOSTNAME").ok().as_deref())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = App::open(settings, std::sync::Arc::new(fhir_export::invoke::NoQueue))?;
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        tracing::info!(port, "custom handler listening for the Functions host");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        fhir_export::invoke::serve_custom_handler(app.api, listener, shutdown).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Under the Functions host the source is named, never defaulted: in Azure (`WEBSITE_INSTANCE_ID`
/// set) the app's folder is the read-only deployment package and every instance would hold a store
/// of its own, so an embedded store is refused there; `func start` on a laptop may use one.
fn check_source_under_host(
    source: &SourceSetting,
    named: bool,
    in_azure: bool,
) -> anyhow::Result<()> {
    match source {
        _ if !named => anyhow::bail!(
            "setting FHIR_SOURCE: required under the Functions host; set it to the FHIR service's base URL (https://...)"
        ),
        SourceSetting::Sqlite(path) if in_azure => anyhow::bail!(
            "setting FHIR_SOURCE: sqlite:{} cannot serve in Azure (the app's folder is read-only, and each instance would hold its own store); set it to the FHIR service's base URL (https://...)",
            path.display()
        ),
        _ => Ok(()),
    }
}

fn settings_from(args: &ServeArgs) -> anyhow::Result<Settings> {
    let source = match args.store.source()? {
        SourceSetting::Remote { url, .. } => SourceSetting::Remote {
            url,
            auth: config::parse_source_auth(
                &args.source_auth.auth,
                args.source_auth.token_url.as_deref(),
                args.source_auth.client_id.as_deref(),
                args.source_auth.client_secret.as_deref(),
                args.source_auth.scope.as_deref(),
            )?,
        },
        sqlite => sqlite,
    };
    let storage = config::parse_storage(&args.exports)?;
    Ok(Settings {
        source,
        access_wait: std::time::Duration::from_secs(args.access_wait_secs),
        file_urls: config::parse_file_urls(&args.file_urls, &storage)?,
        storage,
        file_max_bytes: config::check_file_max_bytes(args.file_max_bytes)?,
        stale_after: std::time::Duration::from_secs(args.stale_after_secs.max(1)),
        max_attempts: args.max_attempts.max(1),
        retry_delay: config::check_retry_delay(args.retry_delay_secs)?,
        workers: args.workers.unwrap_or_else(config::default_workers).max(1),
        retention: std::time::Duration::from_secs(args.retention_hours.max(1) * 3600),
        shard_max_resources: args.shard_max_resources.max(1),
        shard_max_time: args
            .shard_max_secs
            .map(config::check_shard_max_secs)
            .transpose()?
            .flatten(),
        max_running_exports: args.max_running_exports.max(1),
        manifest_page_size: args.manifest_page_size.max(1),
        gzip_files: config::parse_compression(&args.compression)?,
        deid: config::DeidSettings {
            enabled: config::parse_switch("EXPORT_DEID", &args.deid)?,
            container: {
                let container = args.deid_container.trim();
                fhir_export::export::request::check_container_name(container).map_err(|error| {
                    config::SettingError {
                        name: "EXPORT_DEID_CONTAINER",
                        message: error.message,
                    }
                })?;
                container.to_string()
            },
            max_config_bytes: args.deid_max_config_bytes.max(1),
            require_container: config::parse_switch(
                "EXPORT_DEID_REQUIRE_CONTAINER",
                &args.deid_require_container,
            )?,
        },
        auth: config::parse_auth(auth_input(args))?.0,
        base_url: args
            .base_url
            .as_deref()
            .map(config::check_base_url)
            .transpose()?,
    })
}

fn auth_input(args: &ServeArgs) -> config::AuthInput<'_> {
    config::AuthInput {
        switch: args.access_control.as_deref(),
        issuer: args.auth_issuer.as_deref(),
        audience: args.auth_audience.as_deref(),
        jwks_url: args.auth_jwks_url.as_deref(),
        token_endpoint: args.auth_token_endpoint.as_deref(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = settings_from(&args)?;
    let store = match &settings.source {
        SourceSetting::Sqlite(store_path) => Some(EmbeddedStore::open(store_path)?),
        SourceSetting::Remote { .. } if !args.data.is_empty() || args.demo => {
            anyhow::bail!(
                "--data and --demo load the embedded store; FHIR_SOURCE names a FHIR server"
            )
        }
        SourceSetting::Remote { .. } => None,
    };
    if let Some(store) = &store {
        if !args.data.is_empty() && !import_files(store, &args.data)? {
            anyhow::bail!("some --data files could not be imported; nothing served");
        }
        if args.demo && store.stored_resources()? == 0 {
            let folder = PathBuf::from("./demo-data");
            let summary = fhir_export::generate::write_ndjson(
                fhir_export::generate::DEMO_PATIENTS,
                1,
                &folder,
            )?;
            println!("generated demo data: {summary}");
            import_files(store, &[folder])?;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (app, receiver) = App::open_local(settings)?;
        // Counted before the port opens: a client that connects is answered at once.
        let serving = match &store {
            Some(store) => format!("{} resources", store.stored_resources()?),
            None => format!("the FHIR server {}", args.store.source),
        };
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], args.port))).await?;
        let base = format!("http://{}", listener.local_addr()?);
        println!("fhir-export serving {serving} at {base}");
        println!("  kick off:  curl -i -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' '{base}/$export'");
        println!("  then poll the Content-Location URL it answers until 200 gives the manifest");
        println!("  or export with the client:  cargo run --release -- export {base} --out ./out");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve_local(app, receiver, listener, shutdown).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `handler view run` and `handler view test`.
fn view(command: ViewCommand) -> anyhow::Result<ExitCode> {
    use fhir_export::views::{files, suite, write::Format};
    match command {
        ViewCommand::Run {
            view,
            input,
            format,
            out,
        } => {
            let format = Format::parse(&format).ok_or_else(|| {
                anyhow::anyhow!("--format {format:?}: give csv, ndjson or parquet")
            })?;
            let mut writer: Box<dyn std::io::Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let summary = files::run_view_over_files(&view, &input, format, &mut writer)?;
            eprintln!(
                "{} resources read, {} rows written",
                summary.resources, summary.rows
            );
            Ok(ExitCode::SUCCESS)
        }
        ViewCommand::Test { dir, report } => {
            let outcomes = suite::run(&dir).map_err(|e| anyhow::anyhow!(e))?;
            for outcome in &outcomes {
                if let Some(failure) = &outcome.failure {
                    println!("failed: {} / {}: {failure}", outcome.file, outcome.name);
                }
            }
            let passed = outcomes.iter().filter(|o| o.failure.is_none()).count();
            println!("{passed} of {} cases pass", outcomes.len());
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_vec_pretty(&suite::report(&outcomes))?)?;
            }
            Ok(match passed == outcomes.len() {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(1),
            })
        }
    }
}

/// `handler deid check`: the configuration's verdict and ETag on stdout (exit 0 when valid, 2 when
/// refused); with `--input`, the de-identified resources on stdout (one line each) and the verdict
/// on stderr. Keys the configuration leaves empty are random, as in an export.
fn deid_check(
    config: &Path,
    input: Option<&Path>,
    today: Option<chrono::NaiveDate>,
) -> anyhow::Result<ExitCode> {
    use fhir_export::deid::{AnonymizationConfig, Engine, Keys};
    use std::io::Write;
    let bytes = std::fs::read(config)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", config.display()))?;
    let verdict = |text: String| match input {
        Some(_) => eprintln!("{text}"),
        None => println!("{text}"),
    };
    let parsed = match AnonymizationConfig::parse(&bytes) {
        Ok(parsed) => parsed,
        Err(error) => {
            verdict(format!("{}: refused: {error}", config.display()));
            return Ok(ExitCode::from(2));
        }
    };
    let etag = fhir_export::storage::local::etag_of(&bytes).0;
    verdict(format!(
        "{}: valid, {} rules; ETag in the local anonymization folder: {etag}",
        config.display(),
        parsed.rules.len()
    ));
    let Some(input) = input else {
        return Ok(ExitCode::SUCCESS);
    };
    let today = today.unwrap_or_else(|| chrono::Utc::now().date_naive());
    let engine = Engine::new(&parsed, Keys::for_export(&parsed), today)?;
    let text = std::fs::read(input)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", input.display()))?;
    // One resource (pretty-printed or not), or NDJSON.
    let resources: Vec<Vec<u8>> = match serde_json::from_slice::<serde_json::Value>(&text) {
        Ok(one) => vec![serde_json::to_vec(&one)?],
        Err(_) => text
            .split(|&b| b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    for (line, resource) in resources.iter().enumerate() {
        match engine.deidentify(resource) {
            Ok(bytes) => {
                out.write_all(&bytes)?;
                out.write_all(b"\n")?;
            }
            Err(error) => {
                failed += 1;
                eprintln!("resource {}: {error}", line + 1);
            }
        }
    }
    Ok(match failed {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}
