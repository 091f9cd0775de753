//! Custom-handler mode: the Functions host's invocation protocol.
//!
//! Functions with bindings other than plain HTTP arrive as `POST /{FunctionName}` carrying
//! `{Data, Metadata}` and are answered with `{Outputs, Logs, ReturnValue}`:
//! - `SystemExport`, `PatientExport`, `GroupExport` (and their `V4`s), `ViewExport`: HTTP kickoff; `Outputs.res` is the HTTP answer,
//!   `Outputs.shards` the job's planning message for the Service Bus output binding.
//! - `ShardWorker`: one Service Bus message: a job's planning (its shards go out as
//!   `Outputs.shards`) or one shard. A failed shard's retry waits in its state, not in the queue.
//! - `StaleSweeper`: the timer; shards silent too long, and retries come due, go out as
//!   `Outputs.shards`.
//!
//! Everything else (status, cancel, downloads, metadata) is forwarded raw HTTP and handled by
//! [`crate::http::dispatch`], the same code as the local server. A non-2xx answer to the host means
//! "retry this message"; it is given only when the work could not even be recorded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::export::{worker, Exports};
use crate::http::{dispatch, outcome_response, Api, ApiError, Request};
use crate::queue::{QueueClosed, WorkMessage, WorkQueue};

/// The output binding (Service Bus) every function sends shard messages through.
pub const SHARDS_OUTPUT: &str = "shards";
pub const SHARD_WORKER: &str = "ShardWorker";
pub const STALE_SWEEPER: &str = "StaleSweeper";
/// Kickoff functions and the route each serves.
pub const KICKOFF_FUNCTIONS: [(&str, &str); 7] = [
    ("SystemExport", "$export"),
    ("PatientExport", "Patient/$export"),
    ("GroupExport", "Group/{id}/$export"),
    ("SystemExportV4", "$export-v4"),
    ("PatientExportV4", "Patient/$export-v4"),
    ("GroupExportV4", "Group/{id}/$export-v4"),
    ("ViewExport", "$viewdefinition-export"),
];
/// Largest payload accepted from the host (a kickoff body is at most 1 MiB, encoded in JSON).
const MAX_PAYLOAD_BYTES: u64 = 8 << 20;

/// Collects the shard messages one invocation sends, for its output binding.
#[derive(Default)]
pub struct CollectingQueue {
    messages: Mutex<Vec<WorkMessage>>,
}

impl CollectingQueue {
    pub fn take(&self) -> Vec<WorkMessage> {
        std::mem::take(&mut self.messages.lock().expect("collected messages"))
    }
}

#[async_trait]
impl WorkQueue for CollectingQueue {
    async fn enqueue(&self, messages: Vec<WorkMessage>) -> Result<(), QueueClosed> {
        self.messages
            .lock()
            .expect("collected messages")
            .extend(messages);
        Ok(())
    }

    /// An output binding cannot hold a message back: the retry is left to the sweeper, which
    /// sends the shard once its state says the retry is due.
    async fn enqueue_later(&self, _: WorkMessage, _: Duration) -> Result<(), QueueClosed> {
        Ok(())
    }
}

/// The queue outside any invocation: forwarded HTTP requests never enqueue.
pub struct NoQueue;

#[async_trait]
impl WorkQueue for NoQueue {
    async fn enqueue(&self, _messages: Vec<WorkMessage>) -> Result<(), QueueClosed> {
        Err(QueueClosed)
    }

    async fn enqueue_later(&self, _: WorkMessage, _: Duration) -> Result<(), QueueClosed> {
        Err(QueueClosed)
    }
}

/// Serves the host on `listener` (bound to `FUNCTIONS_CUSTOMHANDLER_PORT`) until `shutdown`.
pub async fn serve_custom_handler(
    api: Api,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let invocations = {
        let api = api.clone();
        // The function name is checked before the body is read: any other POST goes on to the
        // forwarded routes with its body untouched.
        warp::post()
            .and(
                warp::path::param::<String>().and_then(|function: String| async move {
                    match is_invocation(&function) {
                        true => Ok(function),
                        false => Err(warp::reject::not_found()),
                    }
                }),
            )
            .and(warp::path::end())
            .and(warp::body::content_length_limit(MAX_PAYLOAD_BYTES))
            .and(warp::body::bytes())
            .then(move |function: String, body: Bytes| {
                let api = api.clone();
                async move { invoke(&api, &function, &body).await }
            })
    };
    // Kickoffs arrive as invocations of their functions (which carry the Service Bus output);
    // a raw request for one on this port has no queue to send its shards to.
    let raw_kickoff = warp::path::full().and_then(|path: warp::path::FullPath| async move {
            let last = path.as_str().rsplit('/').next().unwrap_or_default();
            let last = percent_encoding::percent_decode_str(last).decode_utf8_lossy();
            let is_kickoff = KICKOFF_FUNCTIONS
                .iter()
                .any(|(_, route)| route.rsplit('/').next() == Some(last.as_ref()));
            match is_kickoff {
                true => Ok(outcome_response(&ApiError::not_found(
                    "a kickoff reaches this handler as an invocation of its function (SystemExport, PatientExport, GroupExport, their V4s, ViewExport), not as a forwarded request",
                ))),
                false => Err(warp::reject::not_found()),
            }
        });
    // The host waits for any answer on the port before it sends work.
    let ready = warp::path::end()
        .and(warp::get().or(warp::head()).unify())
        .map(|| warp::reply::json(&json!({ "status": "ready" })).into_response());
    let forwarded = crate::http::routes(api);
    let routes = invocations
        .or(ready)
        .unify()
        .or(raw_kickoff)
        .unify()
        .or(forwarded)
        .unify();
    crate::http::server::serve(routes, listener, Default::default(), shutdown).await;
}

