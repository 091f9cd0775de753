//! One conformance suite for every `ObjectStore`: the local folder and Azure Blob (on Azurite).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::azurite;
use fhir_export::storage::{AzureBlob, LocalFolder, ObjectStore, PutMode, StorageError};
use futures_util::StreamExt;

/// Writes `data` at `path`, replacing what is there.
async fn put(store: &dyn ObjectStore, path: &str, data: &'static [u8]) {
    store
        .put(path, Bytes::from_static(data), PutMode::Overwrite)
        .await
        .unwrap();
}

async fn read_all(store: &dyn ObjectStore, path: &str) -> Option<Vec<u8>> {
    let (size, mut stream) = store.read_stream(path).await.unwrap()?;
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(
        size,
        data.len() as u64,
        "{path}: size and streamed bytes differ"
    );
    Some(data)
}

/// Everything the exporter relies on; `c` is a container no one else uses.
async fn conformance(store: Arc<dyn ObjectStore>, c: &str) {
    let doc = format!("{c}/jobs/1/job.json");

    // Absent objects.
    assert!(store.get(&doc).await.unwrap().is_none());
    assert!(store.read_stream(&doc).await.unwrap().is_none());
    assert!(store.list(&format!("{c}/jobs")).await.unwrap().is_empty());
    store.delete_prefix(&format!("{c}/nothing")).await.unwrap();

    // Create only once; update only the version read; a stale version is refused.
    let first = store
        .put(&doc, Bytes::from_static(b"{\"v\":1}"), PutMode::Create)
        .await
        .unwrap();
    assert!(matches!(
        store
            .put(&doc, Bytes::from_static(b"x"), PutMode::Create)
            .await,
        Err(StorageError::PreconditionFailed(_))
    ));
    let (bytes, etag) = store.get(&doc).await.unwrap().unwrap();
    assert_eq!(&bytes[..], b"{\"v\":1}");
    assert_eq!(etag, first);
    let second = store
        .put(
            &doc,
            Bytes::from_static(b"{\"v\":2}"),
            PutMode::Update(etag.clone()),
        )
        .await
        .unwrap();
    assert_ne!(second, first);
    assert!(matches!(
        store
            .put(
                &doc,
                Bytes::from_static(b"{\"v\":3}"),
                PutMode::Update(etag)
            )
            .await,
        Err(StorageError::PreconditionFailed(_))
    ));
    assert_eq!(&store.get(&doc).await.unwrap().unwrap().0[..], b"{\"v\":2}");
    store
        .put(&doc, Bytes::from_static(b"{\"v\":4}"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(&store.get(&doc).await.unwrap().unwrap().0[..], b"{\"v\":4}");

    // Compare-and-swap under contention: no update is lost.
    let counter = format!("{c}/jobs/counter.json");
    store
        .put(&counter, Bytes::from_static(b"0"), PutMode::Create)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (store, counter) = (store.clone(), counter.clone());
            tokio::spawn(async move {
                for _ in 0..4 {
                    loop {
                        let (bytes, etag) = store.get(&counter).await.unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&bytes).unwrap().parse().unwrap();
                        let next = Bytes::from((n + 1).to_string());
                        match store.put(&counter, next, PutMode::Update(etag)).await {
                            Ok(_) => break,
                            Err(StorageError::PreconditionFailed(_)) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(&store.get(&counter).await.unwrap().unwrap().0[..], b"24");

    // A streamed file appears whole on commit, never before; blocks of several MiB in a row.
    let file = format!("{c}/export-1/Observation-1.ndjson");
    let blocks: Vec<Vec<u8>> = (0..6u8)
        .map(|i| vec![b'a' + i; if i == 5 { 1234 } else { 3 << 20 }])
        .collect();
    let mut writer = store.writer(&file).await.unwrap();
    for block in &blocks {
        writer.write(Bytes::from(block.clone())).await.unwrap();
        assert!(
            store.read_stream(&file).await.unwrap().is_none(),
            "visible before commit"
        );
    }
    writer.commit().await.unwrap();
    assert_eq!(
        read_all(store.as_ref(), &file).await.unwrap(),
        blocks.concat()
    );

    // A rewrite replaces the file only on commit; an aborted one leaves the old one.
    let mut rewrite = store.writer(&file).await.unwrap();
    rewrite.write(Bytes::from_static(b"new\n")).await.unwrap();
    assert_eq!(
        read_all(store.as_ref(), &file).await.unwrap().len(),
        blocks.concat().len()
    );
    rewrite.commit().await.unwrap();
    assert_eq!(read_all(store.as_ref(), &file).await.unwrap(), b"new\n");
    let mut aborted = store.writer(&file).await.unwrap();
    aborted.write(Bytes::from_static(b"lost\n")).await.unwrap();
    aborted.abort().await.unwrap();
    assert_eq!(read_all(store.as_ref(), &file).await.unwrap(), b"new\n");
    let never = format!("{c}/export-1/Never-1.ndjson");
    let mut aborted = store.writer(&never).await.unwrap();
    aborted.write(Bytes::from_static(b"lost\n")).await.unwrap();
    aborted.abort().await.unwrap();
    assert!(store.read_stream(&never).await.unwrap().is_none());

    // An empty committed file exists and is empty.
    let empty = format!("{c}/export-1/Empty-1.ndjson");
    store.writer(&empty).await.unwrap().commit().await.unwrap();
    assert_eq!(read_all(store.as_ref(), &empty).await.unwrap(), b"");

    // Listing: sorted, nested, and `x` does not match `x1`.
    for name in [
        "export-1/sub/Patient-1.ndjson",
        "export-10/Patient-1.ndjson",
    ] {
        put(&*store, &format!("{c}/{name}"), b"{}\n").await;
    }
    assert_eq!(
        store.list(&format!("{c}/export-1")).await.unwrap(),
        [
            format!("{c}/export-1/Empty-1.ndjson"),
            format!("{c}/export-1/Observation-1.ndjson"),
            format!("{c}/export-1/sub/Patient-1.ndjson"),
        ]
    );
    assert_eq!(store.list(c).await.unwrap().len(), 6);

    // Deleting a file, then a folder, leaves the neighbours.
    store.delete_prefix(&empty).await.unwrap();
    assert!(store.read_stream(&empty).await.unwrap().is_none());
    store.delete_prefix(&format!("{c}/export-1")).await.unwrap();
    assert!(store
        .list(&format!("{c}/export-1"))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.list(&format!("{c}/export-10")).await.unwrap(),
        [format!("{c}/export-10/Patient-1.ndjson")]
    );
    assert!(store.get(&doc).await.unwrap().is_some());

    // A range of a streamed object (a partition file's section), and of a whole one.
    let streamed = format!("{c}/export-10/_partitions/Observation-1.part");
    assert!(store.get_range(&streamed, 0..4).await.unwrap().is_none());
    let mut writer = store.writer(&streamed).await.unwrap();
    writer.write(Bytes::from_static(b"0\tab\n")).await.unwrap();
    writer.write(Bytes::from_static(b"1\tcde\n")).await.unwrap();
    writer.commit().await.unwrap();
    for (range, expected) in [
        (0..5, &b"0\tab\n"[..]),
        (5..11, b"1\tcde\n"),
        (2..8, b"ab\n1\tc"),
    ] {
        let got = store
            .get_range(&streamed, range.clone())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], expected, "{range:?}");
    }
    let got = store.get_range(&doc, 2..4).await.unwrap().unwrap();
    assert_eq!(&got[..], &store.get(&doc).await.unwrap().unwrap().0[2..4]);

    // Paths cannot escape or be empty.
    for bad in ["", "../x", &format!("{c}/../x"), &format!("{c}//x")] {
        assert!(
            matches!(store.get(bad).await, Err(StorageError::InvalidPath(_))),
            "{bad:?}"
        );
    }

    // The whole container goes.
    store.delete_prefix(c).await.unwrap();
    assert!(store.list(c).await.unwrap().is_empty());
}

#[tokio::test]
async fn local_folder_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalFolder::open(dir.path()).unwrap());
    conformance(store, "exports").await;
}

#[tokio::test]
async fn azure_blob_conforms_on_azurite() {
    let store = Arc::new(AzureBlob::new(&azurite::sas_url(), None).unwrap());
    conformance(store, &azurite::unique_container("conformance")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_conforms_on_a_hierarchical_namespace() {
    let url = common::hns::start(&azurite::sas_url()).await;
    let store = Arc::new(AzureBlob::new(&url, None).unwrap());
    let c = azurite::unique_container("hns");
    conformance(store.clone(), &c).await;

    // The layer behaves as ADLS Gen2 does: directories are entries of a flat listing and stay
    // when emptied; a non-empty one cannot be deleted on its own.
    put(&*store, &format!("{c}/running/0123"), b"{}").await;
    put(&*store, &format!("{c}/job/a/b.json"), b"{}").await;
    let raw = raw_listing(&url, &c).await;
    for directory in [
        "<Name>running</Name>",
        "<Name>job</Name>",
        "<Name>job/a</Name>",
    ] {
        assert!(raw.contains(directory), "{directory} in {raw}");
    }
    assert!(raw.contains("<hdi_isfolder>true</hdi_isfolder>"));
    let delete_directory = reqwest::Client::new()
        .delete(blob_url(&url, &c, "job"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete_directory.status(), 409);

    // Through the store: directories are not objects, and deleting a prefix removes them too.
    assert_eq!(
        store.list(&format!("{c}/running")).await.unwrap(),
        [format!("{c}/running/0123")]
    );
    store
        .delete_prefix(&format!("{c}/running/0123"))
        .await
        .unwrap();
    assert!(store
        .list(&format!("{c}/running"))
        .await
        .unwrap()
        .is_empty());
    store.delete_prefix(&format!("{c}/job")).await.unwrap();
    let raw = raw_listing(&url, &c).await;
    assert!(!raw.contains("<Name>job"), "{raw}");
    assert_eq!(store.list(&c).await.unwrap(), Vec::<String>::new());
}

/// The container's flat listing with metadata, as the account answers it.
async fn raw_listing(account_url: &str, container: &str) -> String {
    let (account, sas) = account_url.split_once('?').unwrap();
    let url = format!("{account}/{container}?restype=container&comp=list&include=metadata&{sas}");
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

fn blob_url(account_url: &str, container: &str, blob: &str) -> String {
    let (account, sas) = account_url.split_once('?').unwrap();
    format!("{account}/{container}/{blob}?{sas}")
}

#[tokio::test]
async fn azure_blob_refusal_is_a_clear_error() {
    // No SAS: Azurite answers 403, as Azure does without a role assignment or past the firewall.
    azurite::require_azurite();
    let unsigned = format!("{}?sv=2021-08-06&sig=wrong", azurite::account_url());
    let store = AzureBlob::new(&unsigned, None).unwrap();
    let error = store
        .put(
            "denied/x.json",
            Bytes::from_static(b"{}"),
            PutMode::Overwrite,
        )
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, StorageError::Denied { .. }), "{message}");
    assert!(message.contains("HTTP 403"), "{message}");
    assert!(
        message.contains("Storage Blob Data Contributor"),
        "{message}"
    );
    assert!(!message.contains('<'), "raw XML in {message}");
}

/// An account that accepts connections and never answers (a black-holed endpoint): every call is a
/// clear service error within seconds, whatever the SDK's retry policy would do.
#[tokio::test]
async fn an_account_that_never_answers_is_an_error_within_seconds() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept() {
            open.push(socket);
            if open.len() > 64 {
                break;
            }
        }
    });
    let silent = format!("http://{address}/devstoreaccount1?sv=2021-08-06&sig=x");
    let store = AzureBlob::new(&silent, None).unwrap();
    let started = std::time::Instant::now();
    let read = store.get("jobs/x.json").await.unwrap_err();
    let written = store
        .put("jobs/y.json", Bytes::from_static(b"{}"), PutMode::Overwrite)
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    for error in [&read, &written] {
        assert!(matches!(error, StorageError::Service { .. }), "{error}");
        assert!(
            error.to_string().contains("no answer within 5 s"),
            "{error}"
        );
    }
    assert!(
        elapsed < std::time::Duration::from_secs(15),
        "{elapsed:?} for two calls"
    );
    drop(held);
}

/// The download URLs of `EXPORT_FILE_URLS=sas`, signed by the SDK's `azure_storage_sas` as the
/// service does, checked by another implementation: Azurite validates a user-delegation SAS with
/// the key it would have issued (derived from the SAS's own key fields and its public seed). A URL
/// signed as `AzureBlob` signs reads its blob; the same query on another blob, or with the expiry
/// moved, is refused.
#[tokio::test]
async fn a_user_delegation_sas_is_accepted_by_azurite_for_its_blob_only() {
    use azure_storage_common::models::UserDelegationKey;
    use azure_storage_sas::{SasBuilder, SasProtocol};
    use hmac::{Hmac, Mac};

    let store = Arc::new(AzureBlob::new(&azurite::sas_url(), None).unwrap());
    let c = azurite::unique_container("sas");
    put(
        &*store,
        &format!("{c}/f/Patient-1.ndjson"),
        b"{\"id\":\"a\"}\n",
    )
    .await;
    put(&*store, &format!("{c}/f/Other-1.ndjson"), b"{}\n").await;

    let now = chrono::Utc::now();
    let at = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let offset = |t: chrono::DateTime<chrono::Utc>| {
        time::OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap()
    };
    let (key_start, key_expiry) = (
        now - chrono::Duration::minutes(10),
        now + chrono::Duration::hours(2),
    );
    let (oid, tid, version) = (
        "0f0e0d0c-1111-2222-3333-444455556666",
        "7a7a7a7a-8888-9999-aaaa-bbbbccccdddd",
        "2022-11-02",
    );
    // Azurite's getUserDelegationKeyValue: HMAC-SHA256 under its seed of the key's fields.
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(b"azurite-user-delegation-signing-seed-v1").unwrap();
    mac.update(
        format!(
            "{oid}\n{tid}\n{}\n{}\nb\n{version}",
            at(key_start),
            at(key_expiry)
        )
        .as_bytes(),
    );
    let key = UserDelegationKey {
        signed_oid: Some(oid.into()),
        signed_tid: Some(tid.into()),
        signed_start: Some(offset(key_start)),
        signed_expiry: Some(offset(key_expiry)),
        signed_service: Some("b".into()),
        signed_version: Some(version.into()),
        value: Some(mac.finalize().into_bytes().to_vec()),
        ..Default::default()
    };
    let account_url = azurite::account_url();
    let account = account_url.rsplit('/').next().unwrap();
    let expiry = now + chrono::Duration::hours(1);
    let query = SasBuilder::new(account, &key, offset(expiry))
        .unwrap()
        .blob(&c, "f/Patient-1.ndjson")
        .read()
        .start(offset(now - chrono::Duration::minutes(5)))
        .protocol(SasProtocol::HttpsAndHttp)
        .build();

    let read = reqwest::get(format!("{account_url}/{c}/f/Patient-1.ndjson?{query}"))
        .await
        .unwrap();
    assert_eq!(
        read.status(),
        200,
        "{query}: {}",
        read.text().await.unwrap()
    );
    let read = reqwest::get(format!("{account_url}/{c}/f/Patient-1.ndjson?{query}"))
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "{\"id\":\"a\"}\n");
    let other = reqwest::get(format!("{account_url}/{c}/f/Other-1.ndjson?{query}"))
        .await
        .unwrap();
    assert_eq!(other.status(), 403, "the signature covers one blob");
    let later = query.replace(
        &format!("se={}", at(expiry)),
        &format!("se={}", at(expiry + chrono::Duration::hours(1))),
    );
    assert_ne!(later, query);
    let stretched = reqwest::get(format!("{account_url}/{c}/f/Patient-1.ndjson?{later}"))
        .await
        .unwrap();
    assert_eq!(stretched.status(), 403, "the signature covers the expiry");
    store.delete_prefix(&c).await.unwrap();
}

