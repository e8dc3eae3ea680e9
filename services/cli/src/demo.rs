//! `safeclock demo`: the whole system in one process, no broker to install.
//!
//! Runs the clock, escalator and exporter against librdkafka's in-process mock cluster, feeds it a
//! generated stream of referrals from several forces on accelerated time (four simulated hours per
//! real second by default), and prints every warning, breach, late stop, correction, escalation
//! and dead letter as one line as it happens. A local webhook stands in for the duty inspector's
//! on-call tool, so escalations travel over real HTTP. The first referral is the origin case: a
//! report that a 13-year-old was being groomed, left without contact for five days.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use jiff::{SignedDuration, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::config::{
    LevelSettings, LogFormat, PolicySettings, ReceiverKind, ReceiverSettings, Settings,
    WebhookSettings,
};
use safeclock_common::event::{decode_sla_event, transition_label};
use safeclock_common::kafka::{dlq_headers, Topic};
use safeclock_common::schema::v1::{
    referral_event::Kind, AgeBand, Category, EscalationAction, EscalationRecord, ReferralClosed,
    ReferralDecisionMade, ReferralEvent, ReferralReceived, RiskGrade, SlaTransition,
    VictimContacted,
};
use safeclock_common::schema::{from_jiff, to_jiff};
use safeclock_common::shutdown::{cancel_on_signal, CancellationToken};
use safeclock_common::telemetry;
use safeclock_common::time::{AcceleratedTime, SharedTime};

use crate::app::{self, Service};

/// What `safeclock demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    pub speed: f64,
    pub http: SocketAddr,
    pub seed: u64,
    pub log_json: bool,
}

const FORCES: [(&str, &str); 6] = [
    ("nottinghamshire", "NOTT"),
    ("derbyshire", "DERB"),
    ("leicestershire", "LEIC"),
    ("lincolnshire", "LINC"),
    ("south-yorkshire", "SYOR"),
    ("west-midlands", "WMID"),
];

const CATEGORIES: [Category; 8] = [
    Category::Grooming,
    Category::ChildSexualAbuse,
    Category::OnlineAbuse,
    Category::PhysicalAbuse,
    Category::Neglect,
    Category::DomesticAbuse,
    Category::Missing,
    Category::ChildSexualExploitation,
];

/// Counts for the closing summary.
#[derive(Debug, Default)]
struct Tally {
    transitions: HashMap<&'static str, u64>,
    escalations_delivered: u64,
    escalations_failed: u64,
    dead_letters: u64,
}

