//! The retention soak, on the real broker: 2,000,000 referrals opened and closed through a
//! running `safeclock run clock` with a short retention of closed referrals. The clock's resident
//! set and the size of its compacted state (`clock-state` on the broker's disk) must stay flat
//! after warm-up: what retention forgets (a tombstone each) makes room for what comes in.
//!
//! How the retention is made short without waiting days: `clock.closed_retention_days = 1` with
//! `validation.max_past_days = 1`, and every event occurs `EXPIRES_AFTER` seconds less than a
//! day before it is produced, so each referral is past its retention that many seconds later.
//! The compacted topics roll a segment every 10 s and the cleaner runs at a low dirty ratio, so
//! superseded states and tombstones are removed as they would be over days with the defaults.
//!
//! Every `SAMPLE` seconds it prints the referrals produced and committed, the clock's resident
//! set, `safeclock_clock_referrals_forgotten_total`, and the bytes of `clock-state` on disk
//! (blocks in use; `SAFECLOCK_BENCH_KAFKA_DIR`, the broker's data directory, which
//! `scripts/bench.sh` sets); then the second and last third's figures. Bounded: producing is
//! paced (`SAFECLOCK_BENCH_SOAK_RATE` referrals a second) and the run ends `DRAIN` seconds after
//! the last referral. Prints; checks no targets.
//!
//! `SAFECLOCK_TEST_BROKERS=host:port SAFECLOCK_BENCH_KAFKA_DIR=dir cargo bench -p safeclock
//! --bench retention_soak`; `SAFECLOCK_BENCH_SOAK_REFERRALS` (2,000,000) and
//! `SAFECLOCK_BENCH_SOAK_RATE` (5,000) change its size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use safeclock_common::config::Settings;
use safeclock_common::kafka::Topic;
use safeclock_tests::free_port;
use safeclock_tests::processes::{metric_sum, wait_ready, ServiceProcess};
use safeclock_tests::scenario::committed_offsets;

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const PARTITIONS: i32 = 6;
/// How long after it is produced a referral is past its retention.
const EXPIRES_AFTER: i64 = 30;
const SAMPLE: Duration = Duration::from_secs(10);
const DRAIN: Duration = Duration::from_secs(90);

const RULES: &str = r#"
[[rule]]
id = "soak-24h"
title = "Benchmark: a 24-hour clock"
source = "benchmark"
severity = "high"
calendar = "24x7"
target = "24h"
[[rule.start]]
event = "referral_received"
[[rule.stop]]
event = "victim_contacted"
[[rule.cancel]]
event = "referral_closed"
"#;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes under `dir` in the partition directories of `topic` (`topic-N`).
fn topic_bytes(dir: &Path, topic: &str) -> u64 {
    fn walk(path: &Path, topic: &str, inside: bool, total: &mut u64) {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_partition = name
                .strip_prefix(topic)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
            if p.is_dir() {
                walk(&p, topic, inside || is_partition, total);
            } else if inside {
                // Blocks in use: the index files are preallocated (10 MiB each) and sparse.
                *total += entry.metadata().map_or(0, |m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                });
            }
        }
    }
    let mut total = 0;
    walk(dir, topic, false, &mut total);
    total
}

