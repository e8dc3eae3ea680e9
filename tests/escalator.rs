//! The escalator against real processes: Apache Kafka (`SAFECLOCK_TEST_BROKERS`, and a node of
//! its own for the test that stops it) and Debian's Alertmanager (`SAFECLOCK_TEST_ALERTMANAGER`),
//! both started by `scripts/test.sh`. SLA events are
//! produced directly (the escalator's input contract), so these tests do not depend on the clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use rdkafka::message::Message;
use safeclock_common::config::{
    ApiScope, LevelSettings, OperatorGrant, Payload, PolicySettings, ReceiverKind,
    ReceiverSettings, Secret, Settings,
};
use safeclock_common::kafka::{self, dlq_headers, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::Readiness;
use safeclock_common::schema::from_jiff;
use safeclock_common::schema::v1::{
    EscalationAction, EscalationRecord, Severity, SlaEvent, SlaLabels, SlaTransition,
};
use safeclock_common::service::ServiceDeps;
use safeclock_tests::{
    counter, free_port, gauge, header, isolated_settings, produce, read_until, reader,
    real_alertmanager, real_broker, wait_for, RecordingWebhook,
};
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN: &str = "test-token-0123456789abcdef";
const DERBY_TOKEN: &str = "derby-token-0123456789abcdef";

fn sla_event(referral: &str, transition: SlaTransition, id: &str) -> Vec<u8> {
    let now = safeclock_tests::now();
    let e = SlaEvent {
        sla_event_id: id.into(),
        referral_id: referral.into(),
        rule_id: "victim-contact".into(),
        rule_title: "Victim contacted".into(),
        clock_id: format!("{referral}-c1"),
        transition: transition as i32,
        severity: Severity::Critical as i32,
        labels: Some(SlaLabels {
            force_id: "nottinghamshire".into(),
            category: "grooming".into(),
            risk: "high".into(),
            child_age_band: "aged_13_to_15".into(),
            area: "city".into(),
            team: "mash".into(),
        }),
        deadline: Some(from_jiff(now - jiff::SignedDuration::from_mins(5))),
        emitted_at: Some(from_jiff(now)),
        ..SlaEvent::default()
    };
    serde_json::to_vec(&e).unwrap()
}

fn policy(name: &str, receivers: &[&str]) -> PolicySettings {
    PolicySettings {
        name: name.into(),
        levels: vec![LevelSettings {
            delay_secs: 0,
            receivers: receivers.iter().map(|r| r.to_string()).collect(),
        }],
        repeat_interval_secs: 0,
        repeat_limit: 0,
        ack_expiry_secs: 0,
    }
}

/// Runs the escalator library in this process until the returned token is cancelled.
async fn start(
    settings: Settings,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    Registry,
) {
    settings.validate().unwrap();
    kafka::ensure_topics(&settings, &Topic::ALL).await.unwrap();
    let registry = Registry::new();
    let readiness = Readiness::default();
    let deps = ServiceDeps {
        settings: Arc::new(settings),
        registry: registry.clone(),
        readiness: readiness.clone(),
        time: safeclock_tests::test_time(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(safeclock_escalator::run(
        deps,
        ConsumerMetrics::register(&registry).unwrap(),
        shutdown.clone(),
    ));
    wait_for("the escalator to be assigned partitions", TIMEOUT, || {
        readiness.is_ready()
    })
    .await;
    (shutdown, task, registry)
}

async fn alerts(client: &reqwest::Client, am: &str) -> Vec<serde_json::Value> {
    client
        .get(format!("{am}/api/v2/alerts"))
        .send()
        .await
        .unwrap()
        .json::<Vec<serde_json::Value>>()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_fires_in_alertmanager_is_acknowledged_through_the_api_and_resolved_when_met() {
    let Some(am) = real_alertmanager() else {
        return;
    };
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    let referral = format!("R-AM-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut am_receiver = ReceiverSettings::new("alertmanager", ReceiverKind::Alertmanager);
    am_receiver.url = Some(am.clone());
    // This Alertmanager is the force's own: it may see the referral id.
    am_receiver.payload = Some(Payload::Referral);
    settings.escalator.receivers = vec![am_receiver];
    settings.escalator.log_receiver = true;
    settings.escalator.policies = vec![policy("default", &["log", "alertmanager"])];
    let api_addr = format!("127.0.0.1:{}", free_port());
    settings.escalator.api.listen = api_addr.parse().unwrap();
    // A token per person: the id is who acknowledged. Another force's desk sees and acts on
    // nothing of Nottinghamshire's.
    settings.escalator.api.add_operator(
        "op-1234",
        Secret::new(TOKEN),
        OperatorGrant {
            scopes: vec![ApiScope::Read, ApiScope::Acknowledge, ApiScope::Resolve],
            forces: vec!["nottinghamshire".into()],
        },
    );
    settings.escalator.api.add_operator(
        "derby-desk",
        Secret::new(DERBY_TOKEN),
        OperatorGrant {
            scopes: vec![ApiScope::Read, ApiScope::Acknowledge, ApiScope::Resolve],
            forces: vec!["derbyshire".into()],
        },
    );
    let sla_topic = settings.topic(Topic::SlaEvents);
    let log_topic = settings.topic(Topic::EscalationLog);
    let (shutdown, task, registry) = start(settings).await;

    produce(
        &brokers,
        &sla_topic,
        &referral,
        &sla_event(
            &referral,
            SlaTransition::Breached,
            &format!("{referral}-breach"),
        ),
    )
    .await;

    // The breach is an active alert in Alertmanager with the expected labels.
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let alert = loop {
        let found = alerts(&client, &am)
            .await
            .into_iter()
            .find(|a| a["labels"]["referral_id"] == referral.as_str());
        if let Some(a) = found {
            break a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no alert for {referral} in Alertmanager"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let labels = &alert["labels"];
    assert_eq!(labels["alertname"], "SafeclockSlaBreach");
    assert_eq!(labels["rule"], "victim-contact");
    assert_eq!(labels["force"], "nottinghamshire");
    assert_eq!(labels["category"], "grooming");
    assert_eq!(labels["risk"], "high");
    assert_eq!(labels["area"], "city");
    assert_eq!(labels["severity"], "critical");
    assert_eq!(labels["threshold"], "breached");
    assert_eq!(labels["level"], "1");
    assert_eq!(alert["status"]["state"], "active");
    let escalation_id = labels["escalation_id"].as_str().unwrap().to_string();
    assert!(alert["annotations"]["summary"]
        .as_str()
        .unwrap()
        .contains(&referral));

    // The API lists it, refuses a request without a valid token, and acknowledges it.
    let api = format!("http://{api_addr}/v1/escalations");
    let unauthorised = client.get(&api).send().await.unwrap();
    assert_eq!(unauthorised.status(), 401);
    let wrong = client
        .get(&api)
        .bearer_auth("not-the-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let listed: serde_json::Value = client
        .get(&api)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let open = listed["escalations"].as_array().unwrap();
    assert!(
        open.iter()
            .any(|e| e["escalationId"] == escalation_id.as_str() && e["status"] == "open"),
        "{listed}"
    );
    let derby: serde_json::Value = client
        .get(&api)
        .bearer_auth(DERBY_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        derby["escalations"],
        serde_json::json!([]),
        "another force's list"
    );
    let derby_ack = client
        .post(format!("{api}/{escalation_id}/ack"))
        .bearer_auth(DERBY_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(derby_ack.status(), 403);
    let acked = client
        .post(format!("{api}/{escalation_id}/ack"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"note": "officer_attending"}))
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status(), 200);
    let acked: serde_json::Value = acked.json().await.unwrap();
    assert_eq!(acked["status"], "acknowledged");
    assert_eq!(acked["acknowledgedBy"], "op-1234");
    let missing = client
        .post(format!("{api}/no-such-id/ack"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The clock is met (late): the alert is resolved in Alertmanager.
    produce(
        &brokers,
        &sla_topic,
        &referral,
        &sla_event(
            &referral,
            SlaTransition::MetLate,
            &format!("{referral}-met-late"),
        ),
    )
    .await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let still = alerts(&client, &am).await.into_iter().any(|a| {
            a["labels"]["referral_id"] == referral.as_str() && a["status"]["state"] == "active"
        });
        if !still {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the alert for {referral} was never resolved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resolved = client
        .post(format!("{api}/{escalation_id}/resolve"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), 409, "already resolved by the clock");

    // The audit trail: paged, acknowledged (with who and the note), resolved (by the clock).
    let log = reader(&brokers, &[&log_topic]);
    let records = read_until(&log, TIMEOUT, |m| {
        let actions: BTreeSet<i32> = m
            .iter()
            .map(|m| {
                serde_json::from_slice::<EscalationRecord>(m.payload().unwrap())
                    .unwrap()
                    .action
            })
            .collect();
        actions.contains(&(EscalationAction::Resolved as i32))
            && actions.contains(&(EscalationAction::Acknowledged as i32))
            // Both lists (op-1234's and the Derbyshire desk's), whichever partitions they are on.
            && m.iter()
                .filter(|m| {
                    serde_json::from_slice::<EscalationRecord>(m.payload().unwrap())
                        .unwrap()
                        .action()
                        == EscalationAction::Listed
                })
                .count()
                >= 2
            && actions.contains(&(EscalationAction::Denied as i32))
            && m.iter()
                .filter(|m| {
                    serde_json::from_slice::<EscalationRecord>(m.payload().unwrap())
                        .unwrap()
                        .notification
                        == "resolve"
                })
                .count()
                >= 2
    })
    .await;
    let records: Vec<EscalationRecord> = records
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    let ack = records
        .iter()
        .find(|r| r.action() == EscalationAction::Acknowledged)
        .unwrap();
    assert_eq!(ack.actor, "op-1234");
    assert_eq!(ack.note, "officer_attending");
    // Every API action is audited: the lists (by whom, how many) and the refused acknowledgement.
    assert!(
        records
            .iter()
            .any(|r| r.action() == EscalationAction::Listed
                && r.actor == "op-1234"
                && r.count >= 1),
        "no audit record of the list"
    );
    assert!(
        records
            .iter()
            .any(|r| r.action() == EscalationAction::Listed
                && r.actor == "derby-desk"
                && r.count == 0),
        "no audit record of the other force's list"
    );
    assert!(
        records
            .iter()
            .any(|r| r.action() == EscalationAction::Denied
                && r.actor == "derby-desk"
                && r.escalation_id == escalation_id
                && r.error == "force_not_granted"),
        "no audit record of the refused acknowledgement"
    );
    let res = records
        .iter()
        .find(|r| r.action() == EscalationAction::Resolved)
        .unwrap();
    assert_eq!(
        (res.actor.as_str(), res.resolution.as_str()),
        ("clock", "met_late")
    );
    for receiver in ["log", "alertmanager"] {
        for what in ["trigger", "resolve"] {
            assert!(
                records
                    .iter()
                    .any(|r| r.action() == EscalationAction::Notified
                        && r.receiver == receiver
                        && r.notification == what),
                "no {what} delivered to {receiver}"
            );
        }
    }

    // The metrics: pages by receiver and outcome, time to acknowledge, open escalations.
    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    for line in [
        "safeclock_escalations_total{outcome=\"delivered\",receiver=\"alertmanager\"}",
        "safeclock_escalation_time_to_acknowledge_seconds_count 1",
        "safeclock_escalation_delivery_seconds_count{receiver=\"alertmanager\"}",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_receiver_is_dead_lettered_with_the_reason_and_the_fallback_is_paged() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    let backup = RecordingWebhook::default();
    let mut primary = ReceiverSettings::new("duty-inspector", ReceiverKind::Webhook);
    primary.url = Some(format!(
        "http://127.0.0.1:{}/gone?token=s3cret",
        free_port()
    ));
    primary.max_attempts = 3;
    primary.initial_backoff_ms = 20;
    primary.fallback = Some("backup".into());
    let mut fallback = ReceiverSettings::new("backup", ReceiverKind::Webhook);
    fallback.url = Some(backup.start().await);
    settings.escalator.log_receiver = false;
    settings.escalator.receivers = vec![primary, fallback];
    let sla_topic = settings.topic(Topic::SlaEvents);
    let dlq_topic = settings.topic(Topic::DeadLetter);
    let (shutdown, task, _) = start(settings).await;

    produce(
        &brokers,
        &sla_topic,
        "R-DLQ-1",
        &sla_event("R-DLQ-1", SlaTransition::Breached, "R-DLQ-1-breach"),
    )
    .await;
    wait_for("the fallback to be paged", TIMEOUT, || {
        !backup.bodies().is_empty()
    })
    .await;
    let body = &backup.bodies()[0];
    assert_eq!(body["fallbackFor"], "duty-inspector");
    // A webhook's default payload: codes and the opaque escalation id, no referral id.
    assert!(body["slaEvent"].get("referralId").is_none(), "{body}");
    assert!(
        !body["summary"].as_str().unwrap().contains("R-DLQ-1"),
        "{body}"
    );
    assert_eq!(
        body["escalationId"].as_str().map(str::len),
        Some(36),
        "{body}"
    );

    let dlq = reader(&brokers, &[&dlq_topic]);
    let dead = read_until(&dlq, TIMEOUT, |m| !m.is_empty()).await;
    assert_eq!(
        header(&dead[0], dlq_headers::SERVICE).as_deref(),
        Some("escalator")
    );
    assert_eq!(
        header(&dead[0], dlq_headers::REASON).as_deref(),
        Some("notification_undeliverable")
    );
    let error = header(&dead[0], dlq_headers::ERROR).unwrap();
    assert!(
        error.contains("duty-inspector") && error.contains("connect"),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
    let page: serde_json::Value = serde_json::from_slice(dead[0].payload().unwrap()).unwrap();
    assert_eq!(page["receiver"], "duty-inspector");
    assert_eq!(page["slaEvent"]["referralId"], "R-DLQ-1");

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// A webhook that records each page as it arrives and answers only once `open` is true.
async fn gated_webhook(
    bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    open: tokio::sync::watch::Receiver<bool>,
) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let (bodies, mut open) = (bodies.clone(), open.clone());
            async move {
                bodies.lock().unwrap().push(body);
                let _ = open.wait_for(|o| *o).await;
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

/// Pages are delivered while the broker is stopped, so the writes of their outcomes fail (they
/// are in flight while the escalator goes on): once the broker answers again they are written
/// from the escalations' current state, and an escalator that crashes after that and restarts
/// finds nothing pending and pages nobody twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_written_while_the_broker_is_away_are_written_again_and_nobody_is_paged_twice() {
    let dir = std::env::temp_dir().join(format!("safeclock-esc-away-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // Its own node, so stopping it stops no other test.
    let broker = tokio::task::block_in_place(|| {
        safeclock_tests::kafka_cluster::KafkaCluster::start_stoppable(&dir)
    });
    let brokers = broker.bootstrap().to_string();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let url = gated_webhook(bodies.clone(), open_rx).await;
    let mut settings = isolated_settings(&brokers);
    settings.escalator.log_receiver = false;
    let mut duty = ReceiverSettings::new("duty", ReceiverKind::Webhook);
    duty.url = Some(url);
    // Longer than the webhook holds the pages.
    duty.timeout_ms = 60_000;
    settings.escalator.receivers = vec![duty];
    settings.escalator.policies = vec![policy("default", &["duty"])];
    settings
        .kafka
        .producer_properties
        .insert("message.timeout.ms".into(), "2000".into());
    // Longer than the stop, so the escalator keeps its partitions through it.
    settings
        .kafka
        .consumer_properties
        .insert("session.timeout.ms".into(), "30000".into());
    let sla_topic = settings.topic(Topic::SlaEvents);
    let log_topic = settings.topic(Topic::EscalationLog);
    let (shutdown, task, registry) = start(settings.clone()).await;

    let referrals: Vec<String> = (0..5).map(|i| format!("R-AWAY-{i}")).collect();
    for r in &referrals {
        produce(
            &brokers,
            &sla_topic,
            r,
            &sla_event(r, SlaTransition::Breached, &format!("{r}-breach")),
        )
        .await;
    }
    // Each page has reached the receiver, so its escalation's state (the page pending) is
    // durable; the receiver holds its answer.
    wait_for("every page to reach the receiver", TIMEOUT, || {
        bodies.lock().unwrap().len() == referrals.len()
    })
    .await;

    // The broker stops; the receiver answers; the outcomes' writes time out (2 s).
    broker.pause(1);
    open_tx.send(true).unwrap();
    wait_for("the escalator to wait for the broker", TIMEOUT, || {
        counter(
            &registry,
            "safeclock_broker_waits_total",
            &[("service", "escalator")],
        ) >= 1.0
    })
    .await;
    broker.resume(1);

    // Every outcome is written once the broker is back.
    let log = reader(&brokers, &[&log_topic]);
    read_until(&log, Duration::from_secs(90), |m| {
        let notified: BTreeSet<String> = m
            .iter()
            .filter_map(|r| {
                serde_json::from_slice::<EscalationRecord>(r.payload().unwrap_or_default()).ok()
            })
            .filter(|r| r.action() == EscalationAction::Notified)
            .map(|r| r.referral_id)
            .collect();
        referrals.iter().all(|r| notified.contains(r))
    })
    .await;

    // A crash (no hand-over, nothing written on the way out), then a restart: it restores the
    // escalations with their pages done and sends none again.
    task.abort();
    let _ = task.await;
    drop(shutdown);
    let (shutdown, task, registry) = start(settings).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gauge(&registry, "safeclock_escalation_pending_notifications"),
        0,
        "nothing is pending after the restart"
    );
    let pages = bodies.lock().unwrap().clone();
    assert_eq!(
        pages.len(),
        referrals.len(),
        "each referral paged once: {pages:?}"
    );
    let keys: BTreeSet<String> = pages
        .iter()
        .map(|b| b["dedupKey"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(keys.len(), referrals.len(), "{pages:?}");

    shutdown.cancel();
    task.await.unwrap().unwrap();
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
