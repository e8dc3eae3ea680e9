//! The running clock at scale, on the real broker: breach lateness with 1,000,000 open clocks,
//! the clock's resident set holding them, and the time to restore them after a SIGKILL.
//!
//! 1. Loads `referral-events` with one `referral_received` per referral, under a one-rule pack
//!    (a 24-hour clock on the 24x7 calendar), received so that the deadlines spread evenly over
//!    `SPREAD` seconds starting `LEAD` seconds from now: `SAFECLOCK_BENCH_CLOCKS` (1,000,000)
//!    open clocks.
//! 2. Runs `safeclock run clock` and `safeclock run escalator` as processes (the escalator pages
//!    a local webhook for every breach) and waits until the clock has committed every input.
//! 3. Notes the clock's resident set, SIGKILLs it, starts it again and times the restore (to
//!    `/readyz`).
//! 4. As the deadlines pass, measures for each clock the time from its deadline to the broker's
//!    append of its `breached` record (`sla-events` is created with
//!    `message.timestamp.type=LogAppendTime`, so a record's timestamp is the broker's), and from
//!    its deadline to the page's arrival at the webhook. Prints p50, p99 and the maximum.
//!
//! Bounded: every wait has a deadline, and the run ends when every breach was paged or
//! `SPREAD + LEAD + 300` seconds have passed. Prints figures; checks no targets.
//!
//! `SAFECLOCK_TEST_BROKERS=host:port cargo bench -p safeclock --bench clock_at_scale`; the services run
//! with their default producer settings unless `SAFECLOCK_BENCH_PRODUCER` (`key=value,...`) says
//! otherwise.
//! (`scripts/bench.sh` starts an Apache Kafka node and runs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use safeclock_common::config::Settings;
use safeclock_common::event::decode_sla_event;
use safeclock_common::kafka::Topic;
use safeclock_common::schema::to_jiff;
use safeclock_common::schema::v1::SlaTransition;
use safeclock_tests::processes::{metric_sum, wait_ready, ServiceProcess};
use safeclock_tests::scenario::committed_offsets;
use safeclock_tests::{free_port, reader};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const PARTITIONS: i32 = 6;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const RULES: &str = r#"
[[rule]]
id = "bench-24h"
title = "Benchmark: a 24-hour clock"
source = "benchmark"
severity = "high"
calendar = "24x7"
target = "24h"
[[rule.start]]
event = "referral_received"
[[rule.stop]]
event = "victim_contacted"
"#;

/// When each page arrived, by referral.
#[derive(Clone)]
struct Pages(Arc<Mutex<HashMap<String, Timestamp>>>);

