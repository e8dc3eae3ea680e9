//! The fault suite: every service as real processes (two clocks, two escalators, two exporters)
//! on an Apache Kafka cluster of its own (one controller and three brokers, replication factor
//! 3, `min.insync.replicas=2`), while faults are injected at random points: SIGKILL and SIGTERM
//! of an instance of every service, SIGKILL of the broker that leads most partitions, a broker
//! restart, a controller restart, a broker stalled (SIGSTOP) past its session timeout, a slow
//! and then failing receiver, and a burst of 100,000 events during which a clock is killed and
//! a third clock joins and leaves (rebalances under load). Then it checks the invariants and
//! writes a report (figures for docs/reliability.md):
//!
//! 1. every SLA event a single, fault-free engine derives from the same input was published
//!    (so no clock was lost), and none other; each clock that should breach has exactly one
//!    breached record by id;
//! 2. each breach reached the receiver at least once, and every page of one escalation carries
//!    the same `dedupKey` (so repeats de-duplicate);
//! 3. the dead-letter topic holds exactly the invalid records that were sent, nothing valid;
//! 4. the exporters together counted every referral, transition and breach; a transition
//!    counted twice must have been published twice (the over-count is reported);
//! 5. no service stopped by itself (a supervisor would restart it; the suite does, and counts
//!    it as a violation).
//!
//! Bounded: `SAFECLOCK_FAULT_ROUNDS` rounds of the eleven faults (default 1), a deadline on
//! every wait; `SAFECLOCK_FAULT_SEED` replays a run. `scripts/faults.sh` runs it on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_clock::engine::Engine;
use safeclock_common::config::Settings;
use safeclock_common::event::decode_sla_event;
use safeclock_common::kafka::{dlq_headers, Topic};
use safeclock_common::policy::Policy;
use safeclock_common::schema::from_jiff;
use safeclock_common::schema::v1::{
    referral_event::Kind, AgeBand, Allocated, Category, DeviceExamined, DeviceSeized,
    ReferralClosed, ReferralDecisionMade, ReferralEvent, ReferralReceived, RiskAssessed, RiskGrade,
    SlaEvent, SlaTransition, VictimContacted,
};
use safeclock_tests::kafka_cluster::{KafkaCluster, CONTROLLER};
use safeclock_tests::processes::{wait_ready, ServiceProcess};
use safeclock_tests::{free_port, header, reader};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const PARTITIONS: i32 = 6;
const BURST_EVENTS: usize = 100_000;
/// Referrals of the breach cohort sent between two faults.
const BREACHES_PER_STEP: usize = 25;
/// How long the end of the run may take to catch up.
const SETTLE: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

fn event(referral: &str, n: u32, at: Timestamp, kind: Kind) -> ReferralEvent {
    ReferralEvent {
        event_id: format!("{referral}-e{n}"),
        referral_id: referral.to_string(),
        force_id: "nottinghamshire".into(),
        occurred_at: Some(from_jiff(at)),
        recorded_at: Some(from_jiff(at)),
        source_system: "fault-suite".into(),
        kind: Some(kind),
    }
}

fn received(referral: &str, at: Timestamp, i: usize) -> ReferralEvent {
    let categories = [
        Category::Grooming,
        Category::Neglect,
        Category::PhysicalAbuse,
        Category::OnlineAbuse,
        Category::ChildSexualAbuse,
    ];
    event(
        referral,
        1,
        at,
        Kind::ReferralReceived(ReferralReceived {
            category: categories[i % categories.len()] as i32,
            risk: [RiskGrade::Low, RiskGrade::Medium, RiskGrade::High][i % 3] as i32,
            child_age_band: AgeBand::Aged13To15 as i32,
            area: "city".into(),
            team: "mash".into(),
            referrer: "school".into(),
        }),
    )
}

/// A referral of the breach cohort: received `age` (about 30 hours, see [`cohort_age`]) before
/// `t0` and left open, so its shorter clocks breach as soon as the clock sees it and its longer
/// ones stay running.
fn breach_cohort(i: usize, t0: Timestamp, age: SignedDuration) -> ReferralEvent {
    received(&format!("R-FB-{i:05}"), t0 - age, i)
}

