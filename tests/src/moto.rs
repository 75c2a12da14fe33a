//! A moto server (local AWS emulator) for the tests of the AWS adapters.
//!
//! `ZDSYNC_MOTO` names the `moto_server` binary (scripts/test.sh installs it in a venv), else it
//! is looked up on `PATH`. Without it the tests fail with the fix: they never skip silently.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zdsync::aws::AwsConfig;

pub const REGION: &str = "us-east-1";

/// A moto server on a free 127.0.0.1 port, killed (by PID) when dropped.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `moto_server` binary: `ZDSYNC_MOTO`, else the one on `PATH`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ZDSYNC_MOTO").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "ZDSYNC_MOTO={} does not exist: run scripts/test.sh (it installs moto[server] in a \
             venv) or point ZDSYNC_MOTO at a moto_server binary",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("moto_server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "moto_server not found: set ZDSYNC_MOTO to a moto_server binary or put one on \
                 PATH (python3 -m venv v && v/bin/pip install 'moto[server]==5.2.5'); \
                 scripts/test.sh does this for you"
            )
        })
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

impl Moto {
    /// Starts moto and waits (at most 60 s) until it answers.
    pub fn start() -> Moto {
        let bin = binary();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !answers(port) {
            if let Some(status) = moto.child.try_wait().expect("moto status") {
                panic!("{} exited before answering ({status})", bin.display());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on {} within 60 s",
                moto.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// SDK settings for this server (static test keys).
    pub fn config(&self) -> AwsConfig {
        AwsConfig::new(Some(&self.url), Some(REGION)).with_static_credentials("testing", "testing")
    }

    /// The environment a child process (`zdsync`) needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.url.clone()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }
}
