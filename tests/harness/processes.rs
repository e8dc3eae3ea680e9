//! `safeclock run <service>` as a child process, for the tests that kill one: SIGKILL is the
//! crash a machine has, and only a separate process can take it. One type so every such test
//! starts, logs, kills and stops a service the same way, and none leaves a process behind.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::signal;

/// A running `safeclock run <service>`, SIGKILLed and reaped when dropped, however the test ends.
pub struct ServiceProcess {
    child: Option<Child>,
    /// The ops listener (`/readyz`, `/metrics`), `host:port`.
    pub ops: String,
}

impl ServiceProcess {
    /// Spawns `command` (a `safeclock run <service> ...` the caller has set up) with its ops
    /// listener on `ops`. Its log is appended to `log`; without one it goes to a file of its own
    /// in `SAFECLOCK_TEST_LOG_DIR` when that is set (for diagnosis), else nowhere.
    pub fn spawn(command: &mut Command, ops: &str, log: Option<&Path>) -> Self {
        let stderr = match (log, std::env::var("SAFECLOCK_TEST_LOG_DIR")) {
            (Some(path), _) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            (None, Ok(dir)) => Stdio::from(
                std::fs::File::create(format!("{dir}/service-{}.log", uuid::Uuid::new_v4()))
                    .unwrap(),
            ),
            (None, Err(_)) => Stdio::null(),
        };
        let child = command
            .env("SAFECLOCK__OPS__LISTEN", ops)
            .env(
                "SAFECLOCK__TIME__OFFSET_SECS",
                super::time_offset_secs().to_string(),
            )
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            ops: ops.to_string(),
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its resident set size in bytes (`VmRSS`), while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// SIGKILL: no drain, no final commit. Waits until the process is gone.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `within` for a clean exit (SIGKILL after that). Returns whether
    /// it exited with status 0.
    pub fn sigterm(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status, if the process ended by itself since the last look.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Waits until `GET http://{ops}/readyz` answers 2xx; fails the test after `within`.
pub async fn wait_ready(ops: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::get(format!("http://{ops}/readyz")).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{ops} not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a metric's samples on the ops endpoint `ops` (e.g. a histogram's `_sum`, a counter
/// over its labels); NaN when the endpoint does not answer.
pub async fn metric_sum(ops: &str, name: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("http://{ops}/metrics")).await else {
        return f64::NAN;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
