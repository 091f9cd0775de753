//! A token issuer on loopback for the access-control tests: OpenID discovery and a JWKS, and
//! tokens signed with the test-only keys in `tests/fixtures` (made for these tests, used nowhere else).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use warp::Filter;

pub const AUDIENCE: &str = "api://fhir-export";
pub const SIGNING_KEY: &[u8] = include_bytes!("../fixtures/jwt-signing-key.pem");
pub const OTHER_KEY: &[u8] = include_bytes!("../fixtures/jwt-other-key.pem");
pub const JWKS: &str = include_str!("../fixtures/jwks.json");

/// An OpenID issuer serving discovery and its key set; counts key-set fetches.
pub async fn issuer() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let fetches = Arc::new(AtomicU64::new(0));
    let discovery = {
        let base = base.clone();
        warp::path!(".well-known" / "openid-configuration").map(move || {
            warp::reply::json(&json!({"issuer": base, "jwks_uri": format!("{base}/keys")}))
        })
    };
    let keys = {
        let fetches = fetches.clone();
        warp::path!("keys").map(move || {
            fetches.fetch_add(1, Ordering::SeqCst);
            warp::reply::with_header(JWKS, "content-type", "application/json")
        })
    };
    tokio::spawn(warp::serve(discovery.or(keys)).incoming(listener).run());
    (base, fetches)
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
