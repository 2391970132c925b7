//! A `gateway run` still running: the test reads the sandbox's lines as they come and acts
//! on the gateway (changes its policy file, signals it) in between.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, ChildStdout, Output, Stdio},
};

use serde_json::Value;

use super::{Finished, PRELUDE, Run};

/// Python for a live sandbox, after [`PRELUDE`]: `say` prints one JSON line at once, and
/// `wait_for` waits (up to a minute) until the test has created a file.
pub const LIVE_HELPERS: &str = r#"
def wait_for(path):
    for _ in range(1200):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    print(json.dumps({"gave_up_waiting_for": path}), flush=True)
    sys.exit(3)
def say(key, value):
    print(json.dumps({key: value}), flush=True)
"#;

pub struct Live<'a> {
    pub run: &'a Run,
    child: Child,
    stdout: BufReader<ChildStdout>,
    read: String,
    stderr: PathBuf,
}

impl<'a> Live<'a> {
    /// Starts `body` (after [`PRELUDE`] and [`LIVE_HELPERS`]) in the sandbox of `run`, with
    /// `env` added to the gateway's environment.
    pub fn python(run: &'a Run, body: &str, env: &[(&str, &str)]) -> Self {
        Self::python_with(run, &[], body, env)
    }

    /// As [`Live::python`], with `flags` given to `gateway run`.
    pub fn python_with(run: &'a Run, flags: &[&str], body: &str, env: &[(&str, &str)]) -> Self {
        let script = format!("{PRELUDE}\n{LIVE_HELPERS}\n{body}");
        let stderr = run.scratch.dir.join("gateway.stderr");
        let mut child = run
            .command_with(flags, &["python3", "-c", &script])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            run,
            child,
            stdout,
            read: String::new(),
            stderr,
        }
    }

    /// Reads the sandbox's output up to the first JSON line with `key`; returns its value.
    pub fn until(&mut self, key: &str) -> Value {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "the sandbox ended before printing `{key}`\n{}\n--- stderr\n{}",
                self.read,
                self.stderr()
            );
            self.read.push_str(&line);
            if let Some(v) = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v.get(key).cloned())
            {
                return v;
            }
        }
    }

    /// The gateway's process id.
    pub fn gateway_pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the gateway.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our own child, still running.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signal {signal} to the gateway");
    }

    /// The gateway's output so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `limit` for the gateway to exit, then as [`Live::finish`]; kills it and
    /// panics when it has not exited by then (it no longer handles its signals).
    pub fn finish_within(mut self, limit: std::time::Duration) -> Finished {
        let deadline = std::time::Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the gateway did not exit within {limit:?}\n{}\n--- stderr\n{}",
                    self.read,
                    self.stderr()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.finish()
    }

    /// Waits for the gateway to exit; its output, and the sandbox's, as `Run` gives them.
    pub fn finish(mut self) -> Finished {
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        self.read.push_str(&rest);
        let stderr = std::fs::read(&self.stderr).unwrap_or_default();
        self.run.finish(Output {
            status,
            stdout: std::mem::take(&mut self.read).into_bytes(),
            stderr,
        })
    }
}
