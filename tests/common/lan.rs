//! A real `fastsync serve` for the LAN tests (tests/remote.rs, tests/secure.rs): [`Server`] starts one on
//! 127.0.0.1:0 and kills it when dropped; [`Case`] holds a case's directories and token file.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

pub const TOKEN: &str = "remote-test-token-51aa0e";

/// A running `fastsync serve ROOT --listen 127.0.0.1:0`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub root: PathBuf,
}

impl Server {
    pub fn start(root: &Path, token_file: &Path) -> Server {
        Server::start_with(root, token_file, &[])
    }

    pub fn start_with(root: &Path, token_file: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(root, token_file, extra, &[])
    }

    /// As [`Server::start_with`], with `env` set in the server's environment.
    pub fn start_with_env(root: &Path, token_file: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        fs::create_dir_all(root).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve").arg(root).args(["--listen", "127.0.0.1:0", "--token-file"]).arg(token_file).args(extra);
        for var in ["TOKEN", "ENGINE", "CORES", "MEMORY_PROFILE", "MEMORY_LIMIT", "CONFIG"] {
            cmd.env_remove(format!("FASTSYNC_{var}"));
        }
        // What the caller asks for wins over the variables removed above.
        cmd.envs(env.iter().copied());
        cmd.env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests");
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("serve started");
            // fastsync: serving ROOT on 127.0.0.1:PORT
            if let Some(at) = line.rfind(" on 127.0.0.1:") {
                let rest = &line[at + " on 127.0.0.1:".len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                break digits.parse().unwrap();
            }
        };
        Server { child, port, root: root.to_path_buf() }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `fastsync://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!("fastsync://127.0.0.1:{}/{path}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A case's directories: the served root, the local side, and the token file.
pub struct Case {
    pub dir: tempfile::TempDir,
    pub token: PathBuf,
}

impl Case {
    pub fn new() -> Case {
        let dir = tmp();
        let token = dir.path().join("token");
        fs::write(&token, format!("{TOKEN}\n")).unwrap();
        Case { dir, token }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn serve(&self) -> Server {
        Server::start(&self.path("served"), &self.token)
    }

    /// `fastsync --token-file TOKEN` (arguments follow).
    pub fn cmd(&self) -> Cmd {
        fastsync().arg("--token-file").arg(&self.token)
    }
}

pub fn json_summary(out: &Output) -> serde_json::Value {
    let text = out.stdout_str();
    let last = text.lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {text}"))
}
