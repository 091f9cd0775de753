//! Hostile input: a matrix of bad requests sent as raw bytes over a socket (so no client library
//! tidies a path or a header), each answered by a 4xx OperationOutcome naming the problem, never a
//! 5xx; and properties of the parameter, `_typeFilter` and Parameters-body parsers over generated
//! input (run briefly here; `cargo bench --bench fuzz` runs them long).

mod common;
mod properties;

use common::{sample_store, start};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// Sends one request as written and reads the whole answer (`Connection: close`).
async fn raw(
    address: &str,
    method: &str,
    target: &[u8],
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Answer {
    let mut request = Vec::new();
    request.extend_from_slice(method.as_bytes());
    request.push(b' ');
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    request.extend_from_slice(address.as_bytes());
    request.extend_from_slice(b"\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.extend_from_slice(name.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut body = answer[split + 4..].to_vec();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body);
    }
    Answer {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 4 + size..];
    }
    out
}

const ACCEPT: (&str, &[u8]) = ("Accept", b"application/fhir+json");
const PREFER: (&str, &[u8]) = ("Prefer", b"respond-async");
const KICKOFF: &[(&str, &[u8])] = &[ACCEPT, PREFER];

struct Case {
    method: &'static str,
    target: Vec<u8>,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    status: u16,
    /// Words the OperationOutcome's text must hold (the parameter or header it is about).
    names: &'static str,
}

