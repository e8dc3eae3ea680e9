//! The dashboards and rules against a real Prometheus (Debian's `prometheus`, started by
//! scripts/test.sh on loopback, scraping every second and evaluating the recording and alert
//! rules of deploy/prometheus/rules every second).
//!
//! The services run on the real broker with a known stream of events; the test points
//! Prometheus at their ops endpoint (a file_sd targets file), then:
//! - runs every PromQL expression of every dashboard in deploy/grafana/dashboards and of every
//!   rule file, and requires each to succeed;
//! - checks the key panels' values: breaches by rule, met within target, open breached clocks,
//!   time to first response;
//! - runs `promtool check metrics` on the services' `/metrics`.
//!
//! Counters are read with `increase()`, which only sees increments after a series' first
//! sample; so the stream is sent twice (two waves with the same labels) and the panels are
//! queried over a range that starts between the waves. `increase()` extrapolates to the edges of
//! its window, so counts are checked within 20 %; ratios are exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use safeclock::app::{self, Service};
use safeclock_common::kafka::Topic;
use safeclock_common::shutdown::CancellationToken;
use safeclock_tests::scenario::{contacted, received};
use safeclock_tests::{isolated_settings, produce, real_broker};

const TIMEOUT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Prometheus's URL and the file_sd targets file it watches, from scripts/test.sh.
fn prometheus() -> Option<(String, PathBuf)> {
    match (
        std::env::var("SAFECLOCK_TEST_PROMETHEUS"),
        std::env::var("SAFECLOCK_TEST_PROMETHEUS_TARGETS"),
    ) {
        (Ok(url), Ok(targets)) => Some((url, PathBuf::from(targets))),
        _ if std::env::var("CI").is_ok() => {
            panic!("SAFECLOCK_TEST_PROMETHEUS is not set: scripts/test.sh starts Prometheus")
        }
        _ => {
            eprintln!(
                "skipped: SAFECLOCK_TEST_PROMETHEUS is not set (scripts/test.sh starts a real Prometheus)"
            );
            None
        }
    }
}