fn is_invocation(function: &str) -> bool {
    function == SHARD_WORKER
        || function == STALE_SWEEPER
        || KICKOFF_FUNCTIONS.iter().any(|(name, _)| *name == function)
}

/// Runs one invocation; the answer is always an invocation response, its status says whether to retry.
pub async fn invoke(api: &Api, function: &str, payload: &[u8]) -> Response {
    let payload: Value = match serde_json::from_slice(payload) {
        Ok(value) => value,
        Err(error) => {
            let message = format!("{function}: the invocation payload is not JSON: {error}");
            tracing::error!(function, %error, "unreadable invocation payload");
            return invocation_response(StatusCode::OK, Map::new(), vec![message]);
        }
    };
    let queue = Arc::new(CollectingQueue::default());
    let scoped = Api {
        exports: api.exports.with_queue(queue.clone()),
        ..api.clone()
    };
    let mut outputs = Map::new();
    let mut logs = Vec::new();
    let mut status = StatusCode::OK;
    if function == SHARD_WORKER {
        status = run_shard(&scoped.exports, &payload, &mut logs).await;
    } else if function == STALE_SWEEPER {
        status = sweep(&scoped.exports, &mut logs).await;
    } else {
        let request = http_request(&payload, function);
        let response = match request {
            Ok(request) => dispatch(&scoped, request)
                .await
                .unwrap_or_else(|error| outcome_response(&error)),
            Err(error) => outcome_response(&error),
        };
        logs.push(format!(
            "{function}: answered {}",
            response.status().as_u16()
        ));
        outputs.insert("res".into(), http_output(response).await);
    }
    let messages = queue.take();
    if !messages.is_empty() {
        logs.push(format!(
            "{function}: sent {} shard message(s)",
            messages.len()
        ));
    }
    outputs.insert(
        SHARDS_OUTPUT.into(),
        serde_json::to_value(messages).expect("messages serialise"),
    );
    invocation_response(status, outputs, logs)
}

fn invocation_response(
    status: StatusCode,
    outputs: Map<String, Value>,
    logs: Vec<String>,
) -> Response {
    let body = json!({ "Outputs": outputs, "Logs": logs, "ReturnValue": null });
    let mut response = warp::reply::json(&body).into_response();
    *response.status_mut() = status;
    response
}

/// `Data.<name>`, or the only entry of `Data`.
fn trigger_data<'a>(payload: &'a Value, name: &str) -> Option<&'a Value> {
    let data = payload.get("Data")?.as_object()?;
    data.get(name)
        .or_else(|| (data.len() == 1).then(|| data.values().next()).flatten())
}

/// A string that holds JSON (perhaps JSON-encoded once more) becomes that JSON.
fn unwrap_json(value: &Value) -> Value {
    let mut value = value.clone();
    for _ in 0..2 {
        match &value {
            Value::String(text) => match serde_json::from_str::<Value>(text) {
                Ok(inner) => value = inner,
                Err(_) => break,
            },
            _ => break,
        }
    }
    value
}

