//! The `safeclock` binary as an operator uses it: `check-config`, `demo`, and `run all` against a
//! real broker with SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");

/// A plain HTTP/1.1 GET; returns status and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

#[cfg(not(feature = "gssapi"))]
#[test]
fn without_the_gssapi_feature_kerberos_fails_at_start_with_the_feature_to_build_with() {
    for (contents, field) in [
        (
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"GSSAPI\"\n",
            "kafka.properties.sasl.mechanism",
        ),
        (
            // librdkafka's default mechanism is GSSAPI.
            "[kafka.consumer_properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n",
            "kafka.consumer_properties.security.protocol",
        ),
    ] {
        let f = config_file(contents);
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(f.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{contents}");
        assert!(stderr.contains(field), "{contents}: {stderr}");
        assert!(stderr.contains("--features gssapi"), "{stderr}");
    }
}

#[test]
fn check_config_accepts_a_valid_file_and_names_the_field_of_an_invalid_one() {
    let valid = config_file(
        "[kafka]\nbrokers = \"kafka-1:9092,kafka-2:9092\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.password\" = \"hunter2\"\n",
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(valid.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(!stdout.contains("hunter2"));
    assert!(stdout.contains("kafka client: librdkafka"), "{stdout}");

    for (contents, field) in [
        ("[clock]\ntick_interval_ms = 0\n", "clock.tick_interval_ms"),
        ("[kafka]\nbrokers = \"\"\n", "kafka.brokers"),
        ("[escalator]\nlog_receivr = true\n", "log_receivr"),
        (
            "[[escalator.webhooks]]\nname = \"duty\"\nurl = \"duty.example\"\n",
            "escalator.webhooks[0].url",
        ),
        (
            "[[escalator.policies]]\nname = \"night\"\nlevels = [{ receivers = [\"pager\"] }]\n",
            "escalator.policies[0].levels[0].receivers",
        ),
        (
            "[[escalator.receivers]]\nname = \"pd\"\nkind = \"pagerduty\"\n",
            "escalator.receivers[0].routing_key",
        ),
    ] {
        let f = config_file(contents);
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(f.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{contents:?} should be refused");
        assert!(
            stderr.contains(field),
            "error for {contents:?} should name {field}: {stderr}"
        );
    }

    // The example deployment configuration is valid once its secrets are in the environment.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/config/example.toml"
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config", example])
        .env("SAFECLOCK_PAGERDUTY_ROUTING_KEY", "R0UT1NGKEY0123456789")
        .env(
            "SAFECLOCK_MASH_WEBHOOK_URL",
            "https://mash.force.example/hook",
        )
        .env("SAFECLOCK_MASH_WEBHOOK_SECRET", "a-shared-secret")
        .env("SAFECLOCK_SMTP_PASSWORD", "smtp-password")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [
        "R0UT1NGKEY",
        "a-shared-secret",
        "smtp-password",
        "mash.force.example",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed: {stdout}");
    }

    // Environment variables override the file and are validated too.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(valid.path())
        .env("SAFECLOCK__OPS__LISTEN", "nowhere")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

#[test]
fn demo_prints_breaches_and_escalations_serves_metrics_and_exits_zero() {
    let stderr_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--duration", "10", "--http", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(stderr_file.reopen().unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut metrics = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        if metrics.is_none() {
            if let Some(url) = line.trim().strip_prefix("metrics:  curl http://") {
                let addr = url.trim_end_matches("/metrics").to_string();
                // Served while the demo runs.
                let (status, body) = http_get(&addr, "/metrics").expect("metrics endpoint answers");
                assert_eq!(status, 200);
                assert!(body.contains("safeclock_"), "{body}");
                metrics = Some(addr);
            }
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(stderr_file.path()).unwrap_or_default();
    let text = format!("{}\n--- stderr ---\n{stderr}", lines.join("\n"));
    assert!(status.success(), "demo exit status {status}\n{text}");
    assert!(
        metrics.is_some(),
        "the demo printed no metrics address\n{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "demo overran --duration"
    );
    assert!(
        text.lines().any(|l| l.contains("BREACHED")
            && l.contains("nottinghamshire")
            && l.contains("victim-contact")
            && l.contains("R-NOTT-ORIGIN")),
        "{text}"
    );
    assert!(
        text.contains("ESCALATE") && text.contains("duty-inspector"),
        "{text}"
    );
    assert!(text.contains("DEADLTR"), "{text}");
    assert!(text.contains("summary after"), "{text}");
}

/// `safeclock run all` against the real broker: becomes ready, serves metrics, and stops cleanly
/// on SIGTERM within the grace period.
#[test]
fn run_all_becomes_ready_and_stops_on_sigterm() {
    let brokers = std::env::var("SAFECLOCK_TEST_BROKERS").expect(
        "SAFECLOCK_TEST_BROKERS is not set: run the suite with scripts/test.sh (starts a real broker)",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ops = format!("127.0.0.1:{port}");
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let mut child = Command::new(BIN)
        .args(["--log-json", "run", "all"])
        .env("SAFECLOCK__KAFKA__BROKERS", &brokers)
        .env("SAFECLOCK__KAFKA__TOPIC_PREFIX", format!("cli-{tag}."))
        .env("SAFECLOCK__KAFKA__PARTITIONS", "2")
        .env("SAFECLOCK__CLOCK__GROUP_ID", format!("cli-{tag}-clock"))
        .env(
            "SAFECLOCK__ESCALATOR__GROUP_ID",
            format!("cli-{tag}-escalator"),
        )
        .env(
            "SAFECLOCK__EXPORTER__GROUP_ID",
            format!("cli-{tag}-exporter"),
        )
        .env("SAFECLOCK__OPS__LISTEN", &ops)
        .env("SAFECLOCK__SHUTDOWN__GRACE_PERIOD_SECS", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = http_get(&ops, "/readyz") {
            break;
        }
        assert!(Instant::now() < deadline, "not ready within 60 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "safeclock exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http_get(&ops, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("safeclock_clock_open_clocks"), "{body}");

    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "did not stop within the grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}: {stderr}");
    // --log-json: every log line is a JSON object.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(stderr.contains("clock stopped"), "{stderr}");
}

#[test]
fn deadline_prints_the_worked_examples_of_the_working_day_convention() {
    for (start, target, want) in [
        (
            "2022-05-27T10:00:00+01:00",
            "15 working days",
            "2022-06-22T00:00:00+01:00",
        ),
        (
            "2026-11-29T10:00:00Z",
            "1 working day",
            "2026-12-01T00:00:00+00:00",
        ),
        (
            "2026-12-23T16:00:00Z",
            "2 working days",
            "2026-12-30T00:00:00+00:00",
        ),
        ("2026-03-27T10:00:00Z", "72h", "2026-03-30T11:00:00+01:00"),
        (
            "2026-12-04T19:00:00Z",
            "next school day",
            "2026-12-07T08:30:00+00:00",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["deadline", "--start", start, "--target", target])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "{start} + {target}"
        );
    }
    let out = Command::new(BIN)
        .args([
            "deadline",
            "--start",
            "2026-11-29T10:00:00Z",
            "--target",
            "soonish",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("working days"));
}

#[test]
fn explain_prints_the_timeline_of_the_origin_case() {
    let events = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/cases/grooming-unanswered-5-days.jsonl"
    );
    let out = Command::new(BIN)
        .args(["explain", "--events", events])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let timeline: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("victim-contact: "))
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let timeline = timeline.join("\n");
    for want in [
        "why: started by event",
        "STARTED",
        "WARNING",
        "BREACHED",
        "MET_LATE",
        "outcome: met late",
    ] {
        assert!(timeline.contains(want), "missing {want:?} in\n{timeline}");
    }
}