/// Runs the demo until `options.duration` passes or Ctrl-C.
///
/// # Errors
/// When the mock cluster, the ops endpoint or a service cannot start.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let format = if options.log_json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    // Service logs stay quiet (warnings and errors on stderr); the story is printed on stdout.
    telemetry::init(format, "warn,safeclock::escalation=off,rdkafka=off");

    let mock = MockCluster::new(1).context("cannot start the in-process Kafka mock cluster")?;
    let mut settings = Settings::defaults()?;
    settings.kafka.brokers = mock.bootstrap_servers();
    settings.kafka.create_topics = false;
    settings.kafka.partitions = 3;
    settings
        .kafka
        .consumer_properties
        .insert("fetch.wait.max.ms".into(), "10".into());
    settings
        .kafka
        .producer_properties
        .insert("linger.ms".into(), "1".into());
    settings.clock.tick_interval_ms = 100;
    settings.escalator.tick_interval_ms = 100;
    // The demo shows every notification as a log line (off by default elsewhere).
    settings.escalator.log_receiver = true;
    settings.shutdown.grace_period_secs = 3;
    for topic in Topic::ALL {
        mock.create_topic(&settings.topic(topic), settings.kafka.partitions, 1)
            .with_context(|| format!("cannot create topic {}", settings.topic(topic)))?;
    }

    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());

    // The duty inspector's on-call tool: a real HTTP webhook on loopback.
    let pages = Arc::new(AtomicU64::new(0));
    let webhook_addr = start_webhook(pages.clone(), shutdown.clone()).await?;
    settings.escalator.webhooks.push(WebhookSettings {
        name: "duty-inspector".into(),
        url: format!("http://{webhook_addr}/page"),
        timeout_ms: 2_000,
        max_attempts: 3,
        initial_backoff_ms: 50,
    });
    // An escalation chain: the duty inspector (and the log) at once; if nobody has
    // acknowledged within 4 simulated hours, the superintendent (a log receiver here); then a
    // reminder to the superintendent every 8 hours, twice.
    settings
        .escalator
        .receivers
        .push(ReceiverSettings::new("superintendent", ReceiverKind::Log));
    settings.escalator.policies.push(PolicySettings {
        name: "default".into(),
        levels: vec![
            LevelSettings {
                delay_secs: 0,
                receivers: vec!["log".into(), "duty-inspector".into()],
            },
            LevelSettings {
                delay_secs: 4 * 3600,
                receivers: vec!["superintendent".into()],
            },
        ],
        repeat_interval_secs: 8 * 3600,
        repeat_limit: 2,
        ack_expiry_secs: 0,
    });
    settings.validate()?;
    let settings = Arc::new(settings);

    let origin = Timestamp::now()
        .round(jiff::TimestampRound::new().smallest(jiff::Unit::Minute))
        .unwrap_or_else(|_| Timestamp::now());
    let time: SharedTime = Arc::new(AcceleratedTime::new(origin, options.speed));
    let running = app::start(
        settings.clone(),
        Service::All,
        time.clone(),
        options.http,
        shutdown.clone(),
    )
    .await?;

    println!("safeclock demo: every service on an in-process Kafka cluster; simulated time runs {}x faster (1 s = {}).",
        options.speed, human(SignedDuration::from_secs_f64(options.speed)));
    println!("  metrics:  curl http://{}/metrics", running.ops_addr);
    let policy = safeclock_common::policy::Policy::load(&settings)?;
    println!(
        "  rules:    {} timescales from the default pack; this stream exercises victim-contact (24 h) and referral-decision (1 working day)",
        policy.rules.rules.len()
    );
    println!("  forces:   {}", FORCES.map(|f| f.0).join(", "));
    println!(
        "  duration: {:.0} s real, about {} simulated; Ctrl-C stops early",
        options.duration.as_secs_f64(),
        human(SignedDuration::from_secs_f64(
            options.duration.as_secs_f64() * options.speed
        ))
    );
    println!();

    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let printer = tokio::spawn(print_story(
        settings.clone(),
        time.clone(),
        started,
        tally.clone(),
        shutdown.clone(),
    ));
    let generated = Arc::new(AtomicU64::new(0));
    let generator = tokio::spawn(generate(
        settings.clone(),
        time.clone(),
        options.seed,
        generated.clone(),
        shutdown.clone(),
    ));

    tokio::select! {
        _ = tokio::time::sleep(options.duration) => {},
        _ = shutdown.cancelled() => {},
    }
    // Let in-flight records reach the printer before stopping it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    let service_result = running.wait().await;
    let _ = generator.await;
    let _ = printer.await;

    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let n = |k: &str| t.transitions.get(k).copied().unwrap_or(0);
    println!();
    println!(
        "summary after {:.1} s real ({} simulated):",
        started.elapsed().as_secs_f64(),
        human(time.now().duration_since(origin))
    );
    println!(
        "  referral events sent  {}",
        generated.load(Ordering::Relaxed)
    );
    println!(
        "  clocks started {}, warnings {}, breaches {}, met {}, met late {}, cancelled {}, corrected {}",
        n("started"), n("warning"), n("breached"), n("met"), n("met_late"), n("cancelled"), n("corrected")
    );
    println!(
        "  escalations delivered {}, failed {}; pages received by the duty-inspector webhook {}",
        t.escalations_delivered,
        t.escalations_failed,
        pages.load(Ordering::Relaxed)
    );
    println!("  dead letters {}", t.dead_letters);
    drop(t);
    drop(mock);
    service_result
}

