//! Starting intake against a broker for a test, and reading back what it stored.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use safeclock_common::config::{IntakeClientGrant, Secret, Settings};
use safeclock_common::kafka::{self, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::Readiness;
use safeclock_common::service::ServiceDeps;
use safeclock_common::shutdown::CancellationToken;
use safeclock_common::time::{OffsetTime, TimeSource};

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Settings isolated for one test, with one client token.
pub fn settings(brokers: &str) -> Settings {
    let mut s = safeclock_tests::isolated_settings(brokers);
    s.intake.add_client(
        "test-rms",
        Secret::new(TOKEN),
        IntakeClientGrant::all_forces(),
    );
    s.intake.delivery_timeout_ms = 3000;
    s
}

/// A running intake.
pub struct Running {
    pub url: String,
    pub addr: SocketAddr,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    pub fn metric(&self, name: &str, label: (&str, &str)) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == label.0 && l.value() == label.1)
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }
}

/// Starts intake on a free loopback port (creating the topics first when `create` is set).
pub async fn start(settings: Settings, create: bool) -> Running {
    if create {
        kafka::ensure_topics(&settings, &[Topic::ReferralEvents, Topic::DeadLetter])
            .await
            .unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    // A certificate made for the test names `localhost`.
    let url = if settings.intake.server.tls() {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    };
    let registry = Registry::new();
    let consumer_metrics = ConsumerMetrics::register(&registry).unwrap();
    let deps = ServiceDeps {
        settings: Arc::new(settings),
        registry: registry.clone(),
        readiness: Readiness::default(),
        time: Arc::new(OffsetTime::for_tests()),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(safeclock_intake::serve(
        listener,
        deps,
        consumer_metrics,
        shutdown.clone(),
    ));
    Running {
        url,
        addr,
        registry,
        shutdown,
        task,
    }
}

/// A valid event occurring now.
pub fn event(id: &str, referral: &str) -> serde_json::Value {
    let now = OffsetTime::for_tests().now();
    serde_json::json!({
        "eventId": id,
        "referralId": referral,
        "forceId": "nottinghamshire",
        "occurredAt": now.to_string(),
        "recordedAt": now.to_string(),
        "sourceSystem": "test",
        "referralReceived": {"category": "CATEGORY_GROOMING", "risk": "RISK_GRADE_HIGH"}
    })
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// POSTs `body` (JSON) with the test token; returns status and JSON body.
pub async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let r = http
        .post(format!("{url}/v1/events"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body, headers)
}
