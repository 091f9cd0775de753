//! Access control: bearer tokens (Entra ID, SMART Backend Services) verified as JWTs against the
//! issuer's signing keys (JWKS), the audience, the expiry, and read scopes per resource type.
//!
//! Off unless `EXPORT_AUTH_ISSUER` is set (in Azure, start-up refuses that unless `EXPORT_AUTH=off`).
//! The caller's identity (`azp`, `appid`, `client_id` or `sub`, with the issuer; and the user's
//! `oid` for a delegated Entra token) owns the exports it starts: nobody else sees their status or
//! files.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::RwLock;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;
/// A token naming an unknown key refetches the key set at most this often.
const REFETCH_AFTER: Duration = Duration::from_secs(60);
/// Keys are refetched after this long in any case (issuers rotate them).
const KEYS_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// `EXPORT_AUTH_*`: who issues the tokens and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSetting {
    pub issuer: String,
    /// The accepted `aud` values (Entra ID: the API's client id, and its Application ID URI).
    pub audiences: Vec<String>,
    /// Where the signing keys are; default: `jwks_uri` of the issuer's OpenID configuration.
    pub jwks_url: Option<String>,
    /// The token endpoint clients are told of; default: `token_endpoint` of the issuer's OpenID
    /// configuration.
    pub token_endpoint: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this endpoint needs a bearer token (Authorization: Bearer ...)")]
    Missing,
    #[error("the access token is not valid: {0}")]
    Invalid(String),
    #[error("the access token does not grant {0}")]
    Forbidden(String),
    #[error("the token issuer's signing keys could not be read: {0}")]
    KeysUnavailable(String),
    #[error("the token issuer's OpenID configuration could not be read: {0}")]
    DiscoveryUnavailable(String),
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `{issuer}#{client}`: the owner recorded on the exports it starts.
    pub owner: String,
    /// Readable types; `None` means every type.
    readable: Option<Vec<String>>,
}

impl Caller {
    pub fn may_read(&self, resource_type: &str) -> bool {
        self.readable
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == resource_type))
    }

    /// The types this caller may read, or `None` for all of them.
    pub fn readable_types(&self) -> Option<&[String]> {
        self.readable.as_deref()
    }
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    /// Entra ID's object id of the user (or service principal) the token is for.
    #[serde(default)]
    oid: Option<String>,
}

struct Keys {
    by_id: HashMap<String, DecodingKey>,
    /// Keys without a `kid`; a token naming no key is tried against every key.
    unnamed: Vec<DecodingKey>,
    fetched: Instant,
}

pub struct Authenticator {
    setting: AuthSetting,
    http: reqwest::Client,
    keys: RwLock<Option<Keys>>,
    /// The key set is asked for at most once a minute, however many tokens name unknown keys.
    keys_asked: Pacing,
    /// The issuer's token endpoint once discovered.
    token_endpoint: std::sync::Mutex<Option<String>>,
    /// Discovery is tried at most once a minute until it answers.
    discovery_asked: Pacing,
}

/// At most one attempt per `REFETCH_AFTER`, answered or not; held by no one while the attempt runs.
#[derive(Default)]
struct Pacing(std::sync::Mutex<Option<Instant>>);

