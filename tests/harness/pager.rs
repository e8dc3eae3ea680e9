//! A pager for escalation tests: a local webhook receiver that records every request on arrival
//! and answers as the test tells it (200, after a delay or not, or 500). Recorded on arrival
//! because a request that reached the pager is a page, whether or not its sender waits for the
//! answer: that is what "never paged twice" has to count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};

/// One request the pager received.
#[derive(Debug, Clone)]
pub struct ReceivedPage {
    /// `X-Safeclock-Delivery-Id`: one per (escalation, receiver), the same on every retry.
    pub delivery_id: String,
    pub referral_id: String,
    /// What the pager answered.
    pub status: u16,
    /// When it arrived, on the tests' clock (`crate::now`).
    pub received_at: jiff::Timestamp,
}

#[derive(Clone, Default)]
pub struct TestPager {
    failing: Arc<AtomicBool>,
    delay: Duration,
    pages: Arc<Mutex<Vec<ReceivedPage>>>,
}

impl TestPager {
    /// A pager that answers 200 at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pager that answers `delay` after each request arrived: a slow receiver, so that a
    /// rebalance or a kill finds pages under way.
    pub fn answering_after(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Starts it on a free loopback port; returns its URL.
    pub async fn start(&self) -> String {
        let pager = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                    let pager = pager.clone();
                    async move {
                        let status = if pager.failing.load(Ordering::SeqCst) {
                            500
                        } else {
                            200
                        };
                        let delivery_id = headers
                            .get("x-safeclock-delivery-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let referral_id = body["slaEvent"]["referralId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        pager.pages.lock().unwrap().push(ReceivedPage {
                            delivery_id,
                            referral_id,
                            status,
                            received_at: crate::now(),
                        });
                        tokio::time::sleep(pager.delay).await;
                        StatusCode::from_u16(status).unwrap()
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    /// From now on, answer 500 (`true`) or 200 (`false`).
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Every request so far, in order of arrival.
    pub fn pages(&self) -> Vec<ReceivedPage> {
        self.pages.lock().unwrap().clone()
    }
}