/// An export file stored compressed (`EXPORT_COMPRESSION=gzip`) is a blob labelled
/// `Content-Type: application/fhir+ndjson` and `Content-Encoding: gzip`, so that a download
/// straight from the storage (a SAS URL) says what it carries; a plain one has the type alone.
#[tokio::test]
async fn export_files_are_blobs_labelled_with_their_type_and_encoding() {
    use std::io::Write;
    let store = Arc::new(AzureBlob::new(&azurite::sas_url(), None).unwrap());
    let c = azurite::unique_container("labels");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(b"{\"id\":\"a\"}\n").unwrap();
    let compressed = encoder.finish().unwrap();
    for (name, gzip, body) in [
        ("Patient-1.ndjson", true, compressed.clone()),
        ("Patient-2.ndjson", false, b"{\"id\":\"b\"}\n".to_vec()),
    ] {
        let path = format!("{c}/f/{name}");
        let mut writer = store.export_writer(&path, gzip).await.unwrap();
        writer
            .write(bytes::Bytes::from(body.clone()))
            .await
            .unwrap();
        writer.commit().await.unwrap();
        let (account, sas) = azurite::sas_url()
            .split_once('?')
            .map(|(a, s)| (a.to_string(), s.to_string()))
            .unwrap();
        let read = reqwest::get(format!("{account}/{c}/f/{name}?{sas}"))
            .await
            .unwrap();
        assert_eq!(read.status(), 200);
        assert_eq!(read.headers()["content-type"], "application/fhir+ndjson");
        assert_eq!(
            read.headers()
                .get("content-encoding")
                .is_some_and(|e| e == "gzip"),
            gzip,
            "{name}"
        );
        assert_eq!(
            read.bytes().await.unwrap().to_vec(),
            body,
            "{name}: stored as written"
        );
    }
    store.delete_prefix(&c).await.unwrap();
}
