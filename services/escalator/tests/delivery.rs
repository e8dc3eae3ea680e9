//! Component tests of the delivery layer against local receivers that fail in every way a real
//! one does: HTTP 500, timeouts, slow answers, connection refused. They show retries with
//! backoff, the circuit breaker, the rate limit, the fallback receiver and the dead letter, and
//! check the wire format of each receiver kind (signed webhook, template, PagerDuty Events v2,
//! email over SMTP). No Kafka is involved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use prometheus::Registry;
use safeclock_common::config::{Payload, ReceiverKind, ReceiverSettings, SmtpTls};
use safeclock_common::schema::v1::{
    NotificationKind, PendingNotification, Severity, SlaEvent, SlaLabels, SlaTransition,
};
use safeclock_common::time::{OffsetTime, TimeSource};
use safeclock_escalator::delivery::{Dispatcher, Report};
use safeclock_escalator::engine::{Job, Outcome};
use safeclock_escalator::metrics::EscalatorMetrics;
use safeclock_escalator::receivers::{signature, Receiver, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One request as the local receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// How the local receiver answers request n (0-based).
type Behaviour = Arc<dyn Fn(usize) -> (u16, Duration) + Send + Sync>;

/// A local HTTP receiver; returns its URL and what it saw.
async fn receiver(behaviour: Behaviour) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let s = s.clone();
            let behaviour = behaviour.clone();
            async move {
                let n = {
                    let mut v = s.lock().unwrap();
                    v.push(Seen {
                        at: Instant::now(),
                        headers,
                        body: body.to_vec(),
                    });
                    v.len() - 1
                };
                let (status, delay) = behaviour(n);
                tokio::time::sleep(delay).await;
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

fn answers(statuses: &'static [u16]) -> Behaviour {
    Arc::new(move |n| (statuses.get(n).copied().unwrap_or(200), Duration::ZERO))
}

fn webhook(name: &str, url: &str) -> ReceiverSettings {
    ReceiverSettings {
        url: Some(url.to_string()),
        timeout_ms: 500,
        max_attempts: 4,
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        breaker_failures: 0,
        ..ReceiverSettings::new(name, ReceiverKind::Webhook)
    }
}

fn job(receiver: &str, n: usize, kind: NotificationKind) -> Job {
    let mut pending = PendingNotification {
        delivery_id: format!("d-{n}"),
        dedup_key: format!("k-{n}"),
        receiver: receiver.to_string(),
        level: 1,
        policy: "default".into(),
        ..PendingNotification::default()
    };
    pending.set_kind(kind);
    Job {
        escalation_id: format!("e-{n}"),
        partition: 0,
        pending,
        event: SlaEvent {
            sla_event_id: format!("s-{n}"),
            referral_id: format!("R-{n}"),
            rule_id: "victim-contact".into(),
            rule_title: "Victim contacted".into(),
            clock_id: "c-1".into(),
            transition: SlaTransition::Breached as i32,
            severity: Severity::Critical as i32,
            labels: Some(SlaLabels {
                force_id: "nottinghamshire".into(),
                category: "grooming".into(),
                risk: "high".into(),
                ..SlaLabels::default()
            }),
            ..SlaEvent::default()
        },
        actor: String::new(),
        resolution: String::new(),
        opened_at_ms: 0,
    }
}

struct Harness {
    dispatcher: Dispatcher,
    reports: mpsc::UnboundedReceiver<Report>,
    registry: Registry,
    _stop: tokio_util::sync::DropGuard,
}

fn start(receivers: Vec<ReceiverSettings>) -> Harness {
    let registry = Registry::new();
    let metrics = EscalatorMetrics::register(&registry).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let dispatcher = Dispatcher::start(
        receivers
            .into_iter()
            .map(|r| Receiver::new(r).unwrap())
            .collect(),
        metrics,
        Arc::new(OffsetTime::for_tests()),
        tx,
        stop.clone(),
    );
    Harness {
        dispatcher,
        reports: rx,
        registry,
        _stop: stop.drop_guard(),
    }
}

impl Harness {
    /// Waits for the final outcome of `n` jobs; returns (job, outcome) plus the failed attempts
    /// reported on the way.
    async fn outcomes(&mut self, n: usize) -> (Vec<(Job, Outcome)>, Vec<(u32, String, Duration)>) {
        let mut done = Vec::new();
        let mut attempts = Vec::new();
        while done.len() < n {
            let r = tokio::time::timeout(Duration::from_secs(20), self.reports.recv())
                .await
                .expect("no outcome within 20 s")
                .unwrap();
            match r {
                Report::Done { job, outcome, .. } => done.push((*job, outcome)),
                Report::AttemptFailed {
                    attempt,
                    error,
                    retry_in,
                    ..
                } => attempts.push((attempt, error, retry_in)),
            }
        }
        (done, attempts)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let ok = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                });
                if ok {
                    return m.get_counter().get_value() + m.get_gauge().get_value();
                }
            }
        }
        0.0
    }
}

