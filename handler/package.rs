//! `handler package`: the Azure Functions deployment zip: the `handler` binary (executable),
//! `host.json`, and one folder per function with its `function.json`, all at the zip's root.
//! The configuration files are built into the binary, so the zip always matches the code.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

pub const HOST_JSON: &str = include_str!("../host.json");

/// `(function name, function.json)` for every function of the app.
pub const FUNCTIONS: [(&str, &str); 13] = [
    (
        "SystemExport",
        include_str!("../functions/SystemExport/function.json"),
    ),
    (
        "PatientExport",
        include_str!("../functions/PatientExport/function.json"),
    ),
    (
        "GroupExport",
        include_str!("../functions/GroupExport/function.json"),
    ),
    (
        "SystemExportV4",
        include_str!("../functions/SystemExportV4/function.json"),
    ),
    (
        "PatientExportV4",
        include_str!("../functions/PatientExportV4/function.json"),
    ),
    (
        "GroupExportV4",
        include_str!("../functions/GroupExportV4/function.json"),
    ),
    (
        "ViewExport",
        include_str!("../functions/ViewExport/function.json"),
    ),
    (
        "ExportStatus",
        include_str!("../functions/ExportStatus/function.json"),
    ),
    (
        "ExportFiles",
        include_str!("../functions/ExportFiles/function.json"),
    ),
    (
        "Metadata",
        include_str!("../functions/Metadata/function.json"),
    ),
    (
        "SmartConfiguration",
        include_str!("../functions/SmartConfiguration/function.json"),
    ),
    (
        "ShardWorker",
        include_str!("../functions/ShardWorker/function.json"),
    ),
    (
        "StaleSweeper",
        include_str!("../functions/StaleSweeper/function.json"),
    ),
];

/// What went into the zip.
#[derive(Debug)]
pub struct PackageSummary {
    pub entries: Vec<String>,
    pub bytes: u64,
}

/// Writes the zip to `out` with `binary` as the app's `handler`.
pub fn write_package(out: &Path, binary: &Path) -> anyhow::Result<PackageSummary> {
    let mut executable = Vec::new();
    File::open(binary)
        .and_then(|mut f| f.read_to_end(&mut executable))
        .map_err(|e| anyhow::anyhow!("cannot read the binary {}: {e}", binary.display()))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let staged = tempfile::NamedTempFile::new_in(
        out.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    let mut zip = ZipWriter::new(staged.reopen()?);
    let text = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .unix_permissions(0o644);
    let mut entries = Vec::new();
    zip.start_file("handler", text.unix_permissions(0o755))?;
    zip.write_all(&executable)?;
    entries.push("handler".to_string());
    zip.start_file("host.json", text)?;
    zip.write_all(HOST_JSON.as_bytes())?;
    entries.push("host.json".to_string());
    for (name, function_json) in FUNCTIONS {
        let entry = format!("{name}/function.json");
        zip.start_file(entry.as_str(), text)?;
        zip.write_all(function_json.as_bytes())?;
        entries.push(entry);
    }
    zip.finish()?;
    staged.persist(out)?;
    Ok(PackageSummary {
        entries,
        bytes: std::fs::metadata(out)?.len(),
    })
}