/// The burst: whole lifecycles of the last few minutes, a minute between steps and the
/// referral closed at the end, 8 events per referral. Every step comes well inside its
/// timescale, so the SLA events do not depend on how the events are batched.
fn burst(t0: Timestamp) -> Vec<ReferralEvent> {
    let referrals = BURST_EVENTS / 8;
    let start = t0 - SignedDuration::from_mins(10);
    let m = SignedDuration::from_mins;
    let mut out = Vec::with_capacity(BURST_EVENTS);
    for i in 0..referrals {
        let r = format!("R-FX-{i:06}");
        let t = start + SignedDuration::from_millis(i as i64);
        out.push(received(&r, t, i));
        out.push(event(
            &r,
            2,
            t + m(1),
            Kind::ReferralDecisionMade(ReferralDecisionMade {
                decision: "section-47".into(),
                referrer_acknowledged: true,
            }),
        ));
        out.push(event(
            &r,
            3,
            t + m(2),
            Kind::Allocated(Allocated {
                team: "pvp".into(),
                specialist_trained: true,
            }),
        ));
        out.push(event(
            &r,
            4,
            t + m(3),
            Kind::VictimContacted(VictimContacted {}),
        ));
        out.push(event(
            &r,
            5,
            t + m(4),
            Kind::RiskAssessed(RiskAssessed {
                risk: RiskGrade::High as i32,
            }),
        ));
        out.push(event(
            &r,
            6,
            t + m(5),
            Kind::DeviceSeized(DeviceSeized {
                device_ref: "DEV-1".into(),
            }),
        ));
        out.push(event(
            &r,
            7,
            t + m(6),
            Kind::DeviceExamined(DeviceExamined {
                device_ref: "DEV-1".into(),
            }),
        ));
        out.push(event(
            &r,
            8,
            t + m(7),
            Kind::ReferralClosed(ReferralClosed {
                outcome: "charged".into(),
            }),
        ));
    }
    out
}

/// Invalid records, one of each kind a producer gets wrong; each must end in dead letters.
fn invalid_records(t0: Timestamp) -> Vec<(String, Vec<u8>)> {
    let at = t0 - SignedDuration::from_hours(1);
    vec![
        ("R-FBAD-1".into(), b"{not json".to_vec()),
        (
            "R-FBAD-2".into(),
            format!(r#"{{"eventId":"bad-2","referralId":"R-FBAD-2","forceId":"nottinghamshire","occurredAt":"{at}","recordedAt":"{at}","sourceSystem":"x","somethingElse":{{}}}}"#).into_bytes(),
        ),
        (
            "R-FBAD-3".into(),
            format!(r#"{{"eventId":"bad-3","forceId":"nottinghamshire","occurredAt":"{at}","recordedAt":"{at}","sourceSystem":"x","victimContacted":{{}}}}"#).into_bytes(),
        ),
        (
            "R-FBAD-4".into(),
            r#"{"eventId":"bad-4","referralId":"R-FBAD-4","forceId":"nottinghamshire","occurredAt":"1970-01-01T00:00:00Z","recordedAt":"1970-01-01T00:00:00Z","sourceSystem":"x","victimContacted":{}}"#.as_bytes().to_vec(),
        ),
        (
            "R-FBAD-5".into(),
            format!(r#"{{"eventId":"bad-5","referralId":"R-FBAD-5","forceId":"atlantis","occurredAt":"{at}","recordedAt":"{at}","sourceSystem":"x","victimContacted":{{}}}}"#).into_bytes(),
        ),
        ("R-FBAD-6".into(), Vec::new()),
        ("R-FBAD-7".into(), b"[1,2,3]".to_vec()),
    ]
}

/// Which clock an SLA event belongs to: referral, rule and clock id. The clock id alone is the
/// id of the event that started the clock, which every rule that event started shares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ClockKey {
    referral: String,
    rule: String,
    clock: String,
}

impl ClockKey {
    fn of(e: &SlaEvent) -> Self {
        Self {
            referral: e.referral_id.clone(),
            rule: e.rule_id.clone(),
            clock: e.clock_id.clone(),
        }
    }
}

/// How far before `t0` the breach cohort is received: 30 hours, or the nearest whole hour to
/// it (up to 12 hours either way) for which none of the cohort's clocks has a warning or a
/// deadline in the run's window. Whether a working-day rule such as `referral-decision` has
/// breached 30 hours after the start depends on the weekday and hour; this choice makes the
/// expected SLA events the same whenever in the window the system processes the cohort, so
/// they can be checked by id at any date and hour (the suite runs in CI at whatever time a
/// push happens, and `scripts/time-matrix.sh` runs it at chosen ones).
fn cohort_age(policy: &Policy, t0: Timestamp, window: SignedDuration) -> SignedDuration {
    let candidates = (0..=24).map(|i: i64| {
        let delta = if i % 2 == 0 { i / 2 } else { -(i + 1) / 2 };
        SignedDuration::from_hours(30 + delta)
    });
    for age in candidates {
        let cohort: Vec<ReferralEvent> = (0..30)
            .map(|i| received(&format!("R-PROBE-{i}"), t0 - age, i))
            .collect();
        let before = oracle(policy, &cohort, t0 - SignedDuration::from_mins(1), false);
        let after = oracle(policy, &cohort, t0 + window, false);
        if before.keys().eq(after.keys()) {
            return age;
        }
    }
    panic!("no cohort age within 18..42 hours keeps every deadline out of the run's window");
}

/// The SLA events one fault-free engine derives from `events` (in order per referral) at
/// `now`: (SLA event id, transition, clock id). `tick_each` ticks after every event, as if
/// every event came in a batch of its own; a workload whose result depends on that (or on
/// `now`) cannot be checked by id, so the suite refuses it.
fn oracle(
    policy: &Policy,
    events: &[ReferralEvent],
    now: Timestamp,
    tick_each: bool,
) -> BTreeMap<String, (SlaTransition, ClockKey)> {
    let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
    let mut out = BTreeMap::new();
    let mut keep = |evs: Vec<safeclock_common::schema::v1::SlaEvent>| {
        for e in evs {
            out.insert(e.sla_event_id.clone(), (e.transition(), ClockKey::of(&e)));
        }
    };
    for e in events {
        keep(engine.on_event(e, now).unwrap());
        if tick_each {
            keep(engine.on_tick(now));
        }
    }
    keep(engine.on_tick(now));
    out
}

// ---------------------------------------------------------------------------------------------
// The system under test: processes and a receiver
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Svc {
    Clock,
    Escalator,
    Exporter,
}

impl Svc {
    fn name(self) -> &'static str {
        match self {
            Svc::Clock => "clock",
            Svc::Escalator => "escalator",
            Svc::Exporter => "exporter",
        }
    }
}

/// One `safeclock run <service>` process slot; restarts keep the slot's ops port and log.
struct Instance {
    svc: Svc,
    slot: usize,
    ops: String,
    log: PathBuf,
    process: Option<ServiceProcess>,
}

impl Instance {
    fn label(&self) -> String {
        format!("{}-{}", self.svc.name(), self.slot)
    }

    fn start(&mut self, config: &Path) {
        self.process = Some(ServiceProcess::spawn(
            Command::new(BIN)
                .args(["run", self.svc.name(), "--config"])
                .arg(config),
            &self.ops,
            Some(&self.log),
        ));
    }

    fn sigkill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.sigkill();
        }
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after 30 s). Returns whether it exited 0.
    fn sigterm(&mut self) -> bool {
        self.process
            .take()
            .is_none_or(|mut p| p.sigterm(Duration::from_secs(30)))
    }

    /// Whether the process exited by itself (it is then restarted, as a supervisor would).
    fn exited(&mut self) -> Option<String> {
        let status = self.process.as_mut()?.exited()?;
        self.process = None;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("Error") || l.contains("error:"))
            .rev()
            .take(2)
            .collect();
        Some(format!(
            "{} exited by itself ({status}); last errors: {last:?}",
            self.label()
        ))
    }
}