#[tokio::test]
async fn http_500_is_retried_with_full_jitter_backoff_until_delivered() {
    let (url, seen) = receiver(answers(&[500, 500, 503])).await;
    let mut h = start(vec![webhook("duty", &url)]);
    h.dispatcher
        .submit(job("duty", 1, NotificationKind::Trigger));
    let (done, attempts) = h.outcomes(1).await;
    assert_eq!(done[0].1, Outcome::Delivered { attempts: 4 });
    assert_eq!(seen.lock().unwrap().len(), 4);
    // Each failed attempt was reported, with a wait inside the capped exponential (full jitter).
    assert_eq!(attempts.len(), 3);
    for (i, (attempt, error, wait)) in attempts.iter().enumerate() {
        assert_eq!(*attempt, i as u32 + 1);
        assert!(error.starts_with("HTTP 50"), "{error}");
        let cap = Duration::from_millis((50u64 << i).min(400));
        assert!(*wait <= cap, "retry {attempt} waited {wait:?} > {cap:?}");
    }
    // The gaps between requests are the reported waits (plus scheduling), never shorter.
    let s = seen.lock().unwrap();
    for (i, (_, _, wait)) in attempts.iter().enumerate() {
        let gap = s[i + 1].at - s[i].at;
        assert!(
            gap + Duration::from_millis(5) >= *wait,
            "gap {gap:?} < wait {wait:?}"
        );
    }
    assert_eq!(
        h.metric(
            "safeclock_escalation_attempts_total",
            &[("receiver", "duty"), ("result", "retryable")]
        ),
        3.0
    );
    assert_eq!(
        h.metric(
            "safeclock_escalations_total",
            &[("receiver", "duty"), ("outcome", "delivered")]
        ),
        1.0
    );
}

