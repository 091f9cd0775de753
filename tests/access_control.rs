//! Bearer-token access control against a real issuer on loopback (`common::tokens`): a JWKS
//! endpoint behind OpenID discovery, tokens signed with the test key in `tests/fixtures`.

mod common;

use std::sync::atomic::Ordering;

use common::tokens::{issuer, now, token, token_with, AUDIENCE, JWKS, OTHER_KEY};
use common::{client, get_json, sample_store, start};
use fhir_export::auth::AuthSetting;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut request = client
        .request(method, url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async");
    if let Some(bearer) = bearer {
        request = request.header("Authorization", format!("Bearer {bearer}"));
    }
    request.send().await.unwrap()
}

/// Token checks against `issuer`, its keys and token endpoint found by discovery.
fn checked_by(issuer: &str) -> AuthSetting {
    AuthSetting {
        issuer: issuer.to_string(),
        audiences: vec![AUDIENCE.into()],
        jwks_url: None,
        token_endpoint: None,
    }
}

/// Kicks off `url` with `bearer`, expects a 202, and gives the status URL.
async fn started_by(client: &reqwest::Client, url: &str, bearer: &str) -> String {
    let started = send(client, reqwest::Method::GET, url, Some(bearer)).await;
    assert_eq!(started.status(), 202);
    started.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Polls a status URL with `bearer` until the manifest.
async fn manifest_for(client: &reqwest::Client, status_url: &str, bearer: &str) -> Value {
    loop {
        let response = send(client, reqwest::Method::GET, status_url, Some(bearer)).await;
        match response.status().as_u16() {
            202 => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            200 => return response.json::<Value>().await.unwrap(),
            other => panic!("status {other}"),
        }
    }
}

/// Asserts an OperationOutcome answer with `status` whose text holds `words`.
async fn assert_refused(response: reqwest::Response, status: u16, words: &str) {
    let got = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(got, status, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome.to_string().contains(words),
        "{words:?} not in {outcome}"
    );
    if status == 401 {
        assert!(challenge.unwrap().starts_with("Bearer"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_exports_belong_to_their_client() {
    let (issuer, key_fetches) = issuer().await;
    let store = sample_store();
    let server = start(&store, |s| s.auth = Some(checked_by(&issuer))).await;
    let client = client();
    let base = &server.base;
    let kickoff_url = format!("{base}/$export?_type=Patient,Condition");
    use reqwest::Method;

    // Discovery stays open.
    let metadata = send(&client, Method::GET, &format!("{base}/metadata"), None).await;
    assert_eq!(metadata.status(), 200);

    // Every way a token can be wrong is a 401 naming what is wrong.
    let hmac = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": issuer, "aud": AUDIENCE, "exp": now() + 60, "azp": "x", "scope": "system/*.read"}),
        &EncodingKey::from_secret(JWKS.as_bytes()),
    )
    .unwrap();
    let refusals: Vec<(Option<String>, u16, &str)> = vec![
        (None, 401, "needs a bearer token"),
        (Some("not-a-jwt".into()), 401, "not valid"),
        (
            Some(token(&issuer, json!({"exp": now() - 3600}))),
            401,
            "expired",
        ),
        (
            Some(token(&issuer, json!({"nbf": now() + 3600}))),
            401,
            "not valid yet",
        ),
        (
            Some(token(&issuer, json!({"aud": "api://other"}))),
            401,
            "another audience",
        ),
        (
            Some(token(&issuer, json!({"iss": "https://evil.example"}))),
            401,
            "another issuer",
        ),
        (Some(token(&issuer, json!({"exp": null}))), 401, "exp"),
        (
            Some(token_with(
                &issuer,
                json!({}),
                OTHER_KEY,
                Some("test-key-1"),
            )),
            401,
            "signature",
        ),
        (
            Some(token_with(
                &issuer,
                json!({}),
                OTHER_KEY,
                Some("rotated-away"),
            )),
            401,
            "rotated-away",
        ),
        (Some(hmac), 401, "HS256"),
        (
            Some(token(&issuer, json!({"scope": "openid profile"}))),
            403,
            "system/*.read",
        ),
        (
            Some(token(&issuer, json!({"scope": "patient/*.read"}))),
            403,
            "read access",
        ),
    ];
    for (bearer, status, words) in refusals {
        let response = send(&client, Method::GET, &kickoff_url, bearer.as_deref()).await;
        assert_refused(response, status, words).await;
    }
    // An unknown key id refetches the key set at most once a minute.
    assert!(key_fetches.load(Ordering::SeqCst) <= 2, "{key_fetches:?}");

    // Client A's export: visible to A only.
    let a = token(&issuer, json!({}));
    let b = token(&issuer, json!({"azp": "client-b"}));
    let status_url = started_by(&client, &kickoff_url, &a).await;
    assert_refused(
        send(&client, Method::GET, &status_url, None).await,
        401,
        "bearer",
    )
    .await;
    assert_refused(
        send(&client, Method::GET, &status_url, Some(&b)).await,
        404,
        "no export",
    )
    .await;
    assert_refused(
        send(&client, Method::DELETE, &status_url, Some(&b)).await,
        404,
        "no export",
    )
    .await;
    let manifest = manifest_for(&client, &status_url, &a).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for output in outputs {
        let url = output["url"].as_str().unwrap();
        let owner = send(&client, Method::GET, url, Some(&a)).await;
        assert_eq!(owner.status(), 200);
        let lines = owner.text().await.unwrap().lines().count() as u64;
        assert_eq!(lines, output["count"].as_u64().unwrap());
        assert_refused(send(&client, Method::GET, url, None).await, 401, "bearer").await;
        assert_refused(
            send(&client, Method::GET, url, Some(&b)).await,
            404,
            "no export file",
        )
        .await;
    }

    // A token for some types narrows the export to them and refuses others.
    let patients_only = token(
        &issuer,
        json!({"scope": "system/Patient.rs", "azp": "client-c"}),
    );
    let narrowed_url = started_by(&client, &format!("{base}/$export"), &patients_only).await;
    let types: Vec<String> = loop {
        let response = send(&client, Method::GET, &narrowed_url, Some(&patients_only)).await;
        if response.status() == 200 {
            let manifest: Value = response.json().await.unwrap();
            break manifest["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["type"].as_str().unwrap().to_string())
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(types, ["Patient"]);
    assert_refused(
        send(
            &client,
            Method::GET,
            &format!("{base}/$export?_type=Observation"),
            Some(&patients_only),
        )
        .await,
        403,
        "Observation",
    )
    .await;
    assert_refused(
        send(
            &client,
            Method::GET,
            &format!("{base}/Observation?_count=1"),
            Some(&patients_only),
        )
        .await,
        403,
        "Observation",
    )
    .await;
    let search = send(
        &client,
        Method::GET,
        &format!("{base}/Patient?_count=1"),
        Some(&patients_only),
    )
    .await;
    assert_eq!(search.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_issuer_the_service_stays_open_and_says_so() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let client = client();
    let manifest = common::export(&client, &format!("{}/$export?_type=Patient", server.base)).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    assert_eq!(client.get(url).send().await.unwrap().status(), 200);
    let metadata = get_json(&client, &format!("{}/metadata", server.base)).await;
    assert_eq!(metadata["resourceType"], "CapabilityStatement");
}

/// SMART Backend Services as BDT and bulk-data-client use it: discovery names the issuer's token
/// endpoint, a client-credentials token starts an export, and a download is checked against the
/// token's type scopes as well as the export's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_clients_discover_the_token_endpoint_and_downloads_follow_type_scopes() {
    let (issuer, _) = issuer().await;
    let store = sample_store();
    let server = start(&store, |s| s.auth = Some(checked_by(&issuer))).await;
    let client = client();
    let base = &server.base;
    use reqwest::Method;

    let smart = send(
        &client,
        Method::GET,
        &format!("{base}/.well-known/smart-configuration"),
        None,
    )
    .await;
    assert_eq!(smart.status(), 200);
    let smart: Value = smart.json().await.unwrap();
    let token_endpoint = smart["token_endpoint"].as_str().unwrap().to_string();
    assert_eq!(token_endpoint, format!("{issuer}/token"));
    assert_eq!(
        smart["grant_types_supported"],
        json!(["client_credentials"])
    );
    assert!(smart["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("private_key_jwt")));
    assert!(smart["scopes_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("system/*.read")));

    let statement: Value = send(&client, Method::GET, &format!("{base}/metadata"), None)
        .await
        .json()
        .await
        .unwrap();
    let security = &statement["rest"][0]["security"];
    let oauth = security["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        })
        .unwrap();
    assert_eq!(oauth["extension"][0]["url"], "token");
    assert_eq!(oauth["extension"][0]["valueUri"], token_endpoint);
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");

    // BDT's authorization checks at every kickoff level: no token, and an invalid one.
    for level in ["$export", "Patient/$export", "Group/some-group/$export"] {
        let url = format!("{base}/{level}");
        assert_refused(send(&client, Method::GET, &url, None).await, 401, "bearer").await;
        assert_refused(
            send(&client, Method::GET, &url, Some("invalidToken")).await,
            401,
            "not valid",
        )
        .await;
    }

    let token_for = |scope: &'static str| {
        let (client, token_endpoint) = (client.clone(), token_endpoint.clone());
        async move {
            let answer = client
                .post(&token_endpoint)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(common::tokens::client_credentials_form(
                    &token_endpoint,
                    scope,
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
            let answer: Value = answer.json().await.unwrap();
            answer["access_token"].as_str().unwrap().to_string()
        }
    };
    let everything = token_for("system/*.read").await;
    let status_url = started_by(
        &client,
        &format!("{base}/$export?_type=Observation,ImagingStudy"),
        &everything,
    )
    .await;
    let manifest = manifest_for(&client, &status_url, &everything).await;
    let observations_only = token_for("system/Observation.read").await;
    let mut seen = std::collections::HashSet::new();
    for output in manifest["output"].as_array().unwrap() {
        let (resource_type, url) = (
            output["type"].as_str().unwrap(),
            output["url"].as_str().unwrap(),
        );
        seen.insert(resource_type.to_string());
        let narrow = send(&client, Method::GET, url, Some(&observations_only)).await;
        match resource_type {
            "Observation" => assert_eq!(narrow.status(), 200),
            _ => assert_refused(narrow, 403, resource_type).await,
        }
        let wide = send(&client, Method::GET, url, Some(&everything)).await;
        assert_eq!(wide.status(), 200);
    }
    assert_eq!(seen.len(), 2, "{manifest}");
}

/// While the issuer's key endpoint fails, forged tokens cause at most one fetch a minute, and a
/// token whose `sub` equals a client id owns nothing of that client's exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_endpoint_is_asked_once_and_sub_is_not_a_client() {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use warp::Filter;
    let hits = Arc::new(AtomicU64::new(0));
    let failing = {
        let hits = hits.clone();
        warp::any().map(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            warp::reply::with_status("down", warp::http::StatusCode::INTERNAL_SERVER_ERROR)
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let keys_url = format!("http://{}/keys", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(failing).incoming(listener).run());
    let (issuer, _) = issuer().await;
    let store = sample_store();
    let broken = start(&store, |s| {
        s.auth = Some(AuthSetting {
            issuer: issuer.clone(),
            audiences: vec![AUDIENCE.into()],
            jwks_url: Some(keys_url),
            token_endpoint: None,
        })
    })
    .await;
    let client = client();
    use reqwest::Method;
    for n in 0..20 {
        let forged = token_with(&issuer, json!({}), OTHER_KEY, Some(&format!("forged-{n}")));
        let response = send(
            &client,
            Method::GET,
            &format!("{}/Patient?_count=1", broken.base),
            Some(&forged),
        )
        .await;
        assert_refused(response, 503, "signing keys").await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let server = start(&store, |s| s.auth = Some(checked_by(&issuer))).await;
    let owner = token(&issuer, json!({}));
    let status_url = started_by(
        &client,
        &format!("{}/$export?_type=Device", server.base),
        &owner,
    )
    .await;
    let impostor = token(&issuer, json!({"azp": null, "sub": "client-a"}));
    assert_refused(
        send(&client, Method::GET, &status_url, Some(&impostor)).await,
        404,
        "no export",
    )
    .await;
    assert_ne!(
        send(&client, Method::GET, &status_url, Some(&owner))
            .await
            .status(),
        404
    );
}

/// Tokens as Entra ID issues them for the API's app role (`accessTokenAcceptedVersion` 2): `ver`
/// 2.0, `aud` the API's client id, `azp` the calling client, the role in `roles` and no scope. Both
/// the client id and the Application ID URI are accepted when both are listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_v2_tokens_with_an_app_role_are_accepted_for_every_listed_audience() {
    let (issuer, _) = issuer().await;
    let client_id = "3f0c2b7e-6a1d-4c59-9d1e-0b9f5f1a2c33";
    let server = start(&sample_store(), |s| {
        s.auth = Some(AuthSetting {
            audiences: vec![client_id.into(), AUDIENCE.into()],
            ..checked_by(&issuer)
        })
    })
    .await;
    let client = client();
    let url = format!("{}/$export?_type=Patient", server.base);
    let entra = |aud: &str| {
        token(
            &issuer,
            json!({
                "ver": "2.0",
                "aud": aud,
                "azp": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
                "azpacr": "0",
                "oid": "9a1c0c1e-2f1b-4a7e-8f2e-1d4b1e6b7a10",
                "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                "roles": ["system/*.read"],
                "scope": null,
            }),
        )
    };
    for aud in [client_id, AUDIENCE] {
        let bearer = entra(aud);
        let status = started_by(&client, &url, &bearer).await;
        let manifest = manifest_for(&client, &status, &bearer).await;
        assert_eq!(manifest["output"][0]["count"], 100, "{aud}");
    }
    let refused = send(
        &client,
        reqwest::Method::GET,
        &url,
        Some(&entra("00000003-0000-0000-c000-000000000000")),
    )
    .await;
    assert_eq!(refused.status(), 401);
    // Users who reach the API through one shared client (Azure CLI, delegated `scp` tokens) own
    // their exports apart.
    let user = |oid: &str| {
        token(
            &issuer,
            json!({
                "ver": "2.0", "aud": client_id, "azp": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
                "oid": oid, "scp": "user_impersonation", "roles": ["system/*.read"], "scope": null,
            }),
        )
    };
    let (alice, bob) = (user("a1"), user("b2"));
    let status = started_by(&client, &url, &alice).await;
    manifest_for(&client, &status, &alice).await;
    let seen_by_bob = send(&client, reqwest::Method::GET, &status, Some(&bob)).await;
    assert_eq!(seen_by_bob.status(), 404);
    // The setting reads a comma-separated list.
    let (setting, _) = fhir_export::config::parse_auth(fhir_export::config::AuthInput {
        issuer: Some(&issuer),
        audience: Some(&format!(" {client_id} , {AUDIENCE} ")),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(setting.unwrap().audiences, [client_id, AUDIENCE]);
}