struct Sample {
    secs: f64,
    produced: usize,
    committed: i64,
    rss_mib: f64,
    forgotten: f64,
    state_mib: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(brokers) = std::env::var("SAFECLOCK_TEST_BROKERS") else {
        eprintln!("SAFECLOCK_TEST_BROKERS is not set: run scripts/bench.sh");
        std::process::exit(2);
    };
    let kafka_dir = std::env::var("SAFECLOCK_BENCH_KAFKA_DIR").ok();
    let referrals = env_or("SAFECLOCK_BENCH_SOAK_REFERRALS", 2_000_000) as usize;
    let rate = env_or("SAFECLOCK_BENCH_SOAK_RATE", 5_000).max(1) as usize;
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let config = dir.path().join("safeclock.toml");
    let mut f = std::fs::File::create(&config).unwrap();
    write!(
        f,
        r#"
[kafka]
brokers = "{brokers}"
topic_prefix = "soak-{tag}."
partitions = {PARTITIONS}
# Underscores for dots, as in the defaults these override.
[kafka.compacted_topic_configs]
segment_ms = "10000"
min_cleanable_dirty_ratio = "0.1"
delete_retention_ms = "10000"
min_compaction_lag_ms = "0"
file_delete_delay_ms = "1000"
[kafka.consumer_properties]
"fetch.wait.max.ms" = "50"
[rules]
paths = ["rules.toml"]
[validation]
max_past_days = 1
[clock]
group_id = "soak-{tag}-clock"
max_batch = 2000
closed_retention_days = 1
"#
    )
    .unwrap();
    drop(f);
    let settings = Settings::load(Some(&config)).unwrap();
    let input = settings.topic(Topic::ReferralEvents);
    let changelog = settings.topic(Topic::ClockState);
    let ops = format!("127.0.0.1:{}", free_port());
    let clock = ServiceProcess::spawn(
        Command::new(BIN)
            .args(["run", "clock", "--config"])
            .arg(&config),
        &ops,
        Some(&dir.path().join("clock.log")),
    );
    wait_ready(&ops, Duration::from_secs(120)).await;
    eprintln!(
        "soak: {referrals} referrals (received, then closed) at {rate}/s on {PARTITIONS} partitions; each past its retention {EXPIRES_AFTER} s after it is produced"
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = started;
    let mut produced = 0usize;
    let mut pending = Vec::new();
    let mut done_at: Option<Instant> = None;
    loop {
        // Paced: as many referrals as the rate allows by now, in slices of 50 ms.
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as usize).min(referrals);
        let at = Timestamp::now() - SignedDuration::from_hours(24)
            + SignedDuration::from_secs(EXPIRES_AFTER);
        while produced < due {
            let referral = format!("R-SOAK-{produced:07}");
            for (n, kind) in [
                (
                    1,
                    r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}"#,
                ),
                (2, r#""referralClosed":{}"#),
            ] {
                let json = format!(
                    r#"{{"eventId":"{referral}-e{n}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}",{kind}}}"#
                );
                loop {
                    match producer.send_result(
                        FutureRecord::to(&input)
                            .key(&referral)
                            .payload(json.as_bytes()),
                    ) {
                        Ok(f) => {
                            pending.push(f);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }
            produced += 1;
        }
        for f in pending.drain(..) {
            f.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
        if produced == referrals && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        if Instant::now() >= next_sample {
            next_sample += SAMPLE;
            let (b, g, i) = (
                brokers.clone(),
                settings.clock.group_id.clone(),
                input.clone(),
            );
            let committed: i64 = tokio::task::spawn_blocking(move || {
                committed_offsets(&b, &g, &i, PARTITIONS)
                    .into_iter()
                    .filter(|o| *o > 0)
                    .sum()
            })
            .await
            .unwrap();
            let s = Sample {
                secs: started.elapsed().as_secs_f64(),
                produced,
                committed,
                rss_mib: clock.rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0),
                forgotten: metric_sum(&ops, "safeclock_clock_referrals_forgotten_total").await,
                state_mib: kafka_dir
                    .as_deref()
                    .map_or(f64::NAN, |d| topic_bytes(Path::new(d), &changelog) as f64)
                    / (1024.0 * 1024.0),
            };
            eprintln!(
                "{:>6.0} s: produced {:>8}, committed {:>8} events, clock RSS {:>6.1} MiB, forgotten {:>8}, clock-state on disk {:>7.1} MiB",
                s.secs, s.produced, s.committed, s.rss_mib, s.forgotten, s.state_mib
            );
            samples.push(s);
        }
        if done_at.is_some_and(|t| t.elapsed() >= DRAIN) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let invalid = metric_sum(&ops, "safeclock_records_invalid_total")
        .await
        .max(0.0);
    // Warm-up: the first third of the producing phase. Compare the second and last thirds.
    let producing: Vec<&Sample> = samples.iter().filter(|s| s.produced < referrals).collect();
    let third = producing.len() / 3;
    let max_of =
        |xs: &[&Sample], f: fn(&Sample) -> f64| xs.iter().map(|s| f(s)).fold(0.0, f64::max);
    if third > 0 {
        let (mid, last) = (&producing[third..2 * third], &producing[2 * third..]);
        println!(
            "soak: {referrals} referrals opened and closed in {:.0} s; forgotten {:.0}; records refused {invalid:.0}",
            samples.last().map_or(0.0, |s| s.secs),
            samples.last().map_or(0.0, |s| s.forgotten),
        );
        println!(
            "clock RSS: max {:.1} MiB in the second third of the run, {:.1} MiB in the last third; {:.1} MiB at the end",
            max_of(mid, |s| s.rss_mib),
            max_of(last, |s| s.rss_mib),
            samples.last().map_or(0.0, |s| s.rss_mib),
        );
        println!(
            "clock-state on disk: max {:.1} MiB in the second third, {:.1} MiB in the last third; {:.1} MiB at the end",
            max_of(mid, |s| s.state_mib),
            max_of(last, |s| s.state_mib),
            samples.last().map_or(0.0, |s| s.state_mib),
        );
    }
    drop(clock);
}