async fn start_webhook(
    pages: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new().route(
        "/page",
        axum::routing::post(move || {
            let pages = pages.clone();
            async move {
                pages.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok(addr)
}

fn human(d: SignedDuration) -> String {
    let secs = d.as_secs();
    if secs >= 86_400 && secs % 86_400 == 0 {
        format!("{} d", secs / 86_400)
    } else if secs >= 86_400 {
        format!("{:.1} d", secs as f64 / 86_400.0)
    } else if secs >= 3600 {
        format!("{:.1} h", secs as f64 / 3600.0)
    } else {
        format!("{} min", secs / 60)
    }
}

fn london(ts: Timestamp) -> String {
    match jiff::tz::TimeZone::get("Europe/London") {
        Ok(tz) => ts.to_zoned(tz).strftime("%a %d %b %H:%M").to_string(),
        Err(_) => ts.to_string(),
    }
}

fn event(
    referral_id: &str,
    n: u32,
    force: &str,
    at: Timestamp,
    system: &str,
    kind: Kind,
) -> ReferralEvent {
    ReferralEvent {
        event_id: format!("{referral_id}-e{n}"),
        referral_id: referral_id.to_string(),
        force_id: force.to_string(),
        occurred_at: Some(from_jiff(at)),
        recorded_at: Some(from_jiff(at)),
        source_system: system.to_string(),
        kind: Some(kind),
    }
}

/// What the generator will send, ordered by simulated time.
type Schedule = BinaryHeap<Reverse<(Timestamp, u64, ScheduledRecord)>>;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ScheduledRecord {
    Event(String),
    /// Raw bytes that are not a valid event, to show the dead-letter path.
    Garbage(String, Vec<u8>),
}

fn schedule(
    plan: &mut Schedule,
    seq: &mut u64,
    at: Timestamp,
    e: &ReferralEvent,
) -> anyhow::Result<()> {
    *seq += 1;
    plan.push(Reverse((
        at,
        *seq,
        ScheduledRecord::Event(serde_json::to_string(e)?),
    )));
    Ok(())
}

/// Plans one generated referral and its follow-up events.
fn plan_referral(
    rng: &mut StdRng,
    n: u64,
    at: Timestamp,
    plan: &mut Schedule,
    seq: &mut u64,
) -> anyhow::Result<()> {
    let (force, code) = FORCES[rng.random_range(0..FORCES.len())];
    let referral_id = format!("R-{code}-{n:05}");
    let category = CATEGORIES[rng.random_range(0..CATEGORIES.len())];
    let risk = match rng.random_range(0..10) {
        0..=2 => RiskGrade::Low,
        3..=6 => RiskGrade::Medium,
        7..=8 => RiskGrade::High,
        _ => RiskGrade::VeryHigh,
    };
    let age = [
        AgeBand::Under5,
        AgeBand::Aged5To9,
        AgeBand::Aged10To12,
        AgeBand::Aged13To15,
        AgeBand::Aged16To17,
    ][rng.random_range(0..5)];
    let received = event(
        &referral_id,
        1,
        force,
        at,
        "mash-portal",
        Kind::ReferralReceived(ReferralReceived {
            category: category as i32,
            risk: risk as i32,
            child_age_band: age as i32,
            area: ["city", "county-north", "county-south"][rng.random_range(0..3)].into(),
            team: ["mash", "pvp-north", "pvp-south"][rng.random_range(0..3)].into(),
            referrer: ["school", "health", "public", "social-care"][rng.random_range(0..4)].into(),
        }),
    );
    schedule(plan, seq, at, &received)?;
    // Children's social care decides the type of response, usually the same day.
    let decided_at = at + SignedDuration::from_secs_f64(rng.random_range(1.0..30.0) * 3600.0);
    let decided = event(
        &referral_id,
        3,
        force,
        decided_at,
        "lcs",
        Kind::ReferralDecisionMade(ReferralDecisionMade {
            decision: "section-47".into(),
            referrer_acknowledged: true,
        }),
    );
    schedule(plan, seq, decided_at, &decided)?;
    // Most children are contacted well within the day; some near the deadline; some late; a few
    // referrals are closed with no further action first.
    let roll = rng.random_range(0..100);
    let hours = match roll {
        0..=64 => rng.random_range(1.0..17.0),
        65..=84 => rng.random_range(18.5..23.9),
        85..=95 => rng.random_range(25.0..60.0),
        _ => -1.0,
    };
    if hours > 0.0 {
        let contact_at = at + SignedDuration::from_secs_f64(hours * 3600.0);
        let contacted = event(
            &referral_id,
            2,
            force,
            contact_at,
            "niche-rms",
            Kind::VictimContacted(VictimContacted {}),
        );
        schedule(plan, seq, contact_at, &contacted)?;
        if rng.random_range(0..20) == 0 {
            // A source system that sends the same event twice: de-duplicated by event id.
            schedule(
                plan,
                seq,
                contact_at + SignedDuration::from_mins(5),
                &contacted,
            )?;
        }
    } else {
        let closed_at = at + SignedDuration::from_hours(3);
        let closed = event(
            &referral_id,
            2,
            force,
            closed_at,
            "mash-portal",
            Kind::ReferralClosed(ReferralClosed {
                outcome: "no-further-action".into(),
            }),
        );
        schedule(plan, seq, closed_at, &closed)?;
    }
    Ok(())
}

/// Sends the origin case, then a referral about every 40 simulated minutes, each event when
/// simulated time reaches it.
async fn generate(
    settings: Arc<Settings>,
    time: SharedTime,
    seed: u64,
    sent: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let producer: FutureProducer = safeclock_common::kafka::producer(&settings)?;
    let topic = settings.topic(Topic::ReferralEvents);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Schedule::new();
    let mut seq = 0u64;
    let start = time.now();

    // The origin case (HMIC, Nottinghamshire 2015): a report that a 13-year-old boy was being
    // groomed; the force responded five days later.
    let origin_id = "R-NOTT-ORIGIN";
    let reported = start - SignedDuration::from_hours(2);
    let received = event(
        origin_id,
        1,
        "nottinghamshire",
        reported,
        "mash-portal",
        Kind::ReferralReceived(ReferralReceived {
            category: Category::Grooming as i32,
            risk: RiskGrade::High as i32,
            child_age_band: AgeBand::Aged13To15 as i32,
            area: "city".into(),
            team: "mash".into(),
            referrer: "school".into(),
        }),
    );
    schedule(&mut plan, &mut seq, start, &received)?;
    let five_days = reported + SignedDuration::from_hours(5 * 24);
    let contacted = event(
        origin_id,
        2,
        "nottinghamshire",
        five_days,
        "niche-rms",
        Kind::VictimContacted(VictimContacted {}),
    );
    schedule(&mut plan, &mut seq, five_days, &contacted)?;
    // A record a broken source system sent: no event kind. It lands in the dead-letter topic.
    seq += 1;
    plan.push(Reverse((
        start + SignedDuration::from_hours(6),
        seq,
        ScheduledRecord::Garbage(
            "R-DERB-BROKEN".into(),
            br#"{"eventId":"broken-1","referralId":"R-DERB-BROKEN","forceId":"derbyshire","occurredAt":"2026-01-01T00:00:00Z"}"#.to_vec(),
        ),
    )));

    let mut next_referral = start + SignedDuration::from_mins(10);
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {},
            _ = shutdown.cancelled() => break,
        }
        let now = time.now();
        while next_referral <= now {
            n += 1;
            plan_referral(&mut rng, n, next_referral, &mut plan, &mut seq)?;
            next_referral += SignedDuration::from_mins(rng.random_range(20..60));
        }
        while plan.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Some(Reverse((_, _, record))) = plan.pop() else {
                break;
            };
            let (key, payload) = match &record {
                ScheduledRecord::Event(json) => {
                    let key = serde_json::from_str::<ReferralEvent>(json)
                        .map(|e| e.referral_id)
                        .unwrap_or_default();
                    (key, json.as_bytes().to_vec())
                }
                ScheduledRecord::Garbage(key, bytes) => (key.clone(), bytes.clone()),
            };
            let rec = FutureRecord::<str, [u8]>::to(&topic)
                .key(&key)
                .payload(&payload);
            safeclock_common::kafka::enqueue(&producer, rec).await?;
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Prints one line per warning, breach, late stop, correction, escalation and dead letter.
async fn print_story(
    settings: Arc<Settings>,
    time: SharedTime,
    started: Instant,
    tally: Arc<Mutex<Tally>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sla_topic = settings.topic(Topic::SlaEvents);
    let log_topic = settings.topic(Topic::EscalationLog);
    let dlq_topic = settings.topic(Topic::DeadLetter);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .set("group.id", "safeclock-demo-printer")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Error)
        .create()?;
    consumer.subscribe(&[&sla_topic, &log_topic, &dlq_topic])?;
    let mut seen = HashSet::new();
    loop {
        let message = tokio::select! {
            m = consumer.recv() => m,
            _ = shutdown.cancelled() => break,
        };
        let Ok(message) = message else { continue };
        let payload = message.payload().unwrap_or_default();
        let prefix = format!(
            "+{:>5.1}s  {}",
            started.elapsed().as_secs_f64(),
            london(time.now())
        );
        if message.topic() == sla_topic {
            let Ok(e) = decode_sla_event(payload) else {
                continue;
            };
            if !seen.insert(e.sla_event_id.clone()) {
                continue;
            }
            let what = transition_label(e.transition());
            *tally
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .transitions
                .entry(what)
                .or_default() += 1;
            let labels = e.labels.clone().unwrap_or_default();
            let deadline = e
                .deadline
                .as_ref()
                .and_then(to_jiff)
                .map(london)
                .unwrap_or_default();
            let elapsed = e
                .elapsed
                .as_ref()
                .map(|d| human(safeclock_common::schema::duration_to_jiff(d)))
                .unwrap_or_default();
            let detail = match e.transition() {
                SlaTransition::Warning => {
                    format!("{}% of target used, deadline {deadline}", e.warning_percent)
                }
                SlaTransition::Breached => format!("deadline {deadline} passed"),
                SlaTransition::MetLate => {
                    let target = e
                        .target
                        .as_ref()
                        .map(|d| human(safeclock_common::schema::duration_to_jiff(d)))
                        .unwrap_or_default();
                    format!("stopped after {elapsed} (allowed {target})")
                }
                SlaTransition::Corrected => "late event: breach corrected to met".to_string(),
                _ => continue,
            };
            println!(
                "{prefix}  {:<9} {:<16} {:<17} {:<14} {}/{}/{}  {detail}",
                what.to_uppercase(),
                labels.force_id,
                e.rule_id,
                e.referral_id,
                labels.category,
                labels.risk,
                labels.child_age_band,
            );
        } else if message.topic() == log_topic {
            let Ok(r) = serde_json::from_slice::<EscalationRecord>(payload) else {
                continue;
            };
            if !seen.insert(format!(
                "{}/{}/{}/{}",
                r.delivery_id, r.escalation_id, r.action, r.attempt
            )) {
                continue;
            }
            let labels = r.labels.clone().unwrap_or_default();
            let repeat = if r.repeat > 0 {
                format!(" repeat {}", r.repeat)
            } else {
                String::new()
            };
            let (what, detail) = match r.action() {
                EscalationAction::Notified if r.notification == "resolve" => (
                    "ESCALATE",
                    format!("-> {} level {}: told it is resolved", r.receiver, r.level),
                ),
                EscalationAction::Notified => {
                    tally
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .escalations_delivered += 1;
                    (
                        "ESCALATE",
                        format!(
                            "-> {} level {}{repeat}: delivered (attempt {})",
                            r.receiver, r.level, r.attempt
                        ),
                    )
                }
                EscalationAction::DeliveryFailed => {
                    tally
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .escalations_failed += 1;
                    (
                        "ESCALATE",
                        format!(
                            "-> {} level {}: FAILED after {} attempts: {}",
                            r.receiver, r.level, r.attempt, r.error
                        ),
                    )
                }
                EscalationAction::Resolved => (
                    "RESOLVED",
                    format!("escalation closed ({}) by {}", r.resolution, r.actor),
                ),
                _ => continue,
            };
            println!(
                "{prefix}  {:<9} {:<16} {:<17} {:<14} {detail}",
                what, labels.force_id, r.rule_id, r.referral_id
            );
        } else {
            tally.lock().unwrap_or_else(|p| p.into_inner()).dead_letters += 1;
            let header = |name: &str| {
                message
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                    .map(|v| String::from_utf8_lossy(v).to_string())
                    .unwrap_or_default()
            };
            println!(
                "{prefix}  {:<9} {:<16} record {}[{}]@{} refused by {}: {}",
                "DEADLTR",
                "",
                header(dlq_headers::SOURCE_TOPIC),
                header(dlq_headers::SOURCE_PARTITION),
                header(dlq_headers::SOURCE_OFFSET),
                header(dlq_headers::SERVICE),
                header(dlq_headers::ERROR)
            );
        }
    }
    Ok(())
}