impl Pacing {
    /// Whether an attempt may start now; if so, it is recorded as started.
    fn may_try(&self) -> bool {
        let mut last = self.0.lock().expect("not poisoned");
        if last.is_some_and(|at| at.elapsed() < REFETCH_AFTER) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

impl Authenticator {
    pub fn new(setting: AuthSetting) -> anyhow::Result<Self> {
        Ok(Self {
            setting,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            keys: RwLock::new(None),
            keys_asked: Pacing::default(),
            token_endpoint: std::sync::Mutex::new(None),
            discovery_asked: Pacing::default(),
        })
    }

    /// The token endpoint to advertise: the setting, else the issuer's OpenID configuration (read
    /// at most once a minute until it answers; no lock is held while it is read).
    pub async fn token_endpoint(&self) -> Result<String, AuthError> {
        if let Some(endpoint) = &self.setting.token_endpoint {
            return Ok(endpoint.clone());
        }
        if let Some(endpoint) = self.token_endpoint.lock().expect("not poisoned").as_ref() {
            return Ok(endpoint.clone());
        }
        if !self.discovery_asked.may_try() {
            return Err(AuthError::DiscoveryUnavailable(
                "it did not answer lately; tried again within a minute".into(),
            ));
        }
        let configuration = self
            .openid_configuration()
            .await
            .map_err(AuthError::DiscoveryUnavailable)?;
        let endpoint = configuration["token_endpoint"]
            .as_str()
            .filter(|url| url.starts_with("https://") || url.starts_with("http://"))
            .ok_or_else(|| {
                AuthError::DiscoveryUnavailable(
                    "it names no token_endpoint; set EXPORT_AUTH_TOKEN_ENDPOINT".into(),
                )
            })?
            .to_string();
        *self.token_endpoint.lock().expect("not poisoned") = Some(endpoint.clone());
        Ok(endpoint)
    }

    async fn openid_configuration(&self) -> Result<serde_json::Value, String> {
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            self.setting.issuer.trim_end_matches('/')
        );
        self.get_json(&discovery).await
    }

    /// Checks the `Authorization` header's bearer token.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let token = authorization
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("unreadable header ({e})")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted; sign with RS256, PS256 or ES256",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.setting.issuer]);
        validation.set_audience(&self.setting.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);

        let verified = self
            .with_keys(header.kid.as_deref(), |key| {
                jsonwebtoken::decode::<Claims>(token, key, &validation)
            })
            .await?
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        let claims = verified.claims;
        // A client's own identity (azp, appid, client_id) owns as itself; a bare `sub` is marked as
        // such, so that a token whose subject merely equals a client id owns nothing of it.
        let client = [&claims.azp, &claims.appid, &claims.client_id]
            .into_iter()
            .flatten()
            .find(|id| !id.is_empty())
            .cloned()
            .or_else(|| {
                let subject = claims.sub.as_ref().filter(|s| !s.is_empty())?;
                Some(format!("sub:{subject}"))
            })
            .ok_or_else(|| {
                AuthError::Invalid("no client identity (azp, appid, client_id or sub)".into())
            })?;
        // A delegated token (Entra's `scp`) acts for a user through a client that many users share
        // (Azure CLI, say): the user is part of the owner, so that users of one client never see
        // each other's exports.
        let client = match (&claims.scp, &claims.oid, &claims.sub) {
            (Some(_), Some(user), _) | (Some(_), None, Some(user)) if !user.is_empty() => {
                format!("{client}/user:{user}")
            }
            _ => client,
        };
        let grants = claims
            .scope
            .iter()
            .chain(claims.scp.iter())
            .flat_map(|s| s.split_whitespace())
            .chain(claims.roles.iter().map(String::as_str));
        let readable = readable_types(grants).ok_or_else(|| {
            AuthError::Forbidden(
                "read access: it needs a scope such as system/*.read or system/*.rs".into(),
            )
        })?;
        Ok(Caller {
            owner: format!("{}#{client}", claims.iss),
            readable,
        })
    }