/// How the receiver answers.
const ANSWER_OK: u8 = 0;
const ANSWER_SLOW: u8 = 1;
const ANSWER_FAIL: u8 = 2;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Page {
    escalation_id: String,
    dedup_key: String,
    delivery_id: String,
    notification: String,
    sla_event_id: String,
    answered: u16,
    slowly: bool,
}

async fn receiver(mode: Arc<AtomicU8>, pages: Arc<Mutex<Vec<Page>>>) -> String {
    let app = axum::Router::new().route(
        "/page",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let (mode, pages) = (mode.clone(), pages.clone());
            async move {
                let m = mode.load(Ordering::SeqCst);
                if m == ANSWER_SLOW {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                let answered = if m == ANSWER_FAIL { 500 } else { 200 };
                let s = |k: &str| body[k].as_str().unwrap_or_default().to_string();
                pages.lock().unwrap().push(Page {
                    escalation_id: s("escalationId"),
                    dedup_key: s("dedupKey"),
                    delivery_id: s("deliveryId"),
                    notification: s("notification"),
                    sla_event_id: body["slaEvent"]["slaEventId"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    answered,
                    slowly: m == ANSWER_SLOW,
                });
                axum::http::StatusCode::from_u16(answered).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/page")
}

fn write_config(dir: &Path, brokers: &str, tag: &str, receiver: &str) -> PathBuf {
    // Producers keep Kafka's defaults (idempotent, acks=all): a retried record is written once.
    let path = dir.join("safeclock.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        r#"
[kafka]
brokers = "{brokers}"
topic_prefix = "faults-{tag}."
partitions = {PARTITIONS}
replication_factor = 3
create_topics = true
[kafka.consumer_properties]
"session.timeout.ms" = "10000"
"fetch.wait.max.ms" = "50"
"statistics.interval.ms" = "1000"
# A member killed in the middle of a rebalance holds the group up this long.
"max.poll.interval.ms" = "20000"
[kafka.producer_properties]
"linger.ms" = "5"
[clock]
group_id = "faults-{tag}-clock"
tick_interval_ms = 100
[escalator]
group_id = "faults-{tag}-escalator"
log_receiver = false
tick_interval_ms = 100
[[escalator.receivers]]
name = "duty"
kind = "webhook"
url = "{receiver}"
timeout_ms = 3000
max_attempts = 100000
initial_backoff_ms = 100
max_backoff_ms = 1000
breaker_failures = 0
concurrency = 8
rate_per_sec = 2000
burst = 200
[[escalator.policies]]
name = "default"
levels = [{{ receivers = ["duty"] }}]
[exporter]
group_id = "faults-{tag}-exporter"
[shutdown]
grace_period_secs = 20
"#
    )
    .unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// What the run saw
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    /// SLA event id → (transition, clock), and how many records carried it.
    sla: BTreeMap<String, (SlaTransition, ClockKey)>,
    sla_records: usize,
    /// Dead letters: (original key, reason).
    dead: Vec<(String, String)>,
}

fn collect(consumer: StreamConsumer, seen: Arc<Mutex<Seen>>, dead_letters: bool) {
    tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let m = m.detach();
            let mut s = seen.lock().unwrap();
            if dead_letters {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                let reason = header(&m, dlq_headers::REASON).unwrap_or_default();
                s.dead.push((key, reason));
            } else if let Ok(e) = decode_sla_event(m.payload().unwrap_or_default()) {
                s.sla_records += 1;
                s.sla
                    .insert(e.sla_event_id.clone(), (e.transition(), ClockKey::of(&e)));
            }
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    SigkillClock,
    SigkillEscalator,
    SigkillExporter,
    SigtermClock,
    SigtermEscalator,
    SigtermExporter,
    /// SIGKILL of the broker that leads most partitions of the busy topics, restarted after a
    /// few seconds.
    SigkillLeaderBroker,
    /// SIGTERM (controlled shutdown) of a broker, started again at once.
    BrokerRestart,
    /// The controller SIGKILLed and started again.
    ControllerRestart,
    /// A broker SIGSTOPped past its session timeout with the controller (9 s) and past the
    /// consumers' session timeout (10 s), then resumed.
    BrokerStalled,
    SlowThenFailingReceiver,
}

const FAULTS: [Fault; 11] = [
    Fault::SigkillClock,
    Fault::SigkillEscalator,
    Fault::SigkillExporter,
    Fault::SigtermClock,
    Fault::SigtermEscalator,
    Fault::SigtermExporter,
    Fault::SigkillLeaderBroker,
    Fault::BrokerRestart,
    Fault::ControllerRestart,
    Fault::BrokerStalled,
    Fault::SlowThenFailingReceiver,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_system_keeps_its_invariants_under_injected_faults() {
    let started = Instant::now();
    let seed: u64 = std::env::var("SAFECLOCK_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let rounds: usize = std::env::var("SAFECLOCK_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    println!("fault suite: seed {seed}, {rounds} round(s)");

    let dir = tempfile::Builder::new()
        .prefix("safeclock-faults-")
        .tempdir()
        .unwrap()
        .keep();
    println!("fault suite: logs and broker data in {}", dir.display());
    let cluster =
        tokio::task::block_in_place(|| KafkaCluster::start(&dir, 3, PARTITIONS as u32, &[]));
    let brokers = cluster.bootstrap().to_string();
    let mode = Arc::new(AtomicU8::new(ANSWER_OK));
    let pages: Arc<Mutex<Vec<Page>>> = Arc::default();
    let receiver_url = receiver(mode.clone(), pages.clone()).await;
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let config = write_config(&dir, &brokers, tag, &receiver_url);
    let settings = Settings::load(Some(&config)).unwrap();
    let policy = Policy::load(&settings).unwrap();
    let input = settings.topic(Topic::ReferralEvents);
    // The topics whose partition leaders a broker fault hurts most.
    let busy: Vec<String> = [Topic::ReferralEvents, Topic::SlaEvents, Topic::ClockState]
        .into_iter()
        .map(|t| settings.topic(t))
        .collect();

    // The instances; the first clock creates the topics. The third clock runs only while the
    // burst is consumed.
    let mut instances: Vec<Instance> = [
        (Svc::Clock, 0),
        (Svc::Clock, 1),
        (Svc::Clock, 2),
        (Svc::Escalator, 0),
        (Svc::Escalator, 1),
        (Svc::Exporter, 0),
        (Svc::Exporter, 1),
    ]
    .into_iter()
    .map(|(svc, slot)| Instance {
        svc,
        slot,
        ops: format!("127.0.0.1:{}", free_port()),
        log: dir.join(format!("{}-{slot}.log", svc.name())),
        process: None,
    })
    .collect();
    for i in instances.iter_mut().filter(|i| i.slot < 2) {
        i.start(&config);
        wait_ready(&i.ops, Duration::from_secs(60)).await;
    }

    let seen: Arc<Mutex<Seen>> = Arc::default();
    collect(
        reader(&brokers, &[&settings.topic(Topic::SlaEvents)]),
        seen.clone(),
        false,
    );
    collect(
        reader(&brokers, &[&settings.topic(Topic::DeadLetter)]),
        seen.clone(),
        true,
    );

    // Idempotent, as a source system's producer should be: each record written once, in order.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();

    let t0 = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    // The run lasts some minutes: no clock of the cohort may come due within two hours of t0.
    let age = cohort_age(&policy, t0, SignedDuration::from_hours(2));
    println!(
        "fault suite: now {t0}, the breach cohort received {} h before",
        age.as_hours()
    );
    let mut valid: Vec<ReferralEvent> = Vec::new();
    let invalid = invalid_records(t0);
    let mut invalid_sent = 0usize;
    let mut injected: BTreeMap<String, usize> = BTreeMap::new();
    let mut crashes: Vec<String> = Vec::new();
    let mut next_breach = 0usize;

    let mut schedule: Vec<Fault> = (0..rounds).flat_map(|_| FAULTS).collect();
    // Shuffle within rounds (Fisher-Yates on the seeded generator).
    for i in (1..schedule.len()).rev() {
        let j = rng.random_range(0..=i);
        schedule.swap(i, j);
    }
    let burst_at = rng.random_range(0..schedule.len());

    for (step, fault) in schedule.iter().enumerate() {
        // Input between faults: a slice of the breach cohort and, now and then, a bad record.
        let chunk: Vec<ReferralEvent> = (next_breach..next_breach + BREACHES_PER_STEP)
            .map(|i| breach_cohort(i, t0, age))
            .collect();
        next_breach += BREACHES_PER_STEP;
        let sending = send_all(&producer, &input, chunk.clone());
        if invalid_sent < invalid.len() {
            let (key, payload) = &invalid[invalid_sent];
            send_raw(&producer, &input, key, payload).await;
            invalid_sent += 1;
        }
        valid.extend(chunk);

        // The fault, at a random point while the input is being sent; a receiver fault once
        // this step's pages are on their way, so it meets them.
        if *fault == Fault::SlowThenFailingReceiver {
            let before = pages.lock().unwrap().len();
            let deadline = Instant::now() + Duration::from_secs(20);
            while pages.lock().unwrap().len() == before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        let what = inject(
            *fault,
            &mut rng,
            &mut instances,
            &cluster,
            &busy,
            &mode,
            &config,
        )
        .await;
        println!(
            "fault suite: step {step} at {:.0} s: {what}",
            started.elapsed().as_secs_f64()
        );
        *injected.entry(format!("{fault:?}")).or_default() += 1;
        sending.await.unwrap();

        if step == burst_at {
            // The burst, consumed through rebalances: a third clock joins, one of the first two
            // is killed, comes back, and the third leaves again.
            let events = burst(t0);
            let sent_at = Instant::now();
            let sending = send_all(&producer, &input, events.clone());
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
            instances[2].start(&config);
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
            let victim = rng.random_range(0..2);
            instances[victim].sigkill();
            let down = Duration::from_millis(rng.random_range(500..4000));
            tokio::time::sleep(down).await;
            instances[victim].start(&config);
            tokio::time::sleep(Duration::from_millis(rng.random_range(2000..6000))).await;
            let clean = instances[2].sigterm();
            *injected.entry("RebalancesDuringBurst".into()).or_default() += 1;
            sending.await.unwrap();
            println!(
                "fault suite: burst of {} events sent in {:.1} s (clock-2 joined, clock-{victim} \
                 SIGKILLed for {:.1} s, clock-2 left, clean exit: {clean})",
                events.len(),
                sent_at.elapsed().as_secs_f64(),
                down.as_secs_f64(),
            );
            valid.extend(events);
        }
        for i in &mut instances {
            if let Some(why) = i.exited() {
                println!("fault suite: {why}; restarting it");
                crashes.push(why);
                i.start(&config);
            }
        }
    }
    while invalid_sent < invalid.len() {
        let (key, payload) = &invalid[invalid_sent];
        send_raw(&producer, &input, key, payload).await;
        invalid_sent += 1;
    }
    mode.store(ANSWER_OK, Ordering::SeqCst);

    // What one fault-free engine makes of the same input; the workload must not depend on
    // batching or on when it is processed.
    let end = safeclock_tests::now() + SETTLE + Duration::from_secs(60);
    let expected = oracle(&policy, &valid, end, false);
    assert_deterministic(
        &expected,
        &oracle(&policy, &valid, end, true),
        "on batching",
    );
    assert_deterministic(
        &expected,
        &oracle(&policy, &valid, t0, false),
        "on the wall clock during the run",
    );
    let expected_breaches: BTreeMap<&String, &ClockKey> = expected
        .iter()
        .filter(|(_, (t, _))| *t == SlaTransition::Breached)
        .map(|(id, (_, clock))| (id, clock))
        .collect();

    // Let the system catch up: every expected SLA event published, every breach paged, every
    // bad record dead-lettered (or the deadline passes and the violations say what is missing).
    let settle_started = Instant::now();
    loop {
        for i in &mut instances {
            if let Some(why) = i.exited() {
                println!("fault suite: {why}; restarting it");
                crashes.push(why);
                i.start(&config);
            }
        }
        let done = {
            let s = seen.lock().unwrap();
            let paged: BTreeSet<String> = pages
                .lock()
                .unwrap()
                .iter()
                .filter(|p| p.answered == 200)
                .map(|p| p.sla_event_id.clone())
                .collect();
            expected.keys().all(|id| s.sla.contains_key(id))
                && expected_breaches.keys().all(|id| paged.contains(*id))
                && s.dead.len() >= invalid.len()
        } && exporter_totals(&instances).await.transitions >= expected.len() as f64;
        if done || settle_started.elapsed() > SETTLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Anything extra or repeated would arrive within a few seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settle_secs = settle_started.elapsed().as_secs_f64();

    // The invariants.
    let totals = exporter_totals(&instances).await;
    let s = seen.lock().unwrap();
    let pages = pages.lock().unwrap().clone();
    let mut violations: Vec<String> = Vec::new();
    let missing: Vec<_> = expected
        .keys()
        .filter(|id| !s.sla.contains_key(*id))
        .collect();
    if !missing.is_empty() {
        violations.push(format!(
            "{} SLA events missing (clocks lost), e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    let extra: Vec<_> = s
        .sla
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .collect();
    if !extra.is_empty() {
        violations.push(format!(
            "{} SLA events no fault-free run publishes, e.g. {:?}",
            extra.len(),
            &extra[..extra.len().min(5)]
        ));
    }
    let mut breaches_by_clock: BTreeMap<&ClockKey, BTreeSet<&String>> = BTreeMap::new();
    for (id, (t, clock)) in &s.sla {
        if *t == SlaTransition::Breached {
            breaches_by_clock.entry(clock).or_default().insert(id);
        }
    }
    let twice: Vec<_> = breaches_by_clock
        .iter()
        .filter(|(_, ids)| ids.len() != 1)
        .map(|(c, _)| *c)
        .collect();
    if !twice.is_empty() {
        violations.push(format!(
            "{} clocks with more than one breached record id",
            twice.len()
        ));
    }
    let paged: BTreeSet<&String> = pages
        .iter()
        .filter(|p| p.answered == 200)
        .map(|p| &p.sla_event_id)
        .collect();
    let unpaged: Vec<_> = expected_breaches
        .keys()
        .filter(|id| !paged.contains(**id))
        .collect();
    if !unpaged.is_empty() {
        violations.push(format!(
            "{} breaches never paged, e.g. {:?}",
            unpaged.len(),
            &unpaged[..unpaged.len().min(5)]
        ));
    }
    let mut keys_by_escalation: BTreeMap<&String, BTreeSet<&String>> = BTreeMap::new();
    let mut requests_by_delivery: BTreeMap<&String, usize> = BTreeMap::new();
    for p in &pages {
        keys_by_escalation
            .entry(&p.escalation_id)
            .or_default()
            .insert(&p.dedup_key);
        if p.answered == 200 {
            *requests_by_delivery.entry(&p.delivery_id).or_default() += 1;
        }
    }
    let split: Vec<_> = keys_by_escalation
        .iter()
        .filter(|(_, k)| k.len() != 1)
        .map(|(e, _)| *e)
        .collect();
    if !split.is_empty() {
        violations.push(format!(
            "{} escalations paged under more than one dedupKey",
            split.len()
        ));
    }
    let sent_keys: BTreeSet<&str> = invalid.iter().map(|(k, _)| k.as_str()).collect();
    let dead_keys: BTreeSet<&str> = s.dead.iter().map(|(k, _)| k.as_str()).collect();
    if sent_keys != dead_keys {
        violations.push(format!(
            "dead letters {dead_keys:?} are not the invalid records sent {sent_keys:?}"
        ));
    }
    let referrals: BTreeSet<&str> = valid.iter().map(|e| e.referral_id.as_str()).collect();
    // The exporters together must count everything. They may count a transition twice only
    // when a clock published it again (after a crash) beyond the de-duplication window of its
    // partition (the ids last counted from it, kept in the partition's snapshot); that
    // over-count is reported, and bounded by the records published again.
    let republished = (s.sla_records - s.sla.len()) as f64;
    let counted = [
        ("referrals received", totals.referrals, referrals.len(), 0.0),
        (
            "SLA transitions",
            totals.transitions,
            expected.len(),
            republished,
        ),
        (
            "breaches",
            totals.breaches,
            expected_breaches.len(),
            republished,
        ),
    ];
    let mut over_counted = 0.0;
    for (what, got, want, tolerated) in counted {
        let want = want as f64;
        if got < want || got > want + tolerated {
            violations.push(format!("the exporters count {got} {what}, not {want}"));
        } else if what == "SLA transitions" {
            over_counted = got - want;
        }
    }
    // Faults of the broker or of another instance are never a reason for a service to stop.
    for why in &crashes {
        violations.push(why.clone());
    }
    let repeated_pages: usize = requests_by_delivery.values().map(|n| n - 1).sum();
    let triggers = pages
        .iter()
        .filter(|p| p.notification == "trigger" && p.answered == 200)
        .count();

    let report = format!(
        "# Fault suite: last run\n\n\
         - seed {seed}, {rounds} round(s), {total:.0} s in all ({settle_secs:.0} s to settle after the last fault)\n\
         - faults injected: {faults} ({kinds})\n\
         - services exiting by themselves: {crashed}\n\
         - events sent: {valid} valid, {invalid} invalid\n\
         - SLA events expected {exp}, published {got} distinct in {records} records\n\
         - breaches expected {breaches}; pages answered 200: {ok} ({triggers} triggers, {slow} of them slowly), \
         repeated deliveries {repeated_pages}, requests answered 500: {failed}\n\
         - exporter totals: {ref_total} referrals received, {tr_total} transitions, {br_total} breaches ({over_counted} transitions counted twice, of {republished} published again)\n\
         - dead letters: {dead} ({reasons})\n\
         - invariant violations: {nviol}{viol}\n",
        total = started.elapsed().as_secs_f64(),
        faults = injected.values().sum::<usize>(),
        kinds = injected
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        crashed = if crashes.is_empty() {
            "none".to_string()
        } else {
            crashes.join("; ")
        },
        valid = valid.len(),
        invalid = invalid.len(),
        exp = expected.len(),
        got = s.sla.len(),
        records = s.sla_records,
        breaches = expected_breaches.len(),
        ok = pages.iter().filter(|p| p.answered == 200).count(),
        failed = pages.iter().filter(|p| p.answered == 500).count(),
        slow = pages.iter().filter(|p| p.answered == 200 && p.slowly).count(),
        ref_total = totals.referrals,
        tr_total = totals.transitions,
        br_total = totals.breaches,
        dead = s.dead.len(),
        reasons = s
            .dead
            .iter()
            .map(|(_, r)| r.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        nviol = violations.len(),
        viol = violations
            .iter()
            .map(|v| format!("\n  - {v}"))
            .collect::<String>(),
    );
    println!("{report}");
    let report_path = std::env::var("SAFECLOCK_FAULT_REPORT").map_or_else(
        |_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-suite-report.md"),
        PathBuf::from,
    );
    std::fs::write(&report_path, &report).unwrap();
    println!("fault suite: report written to {}", report_path.display());

    drop(s);
    for i in &mut instances {
        i.sigterm();
    }
    drop(cluster);
    assert!(violations.is_empty(), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Panics, with a few of the differences, if two oracle runs disagree: the workload's SLA
/// events would then depend on something (`what`) other than the input and could not be checked
/// by id.
fn assert_deterministic(
    a: &BTreeMap<String, (SlaTransition, ClockKey)>,
    b: &BTreeMap<String, (SlaTransition, ClockKey)>,
    what: &str,
) {
    let diff: Vec<_> = a
        .iter()
        .filter(|(k, _)| !b.contains_key(*k))
        .chain(b.iter().filter(|(k, _)| !a.contains_key(*k)))
        .map(|(_, v)| v)
        .collect();
    assert!(
        diff.is_empty(),
        "the workload's SLA events depend {what}, so they cannot be checked by id: {} differ, e.g. {:?}",
        diff.len(),
        &diff[..diff.len().min(8)]
    );
}

/// Injects `fault`; returns what was done.
async fn inject(
    fault: Fault,
    rng: &mut StdRng,
    instances: &mut [Instance],
    cluster: &KafkaCluster,
    busy: &[String],
    mode: &AtomicU8,
    config: &Path,
) -> String {
    // One of the two long-running instances of `svc`.
    let pick = |rng: &mut StdRng, svc: Svc, instances: &[Instance]| {
        let slots: Vec<usize> = (0..instances.len())
            .filter(|i| instances[*i].svc == svc && instances[*i].slot < 2)
            .collect();
        slots[rng.random_range(0..slots.len())]
    };
    let svc_of = |fault: Fault| match fault {
        Fault::SigkillClock | Fault::SigtermClock => Svc::Clock,
        Fault::SigkillEscalator | Fault::SigtermEscalator => Svc::Escalator,
        _ => Svc::Exporter,
    };
    match fault {
        Fault::SigkillClock | Fault::SigkillEscalator | Fault::SigkillExporter => {
            let i = pick(rng, svc_of(fault), instances);
            instances[i].sigkill();
            // Back before or after the group notices (session.timeout.ms = 10 s).
            let down = Duration::from_millis(rng.random_range(500..12_000));
            tokio::time::sleep(down).await;
            instances[i].start(config);
            format!(
                "SIGKILL {} (down {:.1} s)",
                instances[i].label(),
                down.as_secs_f64()
            )
        }
        Fault::SigtermClock | Fault::SigtermEscalator | Fault::SigtermExporter => {
            let i = pick(rng, svc_of(fault), instances);
            let clean = instances[i].sigterm();
            instances[i].start(config);
            format!("SIGTERM {} (clean exit: {clean})", instances[i].label())
        }
        Fault::SigkillLeaderBroker => {
            let refs: Vec<&str> = busy.iter().map(String::as_str).collect();
            let id = tokio::task::block_in_place(|| cluster.busiest_leader(&refs))
                .unwrap_or(cluster.brokers()[0]);
            tokio::task::block_in_place(|| cluster.kill(id));
            let down = Duration::from_millis(rng.random_range(1000..5000));
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| cluster.start_node(id));
            format!(
                "SIGKILL of broker {id}, the leader of most busy partitions (down {:.1} s)",
                down.as_secs_f64()
            )
        }
        Fault::BrokerRestart => {
            let brokers = cluster.brokers();
            let id = brokers[rng.random_range(0..brokers.len())];
            let stopping = Instant::now();
            tokio::task::block_in_place(|| cluster.terminate(id));
            let stopped = stopping.elapsed();
            tokio::task::block_in_place(|| cluster.start_node(id));
            format!(
                "broker {id} restarted (controlled shutdown took {:.1} s)",
                stopped.as_secs_f64()
            )
        }
        Fault::ControllerRestart => {
            tokio::task::block_in_place(|| cluster.kill(CONTROLLER));
            let down = Duration::from_millis(rng.random_range(1000..4000));
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| cluster.start_node(CONTROLLER));
            format!(
                "controller SIGKILLed and restarted (down {:.1} s)",
                down.as_secs_f64()
            )
        }
        Fault::BrokerStalled => {
            let brokers = cluster.brokers();
            let id = brokers[rng.random_range(0..brokers.len())];
            cluster.pause(id);
            let down = Duration::from_millis(rng.random_range(12_000..16_000));
            tokio::time::sleep(down).await;
            cluster.resume(id);
            format!(
                "broker {id} stalled (SIGSTOP) for {:.1} s",
                down.as_secs_f64()
            )
        }
        Fault::SlowThenFailingReceiver => {
            mode.store(ANSWER_SLOW, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(5)).await;
            mode.store(ANSWER_FAIL, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(5)).await;
            mode.store(ANSWER_OK, Ordering::SeqCst);
            "receiver slow (1.5 s per page) for 5 s, then failing (500) for 5 s".into()
        }
    }
}

/// The exporters' counters, summed over their labels (partition among them) and over the
/// instances (one that cannot be scraped counts 0).
#[derive(Debug, Default)]
struct Totals {
    referrals: f64,
    transitions: f64,
    breaches: f64,
}

async fn exporter_totals(instances: &[Instance]) -> Totals {
    let mut all = Totals::default();
    for i in instances.iter().filter(|i| i.svc == Svc::Exporter) {
        let one = instance_totals(&i.ops).await;
        all.referrals += one.referrals;
        all.transitions += one.transitions;
        all.breaches += one.breaches;
    }
    all
}

async fn instance_totals(ops: &str) -> Totals {
    let Ok(r) = reqwest::get(format!("http://{ops}/metrics")).await else {
        return Totals::default();
    };
    let text = r.text().await.unwrap_or_default();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Totals {
        referrals: sum("safeclock_referrals_received_total"),
        transitions: sum("safeclock_sla_transitions_total"),
        breaches: sum("safeclock_sla_breaches_total"),
    }
}

async fn send_raw(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(120),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Sends `events` (keyed by referral, so each referral's order is kept) and returns a future
/// that completes when the broker acknowledged them all.
fn send_all(
    producer: &FutureProducer,
    topic: &str,
    events: Vec<ReferralEvent>,
) -> tokio::task::JoinHandle<()> {
    let producer = producer.clone();
    let topic = topic.to_string();
    tokio::spawn(async move {
        // In order: librdkafka keeps the order of records to one partition.
        let futures: Vec<_> = events
            .iter()
            .map(|e| {
                let payload = serde_json::to_vec(e).unwrap();
                producer
                    .send_result(
                        FutureRecord::to(&topic)
                            .key(&e.referral_id)
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        futures::stream::iter(futures)
            .for_each(|f| async move {
                f.await.unwrap().map_err(|(e, _)| e).unwrap();
            })
            .await;
    })
}
