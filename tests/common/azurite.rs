//! Azurite, the Azure Storage emulator, as the tests reach it: an account URL with a SAS signed by
//! the emulator's well-known key. `.ci/run` installs and starts it (see tests/azurite/).

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Azurite's well-known development account (documented by Microsoft, not a secret).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const SAS_VERSION: &str = "2021-08-06";

/// `http://127.0.0.1:{port}/devstoreaccount1`, port from `AZURITE_BLOB_PORT` (default 10000).
pub fn account_url() -> String {
    let port = std::env::var("AZURITE_BLOB_PORT").unwrap_or_else(|_| "10000".into());
    format!("http://127.0.0.1:{port}/{ACCOUNT}")
}

/// Fails the test with instructions when Azurite is not running.
pub fn require_azurite() {
    let url = account_url();
    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let reachable =
        std::net::TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(2))
            .is_ok();
    assert!(
        reachable,
        "Azurite is not running at {address}. Start it with: npm ci --prefix tests/azurite && \
         tests/azurite/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort 10000 \
         --location /tmp/azurite --skipApiVersionCheck (or run .ci/run)"
    );
}

/// The account URL with an account SAS allowing everything on blobs, valid for a day.
pub fn sas_url() -> String {
    require_azurite();
    format!("{}?{}", account_url(), account_sas("b"))
}

/// An account SAS (the query) allowing everything on `services` (`b` blobs, `q` queues), valid
/// for a day.
pub fn account_sas(services: &str) -> String {
    let expiry = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let (permissions, resource_types, protocol) = ("rwdlacup", "sco", "https,http");
    let to_sign = format!(
        "{ACCOUNT}\n{permissions}\n{services}\n{resource_types}\n\n{expiry}\n\n{protocol}\n{SAS_VERSION}\n\n"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(ACCOUNT_KEY)
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    form_urlencoded::Serializer::new(String::new())
        .append_pair("sv", SAS_VERSION)
        .append_pair("ss", services)
        .append_pair("srt", resource_types)
        .append_pair("sp", permissions)
        .append_pair("se", &expiry)
        .append_pair("spr", protocol)
        .append_pair("sig", &signature)
        .finish()
}

/// A container name no other test uses.
pub fn unique_container(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}