#[tokio::test]
async fn timeouts_are_retried_and_slow_answers_within_the_timeout_are_fine() {
    // First answer takes 2 s against a 500 ms timeout; the second is slow but in time.
    let (url, seen) = receiver(Arc::new(|n| {
        let delay = if n == 0 { 2000 } else { 300 };
        (200, Duration::from_millis(delay))
    }))
    .await;
    let mut h = start(vec![webhook("slow", &url)]);
    let started = Instant::now();
    h.dispatcher
        .submit(job("slow", 1, NotificationKind::Trigger));
    let (done, attempts) = h.outcomes(1).await;
    assert_eq!(done[0].1, Outcome::Delivered { attempts: 2 });
    assert!(
        attempts[0].1.contains("no answer within 500 ms"),
        "{:?}",
        attempts[0]
    );
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "the timeout cut the first attempt short"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn connection_refused_spends_the_budget_and_the_error_never_shows_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook?token=s3cret");
    let mut h = start(vec![webhook("gone", &url)]);
    h.dispatcher
        .submit(job("gone", 1, NotificationKind::Trigger));
    let (done, attempts) = h.outcomes(1).await;
    match &done[0].1 {
        Outcome::Failed { attempts, error } => {
            assert_eq!(*attempts, 4);
            assert!(!error.contains("s3cret"), "{error}");
            assert!(error.contains("connect"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(attempts.len(), 3);
}

#[tokio::test]
async fn client_errors_are_permanent() {
    let (url, seen) = receiver(answers(&[400])).await;
    let mut h = start(vec![webhook("strict", &url)]);
    h.dispatcher
        .submit(job("strict", 1, NotificationKind::Trigger));
    let (done, _) = h.outcomes(1).await;
    assert!(matches!(&done[0].1, Outcome::Failed { attempts: 1, error } if error.contains("400")));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A local server that answers every POST with `status` and `Location: {location}`.
async fn redirector(status: u16, location: String) -> (String, Arc<Mutex<usize>>) {
    let hits = Arc::new(Mutex::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        post(move || {
            let h = h.clone();
            let location = location.clone();
            async move {
                *h.lock().unwrap() += 1;
                (
                    StatusCode::from_u16(status).unwrap(),
                    [(axum::http::header::LOCATION, location)],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), hits)
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_and_nothing_reaches_the_address_it_names() {
    // The address a hostile or misconfigured receiver redirects to.
    let (elsewhere, reached) = receiver(answers(&[])).await;
    for status in [307, 308, 301, 302, 303] {
        let (url, hits) = redirector(status, elsewhere.clone()).await;
        let mut signed = webhook("duty", &url);
        signed.secret = Some("hmac-secret-0123456789".into());
        let mut pd = ReceiverSettings::new("pd", ReceiverKind::Pagerduty);
        pd.url = Some(url.clone());
        pd.routing_key = Some("routing-key-0123456789".into());
        pd.max_attempts = 3;
        pd.breaker_failures = 0;
        let mut h = start(vec![signed, pd]);
        h.dispatcher
            .submit(job("duty", 1, NotificationKind::Trigger));
        h.dispatcher.submit(job("pd", 2, NotificationKind::Trigger));
        let (done, attempts) = h.outcomes(2).await;
        for (job, outcome) in &done {
            match outcome {
                Outcome::Failed { attempts: 1, error } => {
                    assert!(error.contains(&status.to_string()), "{error}");
                    assert!(error.contains("redirects are not followed"), "{error}");
                    assert!(
                        !error.contains("127.0.0.1"),
                        "the target is never shown: {error}"
                    );
                }
                other => panic!("{} on {status}: {other:?}", job.pending.receiver),
            }
        }
        assert!(
            attempts.is_empty(),
            "a redirect is not retried: {attempts:?}"
        );
        assert_eq!(
            *hits.lock().unwrap(),
            2,
            "each receiver tried once on {status}"
        );
        assert!(
            reached.lock().unwrap().is_empty(),
            "the redirect target received a request on {status}"
        );
    }
}

#[tokio::test]
async fn the_circuit_breaker_opens_after_consecutive_failures_and_then_fails_fast() {
    let (url, seen) = receiver(Arc::new(|_| (500, Duration::ZERO))).await;
    let mut r = webhook("flaky", &url);
    r.max_attempts = 1;
    r.breaker_failures = 3;
    r.breaker_cooldown_ms = 60_000;
    r.concurrency = 1;
    // With a fallback, an open breaker hands notifications over at once.
    r.fallback = Some("backup".into());
    let mut h = start(vec![r]);
    for n in 0..3 {
        h.dispatcher
            .submit(job("flaky", n, NotificationKind::Trigger));
    }
    let (done, _) = h.outcomes(3).await;
    assert!(done
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Failed { error, .. } if error.contains("500"))));
    assert_eq!(
        h.metric(
            "safeclock_escalation_breaker_open",
            &[("receiver", "flaky")]
        ),
        1.0
    );
    // Open: the next jobs are refused without a request, so they can go to a fallback at once.
    let started = Instant::now();
    for n in 3..8 {
        h.dispatcher
            .submit(job("flaky", n, NotificationKind::Trigger));
    }
    let (done, _) = h.outcomes(5).await;
    // Refused at once, not after the 60 s cool-down: the bound is loose so that a loaded
    // machine cannot fail it, and still far below anything that waited.
    assert!(started.elapsed() < Duration::from_secs(10));
    for (_, o) in &done {
        assert!(
            matches!(o, Outcome::Failed { attempts: 1, error } if error.contains("circuit breaker open")),
            "{o:?}"
        );
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "no request while the breaker is open"
    );
    assert_eq!(
        h.metric(
            "safeclock_escalation_attempts_total",
            &[("receiver", "flaky"), ("result", "breaker_open")]
        ),
        5.0
    );
}

#[tokio::test]
async fn without_a_fallback_an_open_breaker_holds_notifications_until_the_receiver_recovers() {
    // Down for the first 3 requests; the breaker opens after 2 consecutive failures.
    let (url, seen) = receiver(answers(&[500, 500, 500])).await;
    let mut r = webhook("lonely", &url);
    r.max_attempts = 50;
    r.initial_backoff_ms = 20;
    r.max_backoff_ms = 100;
    r.breaker_failures = 2;
    r.breaker_cooldown_ms = 300;
    r.concurrency = 1;
    let mut h = start(vec![r]);
    for n in 0..4 {
        h.dispatcher
            .submit(job("lonely", n, NotificationKind::Trigger));
    }
    let (done, attempts) = h.outcomes(4).await;
    for (j, o) in &done {
        assert!(
            matches!(o, Outcome::Delivered { .. }),
            "{}: {o:?}",
            j.pending.delivery_id
        );
    }
    assert!(
        attempts
            .iter()
            .any(|(_, e, _)| e.contains("circuit breaker open")),
        "the breaker held them back: {attempts:?}"
    );
    // While open, nothing reached the receiver: 3 failures, then one trial and the 4 deliveries
    // at most (the trial is one of them).
    assert!(
        seen.lock().unwrap().len() <= 3 + 4,
        "{}",
        seen.lock().unwrap().len()
    );
}

#[tokio::test]
async fn the_breaker_half_opens_after_its_cooldown_and_closes_on_success() {
    let (url, seen) = receiver(answers(&[500, 500])).await;
    let mut r = webhook("recovering", &url);
    r.max_attempts = 1;
    r.breaker_failures = 2;
    r.breaker_cooldown_ms = 300;
    r.concurrency = 1;
    let mut h = start(vec![r]);
    for n in 0..2 {
        h.dispatcher
            .submit(job("recovering", n, NotificationKind::Trigger));
    }
    h.outcomes(2).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    h.dispatcher
        .submit(job("recovering", 9, NotificationKind::Trigger));
    let (done, _) = h.outcomes(1).await;
    assert_eq!(done[0].1, Outcome::Delivered { attempts: 1 });
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(
        h.metric(
            "safeclock_escalation_breaker_open",
            &[("receiver", "recovering")]
        ),
        0.0
    );
}

#[tokio::test]
async fn the_rate_limit_paces_requests() {
    let (url, seen) = receiver(answers(&[])).await;
    let mut r = webhook("paced", &url);
    r.rate_per_sec = 20;
    r.burst = 1;
    let mut h = start(vec![r]);
    let started = Instant::now();
    for n in 0..10 {
        h.dispatcher
            .submit(job("paced", n, NotificationKind::Trigger));
    }
    h.outcomes(10).await;
    // 10 requests at 20/s with no burst take at least 9 intervals of 50 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(430),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.lock().unwrap().len(), 10);
}

/// The engine and the delivery layer together: the primary receiver is down, so its page is
/// dead-lettered with the reason and goes to the fallback, which delivers it.
#[tokio::test]
async fn an_unreachable_receiver_falls_back_and_its_page_is_dead_lettered() {
    use safeclock_common::config::Settings;
    use safeclock_escalator::engine::{Action, Engine};
    use safeclock_escalator::routing::Routing;

    let (fallback_url, fallback_seen) = receiver(answers(&[])).await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = Settings::defaults().unwrap();
    settings.escalator.log_receiver = false;
    let mut primary = webhook("primary", &format!("http://127.0.0.1:{dead_port}/x"));
    primary.max_attempts = 3;
    primary.fallback = Some("backup".into());
    settings.escalator.receivers = vec![primary, webhook("backup", &fallback_url)];
    settings.validate().unwrap();
    let mut engine = Engine::new(0, Arc::new(Routing::new(&settings.escalator)), 3600);
    let mut h = start(settings.escalator.all_receivers());

    let breach = job("primary", 1, NotificationKind::Trigger).event;
    let now = OffsetTime::for_tests().now();
    let mut actions = engine.on_sla_event(&breach, now);
    let mut dead = Vec::new();
    let mut delivered = Vec::new();
    // Drive: submit deliveries, feed outcomes back, until nothing is pending.
    loop {
        let mut submitted = 0;
        for a in std::mem::take(&mut actions) {
            match a {
                Action::Deliver(j) => {
                    h.dispatcher.submit(j);
                    submitted += 1;
                }
                Action::DeadLetter { job, error } => dead.push((job.pending.receiver, error)),
                _ => {}
            }
        }
        if submitted == 0 {
            break;
        }
        let (done, _) = h.outcomes(submitted).await;
        for (j, o) in done {
            if matches!(o, Outcome::Delivered { .. }) {
                delivered.push(j.pending.receiver.clone());
            }
            actions.extend(engine.on_outcome(&j.escalation_id, &j.pending.delivery_id, &o, now));
        }
    }
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "primary");
    assert!(dead[0].1.contains("connect"), "{}", dead[0].1);
    assert_eq!(delivered, ["backup"]);
    let body: serde_json::Value =
        serde_json::from_slice(&fallback_seen.lock().unwrap()[0].body).unwrap();
    assert_eq!(body["fallbackFor"], "primary");
    assert_eq!(body["notification"], "trigger");
}

#[tokio::test]
async fn webhooks_are_signed_and_templates_shape_the_body() {
    let (url, seen) = receiver(answers(&[])).await;
    let mut plain = webhook("signed", &url);
    plain.secret = Some("a-shared-secret".into());
    // A webhook the force allows the referral id; the templated one keeps the default (codes).
    plain.payload = Some(Payload::Referral);
    let mut templated = webhook("chat", &url);
    templated.template = Some(
        r#"{"text": {{summary}}, "key": {{dedup_key}}, "level": {{level}}, "force": {{force}}}"#
            .into(),
    );
    let mut h = start(vec![plain, templated]);
    h.dispatcher
        .submit(job("signed", 1, NotificationKind::Trigger));
    h.outcomes(1).await;
    h.dispatcher
        .submit(job("chat", 2, NotificationKind::Trigger));
    h.outcomes(1).await;
    let s = seen.lock().unwrap();
    let signed = &s[0];
    let ts: i64 = signed.headers[TIMESTAMP_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The signature's time is the wall clock's, which the receiver compares with its own,
    // whatever the escalator's (possibly shifted) clock says.
    assert!((jiff::Timestamp::now().as_second() - ts).abs() < 60);
    assert_eq!(
        signed.headers[SIGNATURE_HEADER].to_str().unwrap(),
        signature(b"a-shared-secret", ts, &signed.body),
        "the receiver can verify the body with the shared secret"
    );
    assert_eq!(signed.headers["x-safeclock-dedup-key"], "k-1");
    let body: serde_json::Value = serde_json::from_slice(&signed.body).unwrap();
    assert_eq!(body["dedupKey"], "k-1");
    assert_eq!(body["slaEvent"]["referralId"], "R-1");
    let chat: serde_json::Value = serde_json::from_slice(&s[1].body).unwrap();
    assert_eq!(chat["key"], "k-2");
    assert_eq!(chat["level"], 1);
    assert_eq!(chat["force"], "nottinghamshire");
    assert!(chat["text"]
        .as_str()
        .unwrap()
        .starts_with("BREACHED victim-contact"));
    assert!(
        !String::from_utf8_lossy(&s[1].body).contains("R-2"),
        "a codes payload names no referral"
    );
    assert!(
        !s[1].headers.contains_key(SIGNATURE_HEADER),
        "no secret, no signature"
    );
}

#[tokio::test]
async fn pagerduty_gets_events_v2_trigger_acknowledge_and_resolve_with_one_dedup_key() {
    let (url, seen) = receiver(Arc::new(|_| (202, Duration::ZERO))).await;
    let mut pd = ReceiverSettings::new("pd", ReceiverKind::Pagerduty);
    pd.url = Some(url);
    pd.routing_key = Some("R0UT1NGKEY0123456789".into());
    let mut h = start(vec![pd]);
    for kind in [
        NotificationKind::Trigger,
        NotificationKind::Acknowledge,
        NotificationKind::Resolve,
    ] {
        h.dispatcher.submit(job("pd", 7, kind));
        let (done, _) = h.outcomes(1).await;
        assert_eq!(done[0].1, Outcome::Delivered { attempts: 1 });
    }
    let bodies: Vec<serde_json::Value> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    let actions: Vec<&str> = bodies
        .iter()
        .map(|b| b["event_action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["trigger", "acknowledge", "resolve"]);
    for b in &bodies {
        assert_eq!(b["routing_key"], "R0UT1NGKEY0123456789");
        assert_eq!(b["dedup_key"], "k-7");
    }
    let p = &bodies[0]["payload"];
    // PagerDuty is a third party: by default it gets codes and the escalation id only.
    for b in &bodies {
        assert!(!b.to_string().contains("R-7"), "{b}");
    }
    assert!(p["custom_details"].get("referral_id").is_none());
    assert_eq!(p["source"], "safeclock/nottinghamshire");
    assert_eq!(p["severity"], "critical");
    assert_eq!(p["custom_details"]["escalation_id"], "e-7");
    assert_eq!(p["custom_details"]["rule_id"], "victim-contact");
    assert!(
        bodies[1].get("payload").is_none(),
        "acknowledge carries no payload"
    );
}

/// A minimal SMTP server: accepts every message and keeps its DATA.
async fn smtp_sink() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let m = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let m = m.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut data: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(d) = data.as_mut() {
                        if line == "." {
                            m.lock().unwrap().push(data.take().unwrap());
                            w.write_all(b"250 OK queued\r\n").await.unwrap();
                        } else {
                            d.push_str(&line);
                            d.push('\n');
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 OK\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            w.write_all(b"221 bye\r\n").await.unwrap();
                            return;
                        }
                        _ => b"502 unknown\r\n",
                    };
                    w.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, mails)
}

#[tokio::test]
async fn email_goes_over_smtp_with_a_subject_that_says_what_and_no_names() {
    let (port, mails) = smtp_sink().await;
    let mut email = ReceiverSettings::new("mail", ReceiverKind::Email);
    email.smtp_host = Some("127.0.0.1".into());
    email.smtp_port = Some(port);
    email.smtp_tls = SmtpTls::None;
    email.from = Some("safeclock@force.example".into());
    email.to = vec!["duty-inspector@force.example".into()];
    let mut h = start(vec![email]);
    h.dispatcher
        .submit(job("mail", 3, NotificationKind::Trigger));
    let (done, _) = h.outcomes(1).await;
    assert_eq!(done[0].1, Outcome::Delivered { attempts: 1 });
    let mut resolve = job("mail", 3, NotificationKind::Resolve);
    resolve.resolution = "met_late".into();
    h.dispatcher.submit(resolve);
    h.outcomes(1).await;
    let mails = mails.lock().unwrap();
    assert_eq!(mails.len(), 2);
    assert!(
        mails[0].contains("Subject: [safeclock] BREACHED victim-contact escalation e-3 level 1"),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("To: duty-inspector@force.example"));
    assert!(mails[0].contains("k-3"), "the dedup key is in the body");
    assert!(mails[1].contains("RESOLVED (met_late)"), "{}", mails[1]);
    for mail in mails.iter() {
        assert!(
            !mail.contains("R-3"),
            "a mailbox gets no referral id by default: {mail}"
        );
    }
}
