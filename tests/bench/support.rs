//! What the benches share: the handler binary, a free loopback port, a child process that is
//! killed when dropped, `handler serve` once it listens, a process's peak memory.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn handler() -> Command {
    Command::new(env!("CARGO_BIN_EXE_handler"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process (a server, Azurite) killed when dropped.
pub struct Serve(pub Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to its end, which must be a success; its output is dropped.
pub fn run(mut command: Command) {
    let status = command.stdout(Stdio::null()).status().unwrap();
    assert!(status.success(), "{command:?} failed");
}

/// `handler serve` on `store` writing to `exports`, with `extra` arguments, once it listens; and
/// its base URL.
pub fn start_serve(store: &Path, exports: &Path, extra: &[&str]) -> (Serve, String) {
    let port = free_port();
    let serve = Serve(
        handler()
            .args(["serve", "--port", &port.to_string()])
            .arg("--store")
            .arg(store)
            .arg("--exports")
            .arg(exports)
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (serve, format!("http://127.0.0.1:{port}"))
}

/// Peak resident memory (VmHWM) of a running process, in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The manifest of the export a kickoff response (`202`) started, polled for until it is ready.
pub async fn manifest_after(
    client: &reqwest::Client,
    kickoff: reqwest::Response,
) -> serde_json::Value {
    assert_eq!(kickoff.status(), 202, "{}", kickoff.url());
    let status = kickoff.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    loop {
        let response = client.get(&status).send().await.unwrap();
        match response.status().as_u16() {
            200 => return response.json().await.unwrap(),
            202 => tokio::time::sleep(Duration::from_millis(5)).await,
            other => panic!("{status}: {other} {}", response.text().await.unwrap()),
        }
    }
}
