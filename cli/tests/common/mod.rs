//! What the binary's tests share: the `zdsync` command with a clean environment, and its output.
// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The `zdsync` binary, without credentials or a store folder from the environment, as in CI.
pub fn zdsync() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zdsync"));
    c.env_remove("ZENDESK_API_TOKEN")
        .env_remove("ZENDESK_ACCESS_TOKEN")
        .env_remove("ZDSYNC_STORE")
        .env("CI", "1");
    c
}

/// Stdout, then stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
