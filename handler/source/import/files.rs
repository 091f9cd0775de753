//! Finding the files to import (folders walked, formats sniffed, `.gz` decoded) and the `urn:`
//! aliases their Bundles declare.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::Deserialize;
use serde_json::Value;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Ndjson,
    Document,
}

pub(super) struct InputFile {
    pub(super) path: PathBuf,
    pub(super) format: Format,
}

/// Files to import: given files as they are, folders recursively (their `.ndjson`, `.jsonl`, `.json`
/// files and `.gz` of those; hidden entries skipped), in name order.
pub(super) fn discover(paths: &[PathBuf], failed: &mut Vec<FileError>) -> Vec<InputFile> {
    let mut files = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => walk(path, &mut files, failed),
            Ok(_) => files.push(InputFile {
                format: format_of(path),
                path: path.clone(),
            }),
            Err(e) => failed.push(FileError {
                file: path.clone(),
                line: None,
                message: e.to_string(),
            }),
        }
    }
    files
}

pub(super) fn walk(dir: &Path, files: &mut Vec<InputFile>, failed: &mut Vec<FileError>) {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) => {
            return failed.push(FileError {
                file: dir.to_path_buf(),
                line: None,
                message: e.to_string(),
            })
        }
    };
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, files, failed);
        } else if has_data_extension(name) {
            files.push(InputFile {
                format: format_of(&path),
                path,
            });
        }
    }
}

pub(super) fn has_data_extension(name: &str) -> bool {
    let name = name.strip_suffix(".gz").unwrap_or(name);
    [".ndjson", ".jsonl", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

pub(super) fn format_of(path: &Path) -> Format {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if name.ends_with(".ndjson") || name.ends_with(".jsonl") {
        Format::Ndjson
    } else if name.ends_with(".json") {
        Format::Document
    } else {
        sniff(path).unwrap_or(Format::Document)
    }
}

/// A file of unknown name is NDJSON when its first line alone is a whole JSON object.
pub(super) fn sniff(path: &Path) -> std::io::Result<Format> {
    let mut first_line = String::new();
    open(path)?.take(64 << 20).read_line(&mut first_line)?;
    let is_object = serde_json::from_str::<Value>(&first_line)
        .map(|v| v.is_object())
        .unwrap_or(false);
    Ok(if is_object {
        Format::Ndjson
    } else {
        Format::Document
    })
}

/// A buffered reader of the file's content, gunzipped when it starts with the gzip magic bytes.
pub(super) fn open(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    decoded(File::open(path)?)
}

/// `open` for the pass that imports the file: its pages leave the page cache once read.
pub(super) fn open_to_import(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    decoded(ReadOnce::new(File::open(path)?))
}

pub(super) fn decoded(file: impl Read + 'static) -> std::io::Result<Box<dyn BufRead>> {
    let mut file = BufReader::with_capacity(1 << 20, file);
    let gzipped = file.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzipped {
        Box::new(BufReader::with_capacity(1 << 20, MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    })
}

/// A JSON document file, decompressed, in memory (parsing from a slice is several times faster).
pub(super) fn read_whole(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut document = Vec::new();
    open(path)?.read_to_end(&mut document)?;
    Ok(document)
}

#[derive(Deserialize)]
pub(super) struct BundleIds {
    #[serde(rename = "resourceType")]
    pub(super) resource_type: Option<String>,
    #[serde(default)]
    pub(super) entry: Vec<EntryIds>,
}

#[derive(Deserialize)]
pub(super) struct EntryIds {
    #[serde(rename = "fullUrl")]
    pub(super) full_url: Option<String>,
    pub(super) resource: Option<ResourceIds>,
}

#[derive(Deserialize)]
pub(super) struct ResourceIds {
    #[serde(rename = "resourceType")]
    pub(super) resource_type: Option<String>,
    pub(super) id: Option<String>,
}

/// `urn:` fullUrl -> `Type/id` for every Bundle entry in the document files.
pub(super) fn collect_urns(files: &[InputFile]) -> HashMap<String, String> {
    let mut urns = HashMap::new();
    for file in files.iter().filter(|f| f.format == Format::Document) {
        let Ok(document) = read_whole(&file.path) else {
            continue;
        };
        let Ok(bundle) = serde_json::from_slice::<BundleIds>(&document) else {
            continue;
        };
        if bundle.resource_type.as_deref() != Some("Bundle") {
            continue;
        }
        for entry in bundle.entry {
            let (Some(url), Some(resource)) = (entry.full_url, entry.resource) else {
                continue;
            };
            let Some(resource_type) = resource.resource_type else {
                continue;
            };
            if let Some(id) = resource
                .id
                .or_else(|| url.strip_prefix("urn:uuid:").map(str::to_string))
            {
                if url.starts_with("urn:") {
                    urns.insert(url, format!("{resource_type}/{id}"));
                }
            }
        }
    }
    urns
}