fn case(
    method: &'static str,
    target: impl AsRef<[u8]>,
    headers: &[(&'static str, &[u8])],
    status: u16,
    names: &'static str,
) -> Case {
    Case {
        method,
        target: target.as_ref().to_vec(),
        headers: headers.iter().map(|(n, v)| (*n, v.to_vec())).collect(),
        body: Vec::new(),
        status,
        names,
    }
}

/// A GET kickoff with this query.
fn get(query: impl AsRef<[u8]>, status: u16, names: &'static str) -> Case {
    let mut target = b"/$export?".to_vec();
    target.extend_from_slice(query.as_ref());
    case("GET", target, KICKOFF, status, names)
}

/// A POST kickoff at `path` with this body.
fn post(path: &str, body: impl AsRef<[u8]>, status: u16, names: &'static str) -> Case {
    Case {
        body: body.as_ref().to_vec(),
        headers: vec![
            ("Accept", b"application/fhir+json".to_vec()),
            ("Prefer", b"respond-async".to_vec()),
            ("Content-Type", b"application/fhir+json".to_vec()),
        ],
        ..case("POST", path, &[], status, names)
    }
}

fn parameters(parameter: &str) -> String {
    format!(r#"{{"resourceType":"Parameters","parameter":[{parameter}]}}"#)
}

fn matrix() -> Vec<Case> {
    let long = "A".repeat(16_000);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    vec![
        // Headers.
        case("GET", "/$export", &[ACCEPT], 400, "Prefer"),
        case("GET", "/$export", &[PREFER], 400, "Accept"),
        case(
            "GET",
            "/$export",
            &[("Accept", b"text/html"), PREFER],
            400,
            "Accept",
        ),
        case(
            "GET",
            "/$export",
            &[ACCEPT, ("Prefer", b"respond-sync")],
            400,
            "Prefer",
        ),
        case(
            "GET",
            "/$export",
            &[ACCEPT, ("Prefer", b"handling=lenient")],
            400,
            "Prefer",
        ),
        case(
            "GET",
            "/$export",
            &[ACCEPT, ("Prefer", b"respond-async\xff\xfe")],
            400,
            "Prefer",
        ),
        case(
            "GET",
            "/$export",
            &[("Accept", b"application/fhir+json\xc3\x28"), PREFER],
            400,
            "Accept",
        ),
        case(
            "GET",
            "/$export",
            &[("Accept", long.as_bytes()), PREFER],
            400,
            "Accept",
        ),
        // _type
        get("_type=Unicorn", 400, "_type"),
        get("_type=patient", 400, "_type"),
        get("_type=", 400, "_type"),
        get("_type=Patient,,Observation", 400, "_type"),
        get(format!("_type={long}"), 400, "_type"),
        get("_type=Patient%00", 400, "_type"),
        get("_type=%F0%9F%92%A9", 400, "_type"),
        get("_type=Pat%ient", 400, "_type"),
        // _since, _until, _till
        get("_since=yesterday", 400, "_since"),
        get("_since=2020-13-45T00:00:00Z", 400, "_since"),
        get("_since=2020-01-01", 400, "_since"),
        get("_since=2020-01-01T00:00:00", 400, "_since"),
        get("_since=9999-01-01T00:00:00Z", 400, "_since"),
        get("_since=%FF%FE", 400, "_since"),
        get("_until=never", 400, "_until"),
        get(
            "_since=2021-01-01T00:00:00Z&_until=2020-01-01T00:00:00Z",
            400,
            "_until",
        ),
        get("_till=soon", 400, "_till"),
        get(
            "_until=2020-01-01T00:00:00Z&_till=2021-01-01T00:00:00Z",
            400,
            "_till",
        ),
        // _outputFormat
        get("_outputFormat=text/csv", 400, "_outputFormat"),
        get("_outputFormat=", 400, "_outputFormat"),
        get(
            "_outputFormat=application%2Ffhir%2Bjson",
            400,
            "_outputFormat",
        ),
        // _typeFilter
        get("_typeFilter=Patient%3Fbogus%3D1", 400, "_typeFilter"),
        get("_typeFilter=Unicorn%3Fx%3D1", 400, "_typeFilter"),
        get("_typeFilter=Observation", 400, "_typeFilter"),
        get("_typeFilter=Observation%3Fcode%3D", 400, "_typeFilter"),
        get(
            "_typeFilter=Observation%3F_lastUpdated%3Dnotadate",
            400,
            "_typeFilter",
        ),
        get(
            "_typeFilter=Observation%3Fcode%3Amadeup%3D1",
            400,
            "_typeFilter",
        ),
        get(
            "_typeFilter=Observation%3Fdate%3Dxx2020",
            400,
            "_typeFilter",
        ),
        get(
            format!("_typeFilter=Observation%3F{long}%3D1"),
            400,
            "_typeFilter",
        ),
        get(
            "_typeFilter=Observation%3Fcode%3Aexact%3D1",
            400,
            "_typeFilter",
        ),
        // _elements
        get("_elements=bad..element", 400, "_elements"),
        get("_elements=Unicorn.name", 400, "_elements"),
        get("_elements=na%20me", 400, "_elements"),
        // patient, includeAssociatedData
        get("patient=Patient/1", 400, "patient"),
        get("includeAssociatedData=bogus", 400, "includeAssociatedData"),
        get(
            "includeAssociatedData=LatestProvenanceResources",
            400,
            "includeAssociatedData",
        ),
        get(
            "includeAssociatedData=_history,_deleted&_typeFilter=Patient%3Factive%3Dtrue",
            400,
            "_typeFilter",
        ),
        // _container: path tricks and invalid names
        get("_container=..%2F..%2Fetc", 400, "_container"),
        get("_container=fhir-export-jobs", 400, "_container"),
        get("_container=UPPER", 400, "_container"),
        get("_container=ab", 400, "_container"),
        get(format!("_container={}", "a".repeat(64)), 400, "_container"),
        get("_container=a--b", 400, "_container"),
        get("_container=%00abc", 400, "_container"),
        get("_container=con%2Ftainer", 400, "_container"),
        get("_container=%E2%82%ACuro", 400, "_container"),
        get("_container=.staging", 400, "_container"),
        get("_container=abc&_container=def", 400, "_container"),
        // Unknown parameters
        get("bogus=1", 400, "bogus"),
        get("_count=10", 400, "_count"),
        get("%F0%9F%92%A9=1", 400, "\u{1F4A9}"),
        // Ids and paths
        case("GET", "/Group/%2E%2E/$export", KICKOFF, 404, "Group"),
        case("GET", "/Group/%00/$export", KICKOFF, 404, "Group"),
        case(
            "GET",
            format!("/Group/{}/$export", "g".repeat(300)),
            KICKOFF,
            404,
            "Group",
        ),
        case(
            "GET",
            "/Group/unknown-group/$export",
            KICKOFF,
            404,
            "unknown-group",
        ),
        case(
            "GET",
            "/_operations/export/..%2F..%2Fetc%2Fpasswd",
            &[],
            404,
            "no export",
        ),
        case(
            "GET",
            "/_operations/export/not-an-id",
            &[],
            404,
            "no export",
        ),
        case(
            "GET",
            "/_operations/export/0123456789abcdef0123456789abcdef",
            &[],
            404,
            "no export",
        ),
        case(
            "DELETE",
            "/_operations/export/0123456789abcdef0123456789abcdef",
            &[],
            404,
            "no export",
        ),
        case(
            "GET",
            "/_exports/..%2F..%2Fetc%2Fpasswd",
            &[],
            404,
            "no export file",
        ),
        case(
            "GET",
            "/_exports/fhir-export-jobs/x/job.json",
            &[],
            404,
            "no export file",
        ),
        case(
            "GET",
            "/_exports/.staging/x.ndjson",
            &[],
            404,
            "no export file",
        ),
        case(
            "GET",
            "/_exports/a/../../b.ndjson",
            &[],
            404,
            "no export file",
        ),
        case("GET", "/_exports/a/b.txt", &[], 404, "no export file"),
        case("GET", "/Patient/%2E%2E", &[], 404, "Patient"),
        case("GET", "/Patient/%E2%82%AC", &[], 404, "Patient"),
        case("GET", "/Unicorn", &[], 404, "no such endpoint"),
        case("GET", "/Patient?_count=0", &[], 400, "_count"),
        case("GET", "/Patient?_count=abc", &[], 400, "_count"),
        case("GET", "/Patient?_count=100000", &[], 400, "_count"),
        case("GET", "/Patient?unknown=1", &[], 400, "unknown"),
        case("GET", "/Patient?_cursor=a%20b", &[], 400, "_cursor"),
        case("GET", "/Patient?_lastUpdated=xx", &[], 400, "_lastUpdated"),
        // Wrong methods
        case("PUT", "/$export", KICKOFF, 405, "GET or POST"),
        case("DELETE", "/$export", KICKOFF, 405, "GET or POST"),
        case("PATCH", "/metadata", &[], 405, "GET"),
        case(
            "POST",
            "/_operations/export/0123456789abcdef0123456789abcdef",
            &[],
            405,
            "GET or DELETE",
        ),
        case("DELETE", "/_exports/a/b.ndjson", &[], 405, "GET"),
        case("POST", "/Patient", &[], 405, "GET"),
        // POST bodies
        post("/$export", "not json", 400, "not JSON"),
        post(
            "/$export",
            r#"{"resourceType":"Patient"}"#,
            400,
            "Parameters",
        ),
        post(
            "/$export",
            r#"{"resourceType":"Parameters","parameter":{}}"#,
            400,
            "array",
        ),
        post(
            "/$export",
            parameters(r#"{"name":"bogus","valueString":"x"}"#),
            400,
            "bogus",
        ),
        post(
            "/$export",
            parameters(r#"{"name":"_type","valueInteger":7}"#),
            400,
            "_type",
        ),
        post("/$export", parameters(r#"{"name":"_type"}"#), 400, "_type"),
        post(
            "/$export",
            parameters(r#"{"valueString":"Patient"}"#),
            400,
            "no name",
        ),
        post(
            "/$export",
            parameters(r#"{"name":"_type","resource":{"resourceType":"Patient"}}"#),
            400,
            "_type",
        ),
        post(
            "/$export",
            parameters(r#"{"name":"_since","valueString":"x","valueInstant":"y"}"#),
            400,
            "_since",
        ),
        post("/$export", &deep, 400, "not JSON"),
        post(
            "/$export",
            parameters(&format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))),
            400,
            "not JSON",
        ),
        post(
            "/Patient/$export",
            parameters(&format!(
                r#"{{"name":"patient","resource":{}1{}}}"#,
                r#"{"a":"#.repeat(100_000),
                "}".repeat(100_000)
            )),
            400,
            "not JSON",
        ),
        post(
            "/$export",
            b"{\"resourceType\":\"Parameters\xff\"}",
            400,
            "not JSON",
        ),
        post("/$export", "x".repeat(2 << 20), 413, "larger than"),
        post(
            "/Patient/$export",
            parameters(r#"{"name":"patient","valueReference":{"reference":"Observation/1"}}"#),
            400,
            "patient",
        ),
        post(
            "/Patient/$export",
            parameters(r#"{"name":"patient","valueReference":{}}"#),
            400,
            "patient",
        ),
        post(
            "/Patient/$export",
            parameters(r#"{"name":"patient","valueReference":{"reference":"Patient/../../x"}}"#),
            400,
            "patient",
        ),
        post(
            "/$export?_type=Patient",
            parameters(r#"{"name":"_type","valueString":"Patient"}"#),
            400,
            "query string",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_4xx_operation_outcome_naming_the_problem() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let address = server.base.trim_start_matches("http://").to_string();
    let cases = matrix();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let headers: Vec<(&str, &[u8])> = case
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_slice()))
            .collect();
        let answer = raw(&address, case.method, &case.target, &headers, &case.body).await;
        let label = format!(
            "{} {}",
            case.method,
            String::from_utf8_lossy(&case.target[..case.target.len().min(80)])
        );
        let outcome: Option<Value> = serde_json::from_slice(&answer.body).ok();
        let text = outcome.as_ref().map(Value::to_string).unwrap_or_default();
        let is_outcome = outcome
            .as_ref()
            .is_some_and(|o| o["resourceType"] == "OperationOutcome");
        if answer.status != case.status
            || answer.status >= 500
            || !is_outcome
            || answer.content_type != "application/fhir+json"
            || !text.contains(case.names)
        {
            failures.push(format!(
                "{label}: wanted {} naming {:?}, got {} {} {}",
                case.status,
                case.names,
                answer.status,
                answer.content_type,
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // And the service still works.
    let manifest = common::export(
        &common::client(),
        &format!("{}/$export?_type=Patient", server.base),
    )
    .await;
    assert_eq!(manifest["output"][0]["count"], 100);
}

#[test]
fn parsers_hold_their_properties_over_generated_input() {
    properties::run_all(2_000);
}

/// Reads until the status line of an answer has arrived; the status, or `None` when the server
/// closed the connection first.
async fn status_line(stream: &mut tokio::net::TcpStream) -> Option<u16> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 1024];
    while !seen.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
        }
    }
    std::str::from_utf8(&seen)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Unauthenticated, silent, idle and slow clients are bounded: a bad token is answered before a
/// byte of the body is read; connections past the cap wait their turn, and one that sends no
/// headers (or nothing after its answer) is closed after the header deadline; a body that does not
/// arrive in time is a 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_unauthenticated_clients_are_bounded() {
    use fhir_export::app::App;
    use fhir_export::auth::AuthSetting;
    use fhir_export::config::{Settings, SourceSetting, StorageSetting};
    use fhir_export::http::server::{serve, Limits};
    use std::time::{Duration, Instant};

    let (issuer, _) = common::tokens::issuer().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        source: SourceSetting::Sqlite(sample_store()),
        storage: StorageSetting::Folder(dir.path().join("exports")),
        auth: Some(AuthSetting {
            issuer,
            audiences: vec![common::tokens::AUDIENCE.into()],
            jwks_url: None,
            token_endpoint: None,
        }),
        ..Settings::default()
    };
    let (app, _queue) = App::open_local(settings).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let limits = Limits {
        max_connections: 8,
        header_timeout: Duration::from_secs(1),
    };
    tokio::spawn(serve(
        fhir_export::http::routes(app.api),
        listener,
        limits,
        std::future::pending(),
    ));
    let connect = || tokio::net::TcpStream::connect(address.clone());

    // A 1 MiB body without a token: the 401 comes after the headers, the body never sent.
    let mut unauthenticated = Vec::new();
    for _ in 0..4 {
        let mut stream = connect().await.unwrap();
        let head = format!(
            "POST /$export HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/fhir+json\r\nContent-Length: 1048576\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        unauthenticated.push(stream);
    }
    for stream in &mut unauthenticated {
        let answered = tokio::time::timeout(Duration::from_secs(5), status_line(stream)).await;
        assert_eq!(answered.ok().flatten(), Some(401));
    }
    drop(unauthenticated);

    // Twice the cap of silent connections: each is closed after the header deadline, and a client
    // arriving behind them is served once they are.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(connect().await.unwrap());
    }
    let client = common::client();
    let metadata = client
        .get(format!("http://{address}/metadata"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served once the silent connections are closed");
    assert_eq!(metadata.status(), 200);
    for stream in &mut silent {
        let closed = tokio::time::timeout(Duration::from_secs(5), status_line(stream)).await;
        assert!(matches!(closed, Ok(None) | Ok(Some(408))), "{closed:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // Idle after an answer: closed after the header deadline too.
    let mut idle = connect().await.unwrap();
    let request = format!("GET /metadata HTTP/1.1\r\nHost: {address}\r\n\r\n");
    idle.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(status_line(&mut idle).await, Some(200));
    let mut rest = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(drained.is_ok(), "an idle connection is closed");
}

/// A body that stops halfway is answered 408 after the body deadline, and its slot freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_halfway_is_a_408() {
    let server = start(&sample_store(), |_| {}).await;
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /$export HTTP/1.1\r\nHost: {address}\r\nPrefer: respond-async\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{{\"resourceType\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let deadline = fhir_export::http::BODY_TIMEOUT + std::time::Duration::from_secs(5);
    let answered = tokio::time::timeout(deadline, status_line(&mut stream)).await;
    assert_eq!(answered.ok().flatten(), Some(408));
}

/// A client that waits for `100 Continue` with a declared body over the limit gets its 413 at
/// once, never `100 Continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_declared_body_is_a_413_before_any_100_continue() {
    let server = start(&sample_store(), |_| {}).await;
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /$export HTTP/1.1\r\nHost: {address}\r\nAccept: application/fhir+json\r\nPrefer: respond-async\r\nContent-Type: application/fhir+json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        fhir_export::http::MAX_BODY_BYTES + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answered =
        tokio::time::timeout(std::time::Duration::from_secs(5), status_line(&mut stream)).await;
    assert_eq!(answered.ok().flatten(), Some(413));
    // Within the limit, the client is told to go on and its body is read.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let body =
        r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"}]}"#;
    let head = format!(
        "POST /$export HTTP/1.1\r\nHost: {address}\r\nAccept: application/fhir+json\r\nPrefer: respond-async\r\nContent-Type: application/fhir+json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(status_line(&mut stream).await, Some(100));
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("HTTP/1.1 202") {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..n]);
    }
}

/// Headers over the limit are a 431 every time, however their bytes arrive; headers within it are
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_a_431_every_time() {
    let server = start(&sample_store(), |_| {}).await;
    let address = server.base.trim_start_matches("http://").to_string();
    let limit = fhir_export::http::MAX_HEAD_BYTES;
    for (size, in_pieces) in [
        (500_000, false),
        (500_000, true),
        (limit + 10, false),
        (2 * limit, true),
        (3 * limit / 2, false),
    ] {
        for _ in 0..4 {
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let head = format!(
                "GET /metadata HTTP/1.1\r\nHost: {address}\r\nX-Big: {}\r\n\r\n",
                "a".repeat(size)
            );
            match in_pieces {
                true => {
                    for piece in head.as_bytes().chunks(7_000) {
                        if stream.write_all(piece).await.is_err() {
                            break;
                        }
                    }
                }
                false => {
                    let _ = stream.write_all(head.as_bytes()).await;
                }
            }
            assert_eq!(status_line(&mut stream).await, Some(431), "{size} bytes");
        }
    }
    let answer = raw(
        &address,
        "GET",
        b"/metadata",
        &[("X-Big", "a".repeat(limit - 1_000).as_bytes())],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200);
}