    /// Runs `check` with the key the token names, fetching the key set when it is not known yet.
    async fn with_keys<T, E>(
        &self,
        kid: Option<&str>,
        check: impl Fn(&DecodingKey) -> Result<T, E>,
    ) -> Result<Result<T, E>, AuthError> {
        for attempt in 0..2 {
            {
                let keys = self.keys.read().await;
                if let Some(keys) = keys
                    .as_ref()
                    .filter(|k| k.fetched.elapsed() < KEYS_LIFETIME)
                {
                    let candidates: Vec<&DecodingKey> = match kid {
                        Some(kid) => keys.by_id.get(kid).into_iter().collect(),
                        None => keys.unnamed.iter().chain(keys.by_id.values()).collect(),
                    };
                    if let Some((last, others)) = candidates.split_last() {
                        for key in others {
                            if let Ok(found) = check(key) {
                                return Ok(Ok(found));
                            }
                        }
                        return Ok(check(last));
                    }
                    if attempt == 1 || keys.fetched.elapsed() < REFETCH_AFTER {
                        return Err(AuthError::Invalid(match kid {
                            Some(kid) => format!("signing key {kid:?} is not one of the issuer's"),
                            None => "the token names no signing key (kid)".into(),
                        }));
                    }
                }
            }
            self.refresh().await?;
        }
        Err(AuthError::KeysUnavailable(
            "no key set has been read yet".into(),
        ))
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        if !self.keys_asked.may_try() {
            let usable = self
                .keys
                .read()
                .await
                .as_ref()
                .is_some_and(|k| k.fetched.elapsed() < KEYS_LIFETIME);
            return match usable {
                true => Ok(()),
                false => Err(AuthError::KeysUnavailable(
                    "they could not be read lately; asked again at most once a minute".into(),
                )),
            };
        }
        let set = self.fetch_key_set().await?;
        let mut keys = Keys {
            by_id: HashMap::new(),
            unnamed: Vec::new(),
            fetched: Instant::now(),
        };
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_id.insert(kid.clone(), key);
                }
                None => keys.unnamed.push(key),
            }
        }
        tracing::info!(keys = set.keys.len(), "token signing keys fetched");
        *self.keys.write().await = Some(keys);
        Ok(())
    }

    async fn fetch_key_set(&self) -> Result<JwkSet, AuthError> {
        let jwks_url = match &self.setting.jwks_url {
            Some(url) => url.clone(),
            None => self
                .openid_configuration()
                .await
                .map_err(AuthError::KeysUnavailable)?["jwks_uri"]
                .as_str()
                .ok_or_else(|| {
                    AuthError::KeysUnavailable(
                        "the issuer's OpenID configuration names no jwks_uri".into(),
                    )
                })?
                .to_string(),
        };
        self.get_json(&jwks_url)
            .await
            .map_err(AuthError::KeysUnavailable)
    }

    /// A JSON document from the issuer; the error says which URL failed and how.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let unavailable = |e: reqwest::Error| format!("{url}: {e}");
        self.http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}

fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "it has expired".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "it was issued by another issuer".into(),
        ErrorKind::InvalidAudience => "it is meant for another audience".into(),
        ErrorKind::InvalidSignature => "the signature does not match the issuer's key".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        ErrorKind::InvalidAlgorithm => "its algorithm does not fit the signing key".into(),
        _ => format!("{error}"),
    }
}

/// The types that read grants cover: `None` for all, `Some(types)` for some; `None` outside when
/// nothing is readable. Grants are SMART scopes (`system/*.read`, `system/Patient.rs`,
/// `user/*.*`) from `scope`, `scp` or `roles`; a scope narrowed by a query grants nothing here.
pub fn readable_types<'a>(
    grants: impl IntoIterator<Item = &'a str>,
) -> Option<Option<Vec<String>>> {
    let mut types = Vec::new();
    for grant in grants {
        let Some((context, rest)) = grant.split_once('/') else {
            continue;
        };
        let Some((resource_type, permissions)) = rest.split_once('.') else {
            continue;
        };
        let reads = permissions == "read"
            || permissions == "*"
            || (permissions.contains('r') && permissions.chars().all(|c| "cruds".contains(c)));
        if !matches!(context, "system" | "user") || !reads {
            continue;
        }
        if resource_type == "*" {
            return Some(None);
        }
        if crate::fhir::is_resource_type(resource_type) && !types.iter().any(|t| t == resource_type)
        {
            types.push(resource_type.to_string());
        }
    }
    (!types.is_empty()).then_some(Some(types))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_grant_read_per_type_or_all() {
        assert_eq!(readable_types(["system/*.read"]), Some(None));
        assert_eq!(readable_types(["openid", "system/*.rs"]), Some(None));
        assert_eq!(readable_types(["user/*.cruds"]), Some(None));
        assert_eq!(
            readable_types(["system/Patient.read", "system/Observation.rs"]),
            Some(Some(vec!["Patient".into(), "Observation".into()]))
        );
        for nothing in [
            "patient/*.read",
            "system/*.write",
            "system/*.c",
            "system/Unicorn.read",
            "system/Observation.rs?category=laboratory",
            "*",
            "",
        ] {
            assert_eq!(readable_types([nothing]), None, "{nothing}");
        }
    }
}
