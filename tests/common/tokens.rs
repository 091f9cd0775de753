//! A token issuer on loopback for the access-control tests: OpenID discovery, a JWKS, a SMART
//! Backend Services token endpoint, and tokens signed with the test-only keys in `tests/fixtures`
//! (made for these tests, used nowhere else).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use warp::Filter;

pub const AUDIENCE: &str = "api://fhir-export";
pub const SIGNING_KEY: &[u8] = include_bytes!("../fixtures/jwt-signing-key.pem");
pub const OTHER_KEY: &[u8] = include_bytes!("../fixtures/jwt-other-key.pem");
pub const JWKS: &str = include_str!("../fixtures/jwks.json");
/// The one client the token endpoint knows; its public key is the JWKS's `test-key-1`, so it signs
/// its client assertions with `SIGNING_KEY` (one key pair serves both roles in these tests).
pub const BACKEND_CLIENT: &str = "bulk-backend-client";

/// An OpenID issuer serving discovery, its key set and a token endpoint; counts key-set fetches.
pub async fn issuer() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let fetches = Arc::new(AtomicU64::new(0));
    let discovery = {
        let base = base.clone();
        warp::path!(".well-known" / "openid-configuration").map(move || {
            warp::reply::json(&json!({
                "issuer": base,
                "jwks_uri": format!("{base}/keys"),
                "token_endpoint": format!("{base}/token"),
            }))
        })
    };
    let token_endpoint = {
        let base = base.clone();
        warp::path!("token")
            .and(warp::post())
            .and(warp::header::optional::<String>("content-type"))
            .and(warp::body::bytes())
            .map(move |content_type: Option<String>, body: bytes::Bytes| {
                let (status, answer) = issue_backend_token(&base, content_type.as_deref(), &body);
                warp::reply::with_status(warp::reply::json(&answer), status)
            })
    };
    let keys = {
        let fetches = fetches.clone();
        warp::path!("keys").map(move || {
            fetches.fetch_add(1, Ordering::SeqCst);
            warp::reply::with_header(JWKS, "content-type", "application/json")
        })
    };
    tokio::spawn(
        warp::serve(discovery.or(keys).or(token_endpoint))
            .incoming(listener)
            .run(),
    );
    (base, fetches)
}

/// SMART Backend Services: `client_credentials` with a `private_key_jwt` assertion (RS384 or
/// RS256) from the known client, for its token endpoint; read scopes only.
fn issue_backend_token(
    issuer: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (warp::http::StatusCode, Value) {
    use warp::http::StatusCode;
    let refuse = |error: &str, why: &str| {
        (
            StatusCode::BAD_REQUEST,
            json!({"error": error, "error_description": why}),
        )
    };
    if content_type != Some("application/x-www-form-urlencoded") {
        return refuse("invalid_request", "POST application/x-www-form-urlencoded");
    }
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials" {
        return refuse("unsupported_grant_type", "only client_credentials");
    }
    if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return refuse("invalid_client", "client_assertion_type must be jwt-bearer");
    }
    let keys: jsonwebtoken::jwk::JwkSet = serde_json::from_str(JWKS).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&keys.keys[0]).unwrap();
    let mut validation = jsonwebtoken::Validation::new(Algorithm::RS384);
    validation.algorithms = vec![Algorithm::RS384, Algorithm::RS256];
    validation.set_audience(&[format!("{issuer}/token")]);
    validation.set_issuer(&[BACKEND_CLIENT]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let assertion =
        match jsonwebtoken::decode::<Value>(field("client_assertion"), &key, &validation) {
            Ok(assertion) => assertion.claims,
            Err(e) => return refuse("invalid_client", &format!("client_assertion: {e}")),
        };
    if assertion["sub"] != BACKEND_CLIENT {
        return refuse("invalid_client", "sub must be the client id");
    }
    let scope = field("scope");
    let reads = |s: &str| s.starts_with("system/") && (s.ends_with(".read") || s.ends_with(".rs"));
    if scope.is_empty() || !scope.split_whitespace().all(reads) {
        return refuse("invalid_scope", "ask for system read scopes");
    }
    let access_token = token(issuer, json!({"azp": BACKEND_CLIENT, "scope": scope}));
    (
        StatusCode::OK,
        json!({"access_token": access_token, "token_type": "bearer", "expires_in": 300, "scope": scope}),
    )
}

/// What a SMART backend client sends to `token_endpoint` for `scope`.
pub fn client_credentials_form(token_endpoint: &str, scope: &str) -> String {
    let mut header = Header::new(Algorithm::RS384);
    header.kid = Some("test-key-1".into());
    let assertion = jsonwebtoken::encode(
        &header,
        &json!({
            "iss": BACKEND_CLIENT,
            "sub": BACKEND_CLIENT,
            "aud": token_endpoint,
            "exp": now() + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
        }),
        &EncodingKey::from_rsa_pem(SIGNING_KEY).unwrap(),
    )
    .unwrap();
    form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("scope", scope)
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", &assertion)
        .finish()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A token with `claims` over the defaults (valid for an hour, client `client-a`, all reads).
pub fn token_with(issuer: &str, claims: Value, key: &[u8], kid: Option<&str>) -> String {
    let mut body = json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "exp": now() + 3600,
        "iat": now(),
        "azp": "client-a",
        "scope": "system/*.read",
    });
    for (name, value) in claims.as_object().unwrap() {
        if value.is_null() {
            body.as_object_mut().unwrap().remove(name);
        } else {
            body[name] = value.clone();
        }
    }
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &body, &EncodingKey::from_rsa_pem(key).unwrap()).unwrap()
}

pub fn token(issuer: &str, claims: Value) -> String {
    token_with(issuer, claims, SIGNING_KEY, Some("test-key-1"))
}