async fn webhook(pages: Pages) -> String {
    let app = axum::Router::new().route(
        "/page",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let pages = pages.clone();
            async move {
                let at = Timestamp::now();
                if let Some(r) = body["slaEvent"]["referralId"].as_str() {
                    pages.0.lock().unwrap().entry(r.to_string()).or_insert(at);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/page")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_mib(p: &ServiceProcess) -> f64 {
    p.rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(brokers) = std::env::var("SAFECLOCK_TEST_BROKERS") else {
        eprintln!("SAFECLOCK_TEST_BROKERS is not set: run scripts/bench.sh");
        std::process::exit(2);
    };
    let clocks = env_or("SAFECLOCK_BENCH_CLOCKS", 1_000_000) as usize;
    let lead = env_or("SAFECLOCK_BENCH_LEAD_SECS", 300);
    let spread = env_or("SAFECLOCK_BENCH_SPREAD_SECS", 300);
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    // Sized for every page up front: growing a map of a million entries under the lock stalls
    // the receiver's threads, and that stall was counted as the escalator's lateness.
    let pages = Pages(Arc::new(Mutex::new(HashMap::with_capacity(clocks))));
    let hook = webhook(pages.clone()).await;
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let config = dir.path().join("safeclock.toml");
    // The services' own producer settings, unless a run asks for others
    // (`SAFECLOCK_BENCH_PRODUCER="linger.ms=5,..."`).
    let producer: String = safeclock_tests::bench_producer_properties()
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}\n"))
        .collect();
    let mut f = std::fs::File::create(&config).unwrap();
    write!(
        f,
        r#"
[kafka]
brokers = "{brokers}"
topic_prefix = "scale-{tag}."
partitions = {PARTITIONS}
[kafka.producer_properties]
{producer}
[kafka.consumer_properties]
"fetch.wait.max.ms" = "50"
# A restarted member joins once the killed one's session has expired (librdkafka's default is
# 45 s): a short session keeps that wait out of the restore figure.
"session.timeout.ms" = "6000"
[rules]
paths = ["rules.toml"]
[clock]
group_id = "scale-{tag}-clock"
max_batch = 2000
[escalator]
group_id = "scale-{tag}-escalator"
log_receiver = false
max_batch = 2000
[[escalator.receivers]]
name = "duty"
kind = "webhook"
# The bench finds each page's deadline by its referral id.
payload = "referral"
url = "{hook}"
concurrency = 128
rate_per_sec = 100000
burst = 10000
[[escalator.policies]]
name = "default"
levels = [{{ receivers = ["duty"] }}]
[exporter]
group_id = "scale-{tag}-exporter"
"#
    )
    .unwrap();
    drop(f);
    let settings = Settings::load(Some(&config)).unwrap();
    let input = settings.topic(Topic::ReferralEvents);
    let sla_topic = settings.topic(Topic::SlaEvents);

    // sla-events with the broker's append time as each record's timestamp.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let sla = NewTopic::new(&sla_topic, PARTITIONS, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    admin
        .create_topics(&[sla], &AdminOptions::new())
        .await
        .unwrap();

    // 1. The referrals: received 24 h before their deadline, deadlines spread over SPREAD
    //    seconds from LEAD seconds on.
    let t0 = Timestamp::now();
    let first_deadline = t0 + SignedDuration::from_secs(lead as i64);
    eprintln!("first deadline at {first_deadline}");
    let step = spread as f64 / clocks as f64;
    let deadline_of = |i: usize| first_deadline + SignedDuration::from_secs_f64(step * i as f64);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .unwrap();
    // Create the input topic with the configured partitions by starting the clock's topic
    // creation first: the escalator creates every topic it and the clock use.
    let mut escalator = ServiceProcess::spawn(
        Command::new(BIN)
            .args(["run", "escalator", "--config"])
            .arg(&config),
        &format!("127.0.0.1:{}", free_port()),
        Some(&dir.path().join("escalator.log")),
    );
    wait_ready(&escalator.ops.clone(), Duration::from_secs(120)).await;
    let loading = Instant::now();
    let mut sends = Vec::with_capacity(clocks);
    for i in 0..clocks {
        let referral = format!("R-S-{i:07}");
        let at = deadline_of(i) - SignedDuration::from_hours(24);
        let json = format!(
            r#"{{"eventId":"{referral}-e1","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}","referralReceived":{{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}}}}"#
        );
        loop {
            match producer.send_result(
                FutureRecord::to(&input)
                    .key(&referral)
                    .payload(json.as_bytes()),
            ) {
                Ok(f) => {
                    sends.push(f);
                    break;
                }
                Err((_, _)) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for s in sends {
        s.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let load_secs = loading.elapsed().as_secs_f64();

    // 2. The clock ingests them.
    let clock_ops = format!("127.0.0.1:{}", free_port());
    let start_clock = || {
        ServiceProcess::spawn(
            Command::new(BIN)
                .args(["run", "clock", "--config"])
                .arg(&config),
            &clock_ops,
            Some(&dir.path().join("clock.log")),
        )
    };
    let mut clock = start_clock();
    let ingesting = Instant::now();
    loop {
        let (b, g, i) = (
            brokers.clone(),
            settings.clock.group_id.clone(),
            input.clone(),
        );
        let done: i64 = tokio::task::spawn_blocking(move || {
            committed_offsets(&b, &g, &i, PARTITIONS)
                .into_iter()
                .filter(|o| *o > 0)
                .sum()
        })
        .await
        .unwrap();
        if done >= clocks as i64 {
            break;
        }
        assert!(
            Timestamp::now() < first_deadline,
            "the clock had not ingested every referral ({done}/{clocks}) by the first deadline: \
             raise SAFECLOCK_BENCH_LEAD_SECS"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ingest_secs = ingesting.elapsed().as_secs_f64();
    // Let the last state writes and the census settle, then read the resident set.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_before = rss_mib(&clock);

    // 3. SIGKILL, restart, restore.
    clock.sigkill();
    let restoring = Instant::now();
    let clock = start_clock();
    wait_ready(&clock_ops, Duration::from_secs(lead)).await;
    let ready_secs = restoring.elapsed().as_secs_f64();
    let restore_secs = metric_sum(&clock_ops, "safeclock_clock_restore_seconds_sum").await;
    let rss_after = rss_mib(&clock);
    let ready_before_first_deadline = Timestamp::now() < first_deadline;

    // 4. Breach and page lateness as the deadlines pass.
    let consumer: StreamConsumer = reader(&brokers, &[&sla_topic]);
    let mut breach_lateness: Vec<f64> = Vec::with_capacity(clocks);
    let end = first_deadline + SignedDuration::from_secs((spread + 300) as i64);
    // When each referral's breach was appended (ms since the epoch), to split the page's
    // lateness into the clock's part and the escalator's.
    let mut appended_at: HashMap<String, i64> = HashMap::with_capacity(clocks);
    while breach_lateness.len() < clocks && Timestamp::now() < end {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await else {
            continue;
        };
        let Ok(e) = decode_sla_event(m.payload().unwrap_or_default()) else {
            continue;
        };
        if e.transition() != SlaTransition::Breached || appended_at.contains_key(&e.referral_id) {
            continue;
        }
        let deadline = to_jiff(e.deadline.as_ref().unwrap()).unwrap();
        let appended = m.timestamp().to_millis().unwrap();
        appended_at.insert(e.referral_id.clone(), appended);
        breach_lateness.push(appended as f64 / 1000.0 - deadline.as_millisecond() as f64 / 1000.0);
    }
    let page_deadline = Instant::now() + Duration::from_secs(120);
    while pages.0.lock().unwrap().len() < clocks && Instant::now() < page_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // (deadline, lateness) of every page, to show where in the run lateness builds.
    let paged: Vec<(Timestamp, f64)> = pages
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(r, at)| {
            let i: usize = r.strip_prefix("R-S-")?.parse().ok()?;
            Some((
                deadline_of(i),
                at.duration_since(deadline_of(i)).as_secs_f64(),
            ))
        })
        .collect();
    // From the breach's append to the page: the escalator's part (consume, decide, write, send).
    let mut escalator_part: Vec<f64> = pages
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(r, at)| {
            let appended = appended_at.get(r)?;
            Some((at.as_millisecond() - appended) as f64 / 1000.0)
        })
        .collect();
    escalator_part.sort_by(f64::total_cmp);
    // SAFECLOCK_BENCH_DUMP=FILE: deadline, append and page of every referral (ms since the
    // epoch), for finding where lateness builds.
    if let Ok(path) = std::env::var("SAFECLOCK_BENCH_DUMP") {
        let mut out = String::from("referral,deadline_ms,appended_ms,paged_ms\n");
        for (r, at) in pages.0.lock().unwrap().iter() {
            let Some(i) = r.strip_prefix("R-S-").and_then(|i| i.parse::<usize>().ok()) else {
                continue;
            };
            let appended = appended_at.get(r).copied().unwrap_or(-1);
            out.push_str(&format!(
                "{i},{},{appended},{}\n",
                deadline_of(i).as_millisecond(),
                at.as_millisecond()
            ));
        }
        std::fs::write(path, out).unwrap();
    }
    let mut page_lateness: Vec<f64> = paged.iter().map(|(_, l)| *l).collect();
    breach_lateness.sort_by(f64::total_cmp);
    page_lateness.sort_by(f64::total_cmp);
    let rss_peak = rss_mib(&clock);
    escalator.sigterm(Duration::from_secs(30));
    drop(clock);

    println!("broker: {brokers}; {clocks} open clocks on {PARTITIONS} partitions, deadlines over {spread} s");
    println!(
        "load: {clocks} referral events produced in {load_secs:.1} s ({:.0}/s); the clock ingested them in {ingest_secs:.1} s ({:.0} events/s, each a started SLA event, an outcome and a state record)",
        clocks as f64 / load_secs,
        clocks as f64 / ingest_secs
    );
    println!(
        "clock resident set: {rss_before:.0} MiB holding {clocks} open clocks ({:.0} bytes per clock); {rss_after:.0} MiB right after the restore; {rss_peak:.0} MiB after the breaches",
        rss_before * 1024.0 * 1024.0 / clocks as f64
    );
    println!(
        "restore after SIGKILL: {restore_secs:.1} s reading and importing the changelog ({:.0} clocks/s); {ready_secs:.1} s from the new process's start to ready (joining the group after the killed member's 6 s session, then the restore){}",
        clocks as f64 / restore_secs,
        if ready_before_first_deadline { "" } else { "; NOT ready before the first deadline" }
    );
    let ms = |v: f64| v * 1000.0;
    println!(
        "deadline -> broker append of the breach: {} of {clocks}; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        breach_lateness.len(),
        ms(percentile(&breach_lateness, 0.5)),
        ms(percentile(&breach_lateness, 0.99)),
        ms(breach_lateness.last().copied().unwrap_or(f64::NAN))
    );
    println!(
        "deadline -> page at the local webhook: {} of {clocks}; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        page_lateness.len(),
        ms(percentile(&page_lateness, 0.5)),
        ms(percentile(&page_lateness, 0.99)),
        ms(page_lateness.last().copied().unwrap_or(f64::NAN))
    );
    println!(
        "breach append -> page (the escalator's part): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms(percentile(&escalator_part, 0.5)),
        ms(percentile(&escalator_part, 0.99)),
        ms(escalator_part.last().copied().unwrap_or(f64::NAN))
    );
    // By window of deadlines: a constant lateness, one that grows, or bursts.
    let window = (spread / 10).max(1);
    let mut windows: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (deadline, late) in &paged {
        let offset = deadline.duration_since(first_deadline).as_secs().max(0) as u64;
        windows.entry(offset / window).or_default().push(*late);
    }
    let rows: Vec<String> = windows
        .into_iter()
        .map(|(w, mut late)| {
            late.sort_by(f64::total_cmp);
            format!(
                "{}-{} s: p50 {:.0}, p99 {:.0}, max {:.0}",
                w * window,
                (w + 1) * window,
                ms(percentile(&late, 0.5)),
                ms(percentile(&late, 0.99)),
                ms(late.last().copied().unwrap_or(f64::NAN))
            )
        })
        .collect();
    println!("page lateness (ms) by deadline window: {}", rows.join("; "));
}