fn metadata_number(payload: &Value, name: &str) -> Option<u64> {
    let value = payload.get("Metadata")?.get(name)?;
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

async fn run_shard(exports: &Exports, payload: &Value, logs: &mut Vec<String>) -> StatusCode {
    let delivery = metadata_number(payload, "DeliveryCount").unwrap_or(1);
    let message = trigger_data(payload, "message")
        .map(unwrap_json)
        .and_then(|value| serde_json::from_value::<WorkMessage>(value).ok());
    let Some(message) = message else {
        // Redelivering a message that cannot be read would never help.
        logs.push("ShardWorker: the message is not a shard message; dropped".into());
        tracing::error!(payload = %payload, "unreadable shard message dropped");
        return StatusCode::OK;
    };
    let work = match message.shard {
        Some(shard) => format!("shard {shard}"),
        None => "planning".to_string(),
    };
    logs.push(format!(
        "ShardWorker: job {} {work} (delivery {delivery})",
        message.job_id
    ));
    if !crate::export::jobs::is_job_id(&message.job_id) {
        logs.push(format!(
            "ShardWorker: {:?} is not a job id; message dropped",
            message.job_id
        ));
        tracing::error!(job_id = %message.job_id, "shard message for no possible job dropped");
        return StatusCode::OK;
    }
    match worker::handle_message(exports, &message).await {
        Ok(()) => StatusCode::OK,
        Err(error) => {
            logs.push(format!(
                "ShardWorker: could not record the shard's state, retry: {error}"
            ));
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

async fn sweep(exports: &Exports, logs: &mut Vec<String>) -> StatusCode {
    match exports.sweep_stale().await {
        Ok(report) => logs.push(format!("StaleSweeper: {report}")),
        Err(error) => {
            logs.push(format!("StaleSweeper: {error}"));
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    match exports.remove_expired().await {
        Ok(removed) => logs.push(format!("StaleSweeper: removed {removed} expired export(s)")),
        Err(error) => logs.push(format!(
            "StaleSweeper: could not remove expired exports: {error}"
        )),
    }
    StatusCode::OK
}

/// The HTTP request inside a kickoff payload (`Data.req`), read defensively.
fn http_request(payload: &Value, function: &str) -> Result<Request, ApiError> {
    let invalid = |what: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            crate::fhir::IssueType::Invalid,
            format!("{function}: the host sent no {what}"),
        )
    };
    let req = trigger_data(payload, "req").ok_or_else(|| invalid("request (Data.req)"))?;
    let req = unwrap_json(req);
    let field = |name: &str| {
        req.as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v)
    };
    let method = field("Method")
        .and_then(Value::as_str)
        .and_then(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
        .ok_or_else(|| invalid("request method"))?;

    let mut headers = headers_of(field("Headers").map(unwrap_json));
    let url = field("Url")
        .and_then(Value::as_str)
        .and_then(|u| azure_core::http::Url::parse(u).ok());
    let (path, query) = match &url {
        Some(url) => {
            // The public address the client used, for Content-Location and the manifest.
            set_public_host(&mut headers, url);
            (
                url.path().to_string(),
                url.query().unwrap_or_default().to_string(),
            )
        }
        None => (
            route_path(function, field("Params")),
            query_from_map(field("Query").map(unwrap_json)),
        ),
    };
    let body = match field("Body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(text)) => Bytes::from(text.clone()),
        Some(other) => Bytes::from(other.to_string()),
    };
    if body.len() > crate::http::MAX_BODY_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::fhir::IssueType::Invalid,
            format!(
                "request body larger than {} bytes",
                crate::http::MAX_BODY_BYTES
            ),
        ));
    }
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// The request headers the host sent (`{name: value}` or `{name: [values]}`); unreadable ones are
/// left out.
fn headers_of(sent: Option<Value>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Some(Value::Object(map)) = sent else {
        return headers;
    };
    for (name, values) in map {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let values = match values {
            Value::Array(values) => values,
            other => vec![other],
        };
        for value in values.iter().filter_map(Value::as_str) {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.append(name.clone(), value);
            }
        }
    }
    headers
}

/// `Host` and `X-Forwarded-Proto` from the URL the client called.
fn set_public_host(headers: &mut HeaderMap, url: &azure_core::http::Url) {
    let Some(host) = url.host_str() else {
        return;
    };
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&host) {
        headers.insert(warp::http::header::HOST, value);
    }
    let scheme = match url.scheme() {
        "https" => "https",
        _ => "http",
    };
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(scheme),
    );
}

/// The kickoff path from the function's route and its parameters, when the host gave no URL.
fn route_path(function: &str, params: Option<&Value>) -> String {
    let route = KICKOFF_FUNCTIONS
        .iter()
        .find(|(name, _)| *name == function)
        .map_or("$export", |(_, route)| route);
    let id = params
        .and_then(|p| p.get("id"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let id = percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
    format!("/{}", route.replace("{id}", &id.to_string()))
}

fn query_from_map(query: Option<Value>) -> String {
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    if let Some(Value::Object(map)) = query {
        for (name, value) in map {
            match value {
                Value::String(text) => {
                    encoded.append_pair(&name, &text);
                }
                Value::Array(items) => {
                    for item in items.iter().filter_map(Value::as_str) {
                        encoded.append_pair(&name, item);
                    }
                }
                _ => {}
            }
        }
    }
    encoded.finish()
}

/// An HTTP answer as the `res` output binding takes it.
async fn http_output(response: Response) -> Value {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let headers: Map<String, Value> = parts
        .headers
        .iter()
        .filter(|(name, _)| *name != warp::http::header::CONTENT_LENGTH)
        .filter_map(|(name, value)| Some((name.to_string(), Value::from(value.to_str().ok()?))))
        .collect();
    json!({
        "statusCode": parts.status.as_u16(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    })
}
