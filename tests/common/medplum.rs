//! Medplum's FHIR router and in-memory repository behind `tests/medplum/server.mjs`: a FHIR
//! server nobody here wrote, started on a loopback port with the data of an NDJSON folder.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Medplum {
    pub base: String,
    child: Child,
}

impl Medplum {
    /// Starts the adapter on the `*.ndjson` files of `data`, with `switches` (see server.mjs).
    pub fn start(data: &Path, switches: &[&str]) -> Medplum {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/medplum");
        assert!(
            dir.join("node_modules/@medplum/fhir-router").is_dir(),
            "Medplum is not installed: run tests/run.sh, or npm ci --prefix tests/medplum"
        );
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .arg("--load")
            .arg(data)
            .args(switches)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (Node.js 20.19 or later)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the Medplum adapter did not start: {line:?}"));
        Medplum {
            base: format!("http://127.0.0.1:{port}"),
            child,
        }
    }

    /// How many requests the server has answered.
    pub async fn requests(&self, client: &reqwest::Client) -> u64 {
        self.counted(client, "requests").await
    }

    /// How many searches naming patients (a `Patient/` reference in the query) it has answered.
    pub async fn searches_by_patient(&self, client: &reqwest::Client) -> u64 {
        self.counted(client, "byPatient").await
    }

    /// How many counts (`_summary=count`) it has answered.
    pub async fn counts(&self, client: &reqwest::Client) -> u64 {
        self.counted(client, "counts").await
    }

    async fn counted(&self, client: &reqwest::Client, what: &str) -> u64 {
        let answer = super::get_json(client, &format!("{}/$requests", self.base)).await;
        answer[what].as_u64().unwrap()
    }
}

impl Drop for Medplum {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
