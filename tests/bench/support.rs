//! What the benches share: the handler binary, a free loopback port, a child process that is
//! killed when dropped.
#![allow(dead_code)]

use std::process::{Child, Command};

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
