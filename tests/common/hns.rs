//! A hierarchical namespace (ADLS Gen2) in front of Azurite, which has none: a loopback proxy that
//! forwards every request and behaves as such an account does where it differs from a flat one.
//!
//! - Writing a blob at `a/b/c` creates the directories `a` and `a/b`; they stay when their
//!   contents are deleted.
//! - A flat List Blobs returns each directory as an entry of its own, with the metadata
//!   `hdi_isfolder=true` when metadata is asked for (`include=metadata`).
//! - Deleting a directory that still holds something answers `409 DirectoryIsNotEmpty`; deleting
//!   an empty one removes it.
//!
//! (From Microsoft's docs: "Blob Storage APIs on accounts with a hierarchical namespace" and the
//! Delete Blob reference, where a non-recursive delete of a non-empty directory fails with 409.)

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use warp::http::{HeaderMap, Method, Response, StatusCode};
use warp::Filter;

/// Starts the layer in front of the Azurite at `azurite_account_url`; returns the account URL to
/// use instead (same account name and SAS).
pub async fn start(azurite_account_url: &str) -> String {
    let upstream = azurite_account_url
        .split('?')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let origin = upstream.rsplit_once('/').unwrap().0.to_string();
    let account = upstream.rsplit('/').next().unwrap().to_string();
    let layer = Arc::new(Layer {
        origin,
        client: reqwest::Client::new(),
        directories: Mutex::new(BTreeSet::new()),
    });
    let routes = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .then(
            move |method, path: warp::path::FullPath, query, headers, body| {
                let layer = layer.clone();
                async move {
                    layer
                        .handle(method, path.as_str(), query, headers, body)
                        .await
                }
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    let sas = azurite_account_url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("http://{address}/{account}{sas}")
}

struct Layer {
    /// `http://127.0.0.1:{port}` of Azurite.
    origin: String,
    client: reqwest::Client,
    /// `container/dir/sub` of every directory.
    directories: Mutex<BTreeSet<String>>,
}

/// The query's parameters, in order.
fn params(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The SAS parameters of a query (what authorises a request of the layer's own).
fn sas_of(params: &[(String, String)]) -> Vec<(String, String)> {
    const SAS: [&str; 9] = ["sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr"];
    params
        .iter()
        .filter(|(k, _)| SAS.contains(&k.as_str()))
        .cloned()
        .collect()
}

impl Layer {
    async fn handle(
        &self,
        method: Method,
        path: &str,
        query: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response<Bytes> {
        // /{account}/{container}/{blob...}
        let mut segments = path.trim_start_matches('/').splitn(3, '/');
        let _account = segments.next();
        let container = segments.next().unwrap_or("").to_string();
        let blob = segments.next().map(|b| {
            percent_encoding::percent_decode_str(b)
                .decode_utf8_lossy()
                .into_owned()
        });
        let params = params(&query);
        let comp = param(&params, "comp");
        let restype = param(&params, "restype");

        if method == Method::DELETE && comp.is_none() {
            if let Some(blob) = &blob {
                let directory = format!("{container}/{blob}");
                if self.directories.lock().unwrap().contains(&directory) {
                    return self
                        .delete_directory(path, &container, blob, &directory, &params)
                        .await;
                }
            }
        }
        let answer = self.forward(&method, path, &query, &headers, body).await;
        let ok = answer.status().is_success();
        match (&method, &blob, comp, restype) {
            (&Method::PUT, Some(blob), None | Some("blocklist"), None) if ok => {
                let mut directories = self.directories.lock().unwrap();
                let mut parent = String::new();
                let parts: Vec<&str> = blob.split('/').collect();
                for part in &parts[..parts.len() - 1] {
                    if !parent.is_empty() {
                        parent.push('/');
                    }
                    parent.push_str(part);
                    directories.insert(format!("{container}/{parent}"));
                }
                answer
            }
            (&Method::DELETE, None, None, Some("container")) if ok => {
                self.directories
                    .lock()
                    .unwrap()
                    .retain(|d| !d.starts_with(&format!("{container}/")));
                answer
            }
            (&Method::GET, None, Some("list"), Some("container"))
                if answer.status() == StatusCode::OK =>
            {
                self.with_directories(answer, &container, &params)
            }
            _ => answer,
        }
    }

    async fn forward(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response<Bytes> {
        let url = match query.is_empty() {
            true => format!("{}{path}", self.origin),
            false => format!("{}{path}?{query}", self.origin),
        };
        let empty = body.is_empty();
        let mut request = self.client.request(method.clone(), url).body(body);
        if empty && method == Method::PUT {
            // Put Blob needs a length, even of nothing (reqwest sends none for an empty body).
            request = request.header("content-length", "0");
        }
        for (name, value) in headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        let answer = request.send().await.expect("Azurite answers");
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if name != "content-length" && name != "transfer-encoding" {
                response = response.header(name, value);
            }
        }
        let body = answer.bytes().await.unwrap_or_default();
        response.body(body).unwrap()
    }

    /// Deletes an empty directory, or answers 409 for one that holds a blob or a directory.
    async fn delete_directory(
        &self,
        path: &str,
        container: &str,
        blob: &str,
        directory: &str,
        params: &[(String, String)],
    ) -> Response<Bytes> {
        let holds_directory = self
            .directories
            .lock()
            .unwrap()
            .iter()
            .any(|d| d.starts_with(&format!("{directory}/")));
        let mut listing = sas_of(params);
        listing.extend([
            ("restype".into(), "container".into()),
            ("comp".into(), "list".into()),
            ("prefix".into(), format!("{blob}/")),
            ("maxresults".into(), "1".into()),
        ]);
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&listing)
            .finish();
        let account_path = path.split('/').take(2).collect::<Vec<_>>().join("/");
        let list_path = format!("{account_path}/{container}");
        let listed = self
            .forward(
                &Method::GET,
                &list_path,
                &query,
                &HeaderMap::new(),
                Bytes::new(),
            )
            .await;
        let holds_blob = String::from_utf8_lossy(listed.body()).contains("<Blob>");
        if holds_directory || holds_blob {
            return Response::builder()
                .status(StatusCode::CONFLICT)
                .header("x-ms-error-code", "DirectoryIsNotEmpty")
                .header("content-type", "application/xml")
                .body(Bytes::from_static(
                    b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>DirectoryIsNotEmpty</Code><Message>The recursive query parameter value must be true to delete a non-empty directory.</Message></Error>",
                ))
                .unwrap();
        }
        self.directories.lock().unwrap().remove(directory);
        Response::builder()
            .status(StatusCode::ACCEPTED)
            .header("x-ms-delete-type-permanent", "true")
            .body(Bytes::new())
            .unwrap()
    }

    /// A listing page with the directories it covers among its entries, in name order.
    fn with_directories(
        &self,
        answer: Response<Bytes>,
        container: &str,
        params: &[(String, String)],
    ) -> Response<Bytes> {
        let text = String::from_utf8_lossy(answer.body()).into_owned();
        let prefix = param(params, "prefix").unwrap_or("");
        let after = param(params, "marker").unwrap_or("");
        let with_metadata = param(params, "include").is_some_and(|i| i.contains("metadata"));
        let next_marker = between(&text, "<NextMarker>", "</NextMarker>").filter(|m| !m.is_empty());
        let (head, blobs, tail) = match text.find("<Blobs>") {
            Some(start) => {
                let end = text.find("</Blobs>").expect("closed Blobs");
                (
                    text[..start].to_string(),
                    text[start + 7..end].to_string(),
                    text[end + 8..].to_string(),
                )
            }
            None => {
                let start = text
                    .find("<Blobs />")
                    .or(text.find("<Blobs/>"))
                    .expect("Blobs");
                let close = text[start..].find("/>").unwrap() + start + 2;
                (
                    text[..start].to_string(),
                    String::new(),
                    text[close..].to_string(),
                )
            }
        };
        let mut entries: Vec<(String, String)> = blobs
            .split("</Blob>")
            .filter(|e| e.contains("<Name>"))
            .map(|e| {
                let element = format!("{}</Blob>", e.trim_start());
                (
                    between(&element, "<Name>", "</Name>").unwrap().to_string(),
                    element,
                )
            })
            .collect();
        let last_listed = entries.last().map(|(name, _)| name.clone());
        for directory in self.directories.lock().unwrap().iter() {
            let Some(name) = directory.strip_prefix(&format!("{container}/")) else {
                continue;
            };
            let in_page = name.starts_with(prefix)
                && name > after
                && match (&next_marker, &last_listed) {
                    (Some(_), Some(last)) => name <= last.as_str(),
                    _ => true,
                };
            if in_page {
                let metadata = match with_metadata {
                    true => "<Metadata><hdi_isfolder>true</hdi_isfolder></Metadata>",
                    false => "",
                };
                entries.push((
                    name.to_string(),
                    format!(
                        "<Blob><Name>{name}</Name><Properties><Last-Modified>Tue, 01 Dec 2026 00:00:00 GMT</Last-Modified><Etag>0x8DD00000000000</Etag><Content-Length>0</Content-Length><Content-Type>application/octet-stream</Content-Type><BlobType>BlockBlob</BlobType><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState><ServerEncrypted>true</ServerEncrypted></Properties>{metadata}</Blob>"
                    ),
                ));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let body: String = entries.into_iter().map(|(_, e)| e).collect();
        let text = format!("{head}<Blobs>{body}</Blobs>{tail}");
        let (parts, _) = answer.into_parts();
        Response::from_parts(parts, Bytes::from(text))
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}
