//! The Node.js helper scripts in `tests/interop/` (a headless-browser driver, a third-party OAuth
//! server) as child processes: the prerequisite check that either skips on request or fails with
//! an install hint, stderr capture for failure messages, and a shutdown that never leaves a
//! process behind.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command},
};

pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// `node` as missing-prerequisite text, when it does not run.
pub fn missing_node() -> Option<String> {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
        .then(|| "node (Node.js ≥ 20.19)".to_string())
}

/// Whether `test` may run given what is `missing`: true when nothing is; false (with a visible
/// note) when `skip_env=1` asks to skip; otherwise panics with `install_hint`.
pub fn run_or_skip(test: &str, missing: &[String], skip_env: &str, install_hint: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    if std::env::var(skip_env).as_deref() == Ok("1") {
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests, and a
        // skip must be visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: missing {} ({skip_env}=1)",
            missing.join(", ")
        );
        return false;
    }
    panic!("{test} needs {}: {install_hint}", missing.join(", "));
}

/// A script under `tests/interop/` run by node, stdin/stdout/stderr piped.
pub fn command(script: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(interop_dir().join(script))
        .current_dir(interop_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A running script: stdin held open (closing it asks the script to exit), stderr collected.
pub struct Script {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// How long a drop waits for the script to exit on its own before killing it.
    grace: Duration,
}

impl Script {
    /// Spawns `cmd` (from [`command`]); returns the script and its stdout to read answers from.
    pub fn spawn(mut cmd: Command, grace: Duration) -> (Script, ChildStdout) {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    stderr.lock().unwrap().push(line);
                }
            });
        }
        let script = Script {
            child,
            stdin,
            stderr,
            grace,
        };
        (script, stdout)
    }

    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("script stdin open")
    }

    /// What the script wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Script {
    /// Closing stdin makes the script clean up and exit; if it does not within the grace period
    /// it is killed.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.start_kill();
    }
}
