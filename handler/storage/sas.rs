//! User-delegation SAS for reading one blob: signed with a key the storage account hands to the
//! app's managed identity (no account key anywhere), as Microsoft documents in "Create a user
//! delegation SAS" (version 2020-12-06 and later). The Azure SDK for Rust gets the key but does not
//! sign SAS tokens, so the signing is here: an HMAC-SHA256 over a fixed list of fields.

use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The service version the token is signed for.
pub const SAS_VERSION: &str = "2022-11-02";

/// A user delegation key, as Get User Delegation Key returns it.
#[derive(Debug, Clone)]
pub struct DelegationKey {
    /// `SignedOid`, `SignedTid`: the identity the key was issued to.
    pub object_id: String,
    pub tenant_id: String,
    pub start: DateTime<Utc>,
    pub expiry: DateTime<Utc>,
    /// `SignedService` (`b`) and `SignedVersion` as returned.
    pub service: String,
    pub version: String,
    /// The key itself (decoded from base64).
    pub value: Vec<u8>,
}

fn instant(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What a SAS lets a URL be used over: `https` for an account on the internet, `https,http` for
/// an emulator on loopback.
pub fn protocols_for(account_url_scheme: &str) -> &'static str {
    match account_url_scheme {
        "https" => "https",
        _ => "https,http",
    }
}

/// What a read-only SAS for one blob grants: the blob, when, over what.
#[derive(Debug, Clone, Copy)]
pub struct ReadGrant<'a> {
    pub account: &'a str,
    pub container: &'a str,
    pub blob: &'a str,
    pub start: DateTime<Utc>,
    pub expiry: DateTime<Utc>,
    /// `protocols_for` the account URL's scheme.
    pub protocols: &'a str,
}

/// The string a read-only user-delegation SAS for one blob signs, field by field in the documented
/// order (empty fields stay as empty lines).
pub fn string_to_sign(grant: &ReadGrant<'_>, key: &DelegationKey) -> String {
    let ReadGrant {
        account,
        container,
        blob,
        start,
        expiry,
        protocols,
    } = *grant;
    [
        "r".to_string(),                               // signedPermissions
        instant(start),                                // signedStart
        instant(expiry),                               // signedExpiry
        format!("/blob/{account}/{container}/{blob}"), // canonicalizedResource
        key.object_id.clone(),                         // signedKeyObjectId
        key.tenant_id.clone(),                         // signedKeyTenantId
        instant(key.start),                            // signedKeyStart
        instant(key.expiry),                           // signedKeyExpiry
        key.service.clone(),                           // signedKeyService
        key.version.clone(),                           // signedKeyVersion
        String::new(),                                 // signedAuthorizedUserObjectId
        String::new(),                                 // signedUnauthorizedUserObjectId
        String::new(),                                 // signedCorrelationId
        String::new(),                                 // signedIP
        protocols.to_string(),                         // signedProtocol
        SAS_VERSION.to_string(),                       // signedVersion
        "b".to_string(),                               // signedResource
        String::new(),                                 // signedSnapshotTime
        String::new(),                                 // signedEncryptionScope
        String::new(),                                 // rscc
        String::new(),                                 // rscd
        String::new(),                                 // rsce
        String::new(),                                 // rscl
        String::new(),                                 // rsct
    ]
    .join("\n")
}

/// The query of a read-only SAS for one blob.
pub fn read_sas(grant: &ReadGrant<'_>, key: &DelegationKey) -> String {
    let to_sign = string_to_sign(grant, key);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.value).expect("HMAC takes any key length");
    mac.update(to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    form_urlencoded::Serializer::new(String::new())
        .append_pair("sp", "r")
        .append_pair("st", &instant(grant.start))
        .append_pair("se", &instant(grant.expiry))
        .append_pair("skoid", &key.object_id)
        .append_pair("sktid", &key.tenant_id)
        .append_pair("skt", &instant(key.start))
        .append_pair("ske", &instant(key.expiry))
        .append_pair("sks", &key.service)
        .append_pair("skv", &key.version)
        .append_pair("spr", grant.protocols)
        .append_pair("sv", SAS_VERSION)
        .append_pair("sr", "b")
        .append_pair("sig", &signature)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DelegationKey {
        DelegationKey {
            object_id: "11111111-2222-3333-4444-555555555555".into(),
            tenant_id: "66666666-7777-8888-9999-000000000000".into(),
            start: "2026-12-01T10:00:00Z".parse().unwrap(),
            expiry: "2026-12-01T12:00:00Z".parse().unwrap(),
            service: "b".into(),
            version: "2022-11-02".into(),
            value: b"a delegation key of 32 bytes....".to_vec(),
        }
    }

    fn grant(blob: &str) -> ReadGrant<'_> {
        ReadGrant {
            account: "acct",
            container: "exports",
            blob,
            start: "2026-12-01T10:05:00Z".parse().unwrap(),
            expiry: "2026-12-01T11:05:00Z".parse().unwrap(),
            protocols: "https",
        }
    }

    /// Microsoft's documented layout for versions 2020-12-06 and later: 24 lines, the canonical
    /// resource `/blob/{account}/{container}/{blob}`, the key's fields in order.
    #[test]
    fn the_string_to_sign_follows_the_documented_layout() {
        let text = string_to_sign(&grant("20261201t100000-ab/Patient-1.ndjson"), &key());
        let expected = "r\n2026-12-01T10:05:00Z\n2026-12-01T11:05:00Z\n\
            /blob/acct/exports/20261201t100000-ab/Patient-1.ndjson\n\
            11111111-2222-3333-4444-555555555555\n66666666-7777-8888-9999-000000000000\n\
            2026-12-01T10:00:00Z\n2026-12-01T12:00:00Z\nb\n2022-11-02\n\n\n\n\nhttps\n2022-11-02\nb\n\n\n\n\n\n\n";
        assert_eq!(text, expected);
        assert_eq!(text.split('\n').count(), 24);
    }

    #[test]
    fn the_signature_is_the_hmac_of_that_string_with_the_delegation_key() {
        let grant = grant("f/Patient-1.ndjson");
        let query = read_sas(&grant, &key());
        let pairs: std::collections::HashMap<String, String> =
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key().value).unwrap();
        mac.update(string_to_sign(&grant, &key()).as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(pairs["sig"], expected);
        assert_eq!(pairs["sp"], "r", "read only");
        assert_eq!(pairs["sr"], "b", "one blob");
        assert_eq!(pairs["spr"], "https");
        assert_eq!(pairs["skoid"], key().object_id);
        assert_eq!(pairs["se"], "2026-12-01T11:05:00Z");
    }
}