/// Runs an instant query; `Err` carries Prometheus's error.
async fn query(
    http: &reqwest::Client,
    url: &str,
    expr: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let body: serde_json::Value = http
        .get(format!("{url}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The value of the first sample of `result` whose metric has every label in `labels`.
fn value(result: &[serde_json::Value], labels: &[(&str, &str)]) -> Option<f64> {
    result
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s["metric"][k] == *v))
        .and_then(|s| s["value"][1].as_str()?.parse().ok())
}

/// Every PromQL expression of the dashboards and the rule files, with Grafana's variables
/// replaced by values a real dashboard would send.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dashboards = repo().join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dashboards).unwrap() {
        let path = entry.unwrap().path();
        let board: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in board["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "1h")
                    .replace("$force", ".*")
                    .replace("$rule", "victim-contact");
                out.push((
                    format!(
                        "{} / {}",
                        path.file_name().unwrap().to_string_lossy(),
                        panel["title"].as_str().unwrap()
                    ),
                    expr,
                ));
            }
        }
    }
    let rules = repo().join("deploy/prometheus/rules");
    for entry in std::fs::read_dir(&rules).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for group in doc["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                let name = rule["record"]
                    .as_str()
                    .or(rule["alert"].as_str())
                    .unwrap()
                    .to_string();
                out.push((
                    format!("{} / {name}", path.file_name().unwrap().to_string_lossy()),
                    rule["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

/// One wave: the same four victim-contact cases with fresh ids. Per wave, for the rule
/// `victim-contact`: two met (after 8 h and 1 h), one met late (after 28 h), two breaches (the
/// late one and the unanswered one).
async fn wave(brokers: &str, input: &str, wave: u32, now: Timestamp) {
    let h = |n: i64| SignedDuration::from_hours(n);
    let cases: [(&str, i64, Option<i64>); 4] = [
        // Not yet due when received, so no tick can breach it before the contact arrives.
        ("quick", 10, Some(2)),
        ("late", 48, Some(20)),
        ("unanswered", 48, None),
        ("recent", 2, Some(1)),
    ];
    for (name, received_ago, contacted_ago) in cases {
        let referral = format!("R-W{wave}-{name}");
        produce(
            brokers,
            input,
            &referral,
            &received(
                &format!("{referral}-r"),
                &referral,
                "nottinghamshire",
                now - h(received_ago),
            ),
        )
        .await;
        if let Some(ago) = contacted_ago {
            produce(
                brokers,
                input,
                &referral,
                &contacted(
                    &format!("{referral}-c"),
                    &referral,
                    "nottinghamshire",
                    now - h(ago),
                ),
            )
            .await;
        }
    }
}

async fn wait_until<F>(http: &reqwest::Client, url: &str, what: &str, expr: &str, mut ok: F)
where
    F: FnMut(&[serde_json::Value]) -> bool,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(result) = query(http, url, expr).await {
            if ok(&result) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} ({expr})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_run_on_a_real_prometheus_with_the_expected_values() {
    let Some((url, targets)) = prometheus() else {
        return;
    };
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    // One partition, so that wave 1 creates every exporter series wave 2 moves: a series that
    // Prometheus first sees at a non-zero value adds nothing to increase(), and the exporter's
    // series are per input partition (docs/metrics.md). Sums over partitions and instances are
    // checked by the promtool rule tests.
    settings.kafka.partitions = 1;
    let settings = Arc::new(settings);
    let input = settings.topic(Topic::ReferralEvents);
    let shutdown = CancellationToken::new();
    let running = app::start(
        settings.clone(),
        Service::All,
        safeclock_tests::test_time(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .expect("services start");
    let ops = running.ops_addr;
    let job = "safeclock-exporter";
    std::fs::write(
        &targets,
        serde_json::json!([{ "targets": [ops.to_string()], "labels": { "job": job } }]).to_string(),
    )
    .unwrap();
    let http = reqwest::Client::new();
    let ready = running.readiness.clone();
    safeclock_tests::wait_for("the services to be assigned partitions", TIMEOUT, || {
        ready.is_ready()
    })
    .await;
    let up = format!("up{{job=\"{job}\",instance=\"{ops}\"}}");
    wait_until(&http, &url, "Prometheus to scrape the services", &up, |r| {
        value(r, &[]) == Some(1.0)
    })
    .await;

    // Wave 1 creates every series; wait until Prometheus has sampled them.
    let now = safeclock_tests::now();
    wave(&brokers, &input, 1, now).await;
    let breaches = r#"sum(safeclock_sla_breaches_total{rule="victim-contact"})"#;
    wait_until(&http, &url, "wave 1 in Prometheus", breaches, |r| {
        value(r, &[]) == Some(2.0)
    })
    .await;
    let met = r#"sum(safeclock_sla_transitions_total{rule="victim-contact",transition="met"})"#;
    wait_until(&http, &url, "wave 1 met in Prometheus", met, |r| {
        value(r, &[]) == Some(2.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Wave 2: the increments the panels must show. The panels' range ($__range) is set to start
    // after wave 1 was complete in Prometheus, as if a user selected "since wave 2".
    let wave_2_started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    wave(&brokers, &input, 2, now).await;
    wait_until(&http, &url, "wave 2 in Prometheus", breaches, |r| {
        value(r, &[]) == Some(4.0)
    })
    .await;
    wait_until(&http, &url, "wave 2 met in Prometheus", met, |r| {
        value(r, &[]) == Some(4.0)
    })
    .await;
    // The census runs every 5 s and the recording rules every second.
    wait_until(
        &http,
        &url,
        "the open-clock census",
        r#"force_rule_state:safeclock_sla_open_clocks:sum{rule="victim-contact",state="breached"}"#,
        |r| value(r, &[]) == Some(2.0),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every expression runs.
    let mut failures = Vec::new();
    let all = expressions();
    assert!(all.len() > 40, "found only {} expressions", all.len());
    for (name, expr) in &all {
        if let Err(e) = query(&http, &url, expr).await {
            failures.push(format!("{name}: {e}\n    {expr}"));
        }
    }
    assert!(
        failures.is_empty(),
        "expressions failed:\n{}",
        failures.join("\n")
    );

    // Key panels, as the dashboards ask them, over the range since wave 2.
    let range = format!("{}s", wave_2_started.elapsed().as_secs());
    let panel = |title: &str| -> String {
        all.iter()
            .find(|(name, _)| name.ends_with(title))
            .unwrap_or_else(|| panic!("no panel {title}"))
            .1
            .replace("[1h]", &format!("[{range}]"))
    };
    let within = |v: Option<f64>, want: f64| v.is_some_and(|v| v >= want * 0.99 && v <= want * 1.2);

    let r = query(&http, &url, &panel("SLA breaches by rule (range)"))
        .await
        .unwrap();
    let v = value(&r, &[("rule", "victim-contact")]);
    assert!(
        within(v, 2.0),
        "breaches by rule, victim-contact: {v:?} (want 2, increase() extrapolates up to 20 %)"
    );

    let r = query(&http, &url, &panel("Met within target, by rule (range)"))
        .await
        .unwrap();
    let v = value(&r, &[("rule", "victim-contact")]).unwrap();
    assert!(
        (v - 2.0 / 3.0).abs() < 0.01,
        "met within target, victim-contact: {v} (want 2/3)"
    );

    let r = query(&http, &url, &panel("Open clocks, by state"))
        .await
        .unwrap();
    assert!(
        value(&r, &[("state", "breached")]).is_some_and(|v| v >= 2.0),
        "{r:?}"
    );

    let r = query(
        &http,
        &url,
        r#"force_rule:safeclock_sla_met_within_target:ratio1d{force="nottinghamshire",rule="victim-contact"}"#,
    )
    .await
    .unwrap();
    // Over a day, so it also sees part of wave 1 (whatever increments Prometheus caught).
    let v = value(&r, &[]).unwrap();
    assert!((0.5..=1.0).contains(&v), "recorded met within target: {v}");

    // Time to first response: wave 2 contacts at 1 h, 8 h and 28 h; the median is 8 h, which
    // the victim-contact buckets (6 h, 12 h) place between 6 h and 12 h.
    let r = query(
        &http,
        &url,
        &panel("Time to first response (child victim contacted), p50 by category"),
    )
    .await
    .unwrap();
    let v = value(&r, &[("category", "grooming")]).unwrap();
    assert!(
        (6.0 * 3600.0..=12.0 * 3600.0).contains(&v),
        "p50 time to first response {v} s"
    );

    let r = query(&http, &url, &panel("Oldest open breach, by rule"))
        .await
        .unwrap();
    let v = value(&r, &[("rule", "victim-contact")]).unwrap();
    assert!(
        (23.0 * 3600.0..26.0 * 3600.0).contains(&v),
        "oldest breach age {v} s (deadline 24 h ago)"
    );

    // promtool agrees with the exposition.
    let text = http
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is installed");
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );

    std::fs::write(&targets, "[]").unwrap();
    shutdown.cancel();
    running.wait().await.unwrap();
}
