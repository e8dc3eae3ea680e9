//! Intake under load and malice, on the real broker (`SAFECLOCK_TEST_BROKERS`): idle
//! connections by the thousand, hostile JSON, one client squatting another's event ids, token
//! guessing, and https with a certificate made here. After each, intake still serves an
//! authorised client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{client, event, post, settings, start, TOKEN};
use rdkafka::message::Message;
use safeclock_common::config::Secret;
use safeclock_common::kafka::Topic;
use safeclock_tests::{header, read_until, reader, real_broker};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Posts `body` with the test token until an HTTP answer comes back (connections closed by the
/// server are retried every 100 ms); returns it and how long it took.
async fn post_until_answered(url: &str, body: &serde_json::Value) -> (u16, Duration) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    loop {
        match http
            .post(format!("{url}/v1/events"))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
        {
            Ok(r) => return (r.status().as_u16(), started.elapsed()),
            Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no answer within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_keep_an_authorised_client_out() {
    let brokers = real_broker();
    let s = settings(&brokers);
    let (limit, header_timeout) = (
        s.intake.server.max_connections,
        s.intake.server.header_read_timeout(),
    );
    assert_eq!(limit, 1024, "the test runs the default limits");
    let intake = start(s, true).await;
    // Warm up: the producer is connected before the attack starts.
    let (status, _) = post_until_answered(&intake.url, &event("slow-0", "R-SLOW")).await;
    assert_eq!(status, 202);
    let rss_before = rss_kib();

    // Slowloris: 2,000 connections that never send a byte.
    let started = Instant::now();
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        if let Ok(c) = TcpStream::connect(intake.addr).await {
            idle.push(c);
        }
    }
    let opened_in = started.elapsed();
    // An authorised client, while they are all still held open by the attacker.
    let (status, waited) = post_until_answered(&intake.url, &event("slow-1", "R-SLOW")).await;
    let rss_during = rss_kib();
    eprintln!(
        "slowloris: {} connections opened in {opened_in:?}; authorised request answered {status} \
         after {waited:?} (header timeout {header_timeout:?}); RSS {rss_before} KiB before, \
         {rss_during} KiB during",
        idle.len()
    );
    assert_eq!(status, 202);
    assert!(
        waited < header_timeout + Duration::from_secs(5),
        "the authorised request waited {waited:?}"
    );
    let refused = intake.metric(
        "safeclock_http_connections_refused_total",
        ("reason", "limit"),
    );
    assert!(
        refused >= (2000 - limit) as f64,
        "{refused} connections refused past the limit of {limit}"
    );
    assert!(
        rss_during < rss_before + 200 * 1024,
        "RSS grew from {rss_before} KiB to {rss_during} KiB"
    );
    drop(idle);
    // The process is fine: health answers at once and events are still stored.
    let r = client()
        .get(format!("{}/healthz", intake.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, body, _) = post(&client(), &intake.url, &event("slow-2", "R-SLOW")).await;
    assert_eq!(status, 202, "{body}");
    intake.stop().await;
}

#[tokio::test]
async fn hostile_json_gets_a_clear_answer_at_once_and_intake_keeps_serving() {
    let brokers = real_broker();
    let intake = start(settings(&brokers), true).await;
    let http = client();
    let url = format!("{}/v1/events", intake.url);
    let send = |body: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let started = Instant::now();
            let r = http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body, started.elapsed())
        }
    };

    // A JSON array of numbers just under the 1 MiB body limit.
    let mut numbers = String::from("[1");
    while numbers.len() < 1024 * 1024 - 8 {
        numbers.push_str(",1");
    }
    numbers.push(']');
    let (status, body, took) = send(numbers).await;
    eprintln!("1 MiB array of numbers: {status} in {took:?}");
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "too_many_events");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // JSON nested 10,000 deep, as arrays, as objects, and hidden in a valid event.
    let arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let mut hidden = event("deep-1", "R-DEEP");
    hidden["x"] = serde_json::Value::Null;
    let hidden = hidden.to_string().replace(
        r#""x":null"#,
        &format!(
            r#""x":{}1{}"#,
            r#"{"a":"#.repeat(10_000),
            "}".repeat(10_000)
        ),
    );
    for deep in [arrays, objects, hidden] {
        let (status, body, took) = send(deep).await;
        eprintln!("JSON nested 10,000 deep: {status} in {took:?}");
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "invalid_body");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("nested deeper than 32"),
            "{body}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    let (status, body, _) = post(&http, &intake.url, &event("after-hostile", "R-DEEP")).await;
    assert_eq!(status, 202, "{body}");
    intake.stop().await;
}

#[tokio::test]
async fn one_client_posting_anothers_event_id_first_does_not_make_it_a_duplicate() {
    const SQUATTER: &str = "squatter-token-0123456789";
    let brokers = real_broker();
    let mut s = settings(&brokers);
    s.intake.add_client(
        "squatter",
        Secret::new(SQUATTER),
        safeclock_common::config::IntakeClientGrant::all_forces(),
    );
    let topic = s.topic(Topic::ReferralEvents);
    let intake = start(s, true).await;
    let http = client();
    let url = format!("{}/v1/events", intake.url);

    // The squatter posts the id the real client is about to use, on a referral of its own.
    let r = http
        .post(&url)
        .bearer_auth(SQUATTER)
        .json(&event("evt-rms-0001", "R-SQUAT"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The real event is accepted, not answered `duplicate`, and stored.
    let (status, body, _) = post(&http, &intake.url, &event("evt-rms-0001", "R-REAL")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(body["events"][0]["status"], "accepted", "{body}");
    // The real client's own repeat is still a duplicate.
    let (status, body, _) = post(&http, &intake.url, &event("evt-rms-0001", "R-REAL")).await;
    assert_eq!((status, body["duplicates"].as_u64()), (202, Some(1)));

    let consumer = reader(&brokers, &[&topic]);
    let got = read_until(&consumer, TIMEOUT, |m| m.len() >= 2).await;
    let mut stored: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(v["eventId"], "evt-rms-0001");
            (
                header(m, "safeclock.intake.client").unwrap(),
                v["referralId"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [("squatter", "R-SQUAT"), ("test-rms", "R-REAL")].map(|(c, r)| (c.into(), r.into()))
    );
    let more = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await;
    assert!(more.is_err(), "the repeat was stored again");
    intake.stop().await;
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_address_and_counted() {
    let brokers = real_broker();
    let mut s = settings(&brokers);
    s.intake.auth_failure_burst = 3;
    s.intake.auth_failures_per_minute = 1;
    let intake = start(s, true).await;
    let url = format!("{}/v1/events", intake.url);
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<IpAddr>().unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let attacker = from("127.0.0.1");
    let one = event("auth-1", "R-AUTH");
    for guess in 0..3 {
        let r = attacker
            .post(&url)
            .bearer_auth(format!("guess-{guess}-0123456789abcdef"))
            .json(&one)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "guess {guess}");
    }
    let r = attacker
        .post(&url)
        .bearer_auth("guess-3-0123456789abcdef")
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_auth_failures");
    // Even the right token is not checked from that address now.
    let r = attacker
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // Another address is unaffected.
    let r = from("127.0.0.2")
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = from("127.0.0.3")
        .post(&url)
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let failures =
        |reason| intake.metric("safeclock_intake_auth_failures_total", ("reason", reason));
    assert_eq!(failures("invalid"), 3.0);
    assert_eq!(failures("rate_limited"), 2.0);
    assert_eq!(failures("missing"), 1.0);
    intake.stop().await;
}

#[tokio::test]
async fn intake_serves_https_itself_with_a_self_signed_certificate() {
    let brokers = real_broker();
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = certified.cert.pem();
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let mut s = settings(&brokers);
    s.intake.server.tls_cert_file = Some(dir.path().join("cert.pem"));
    s.intake.server.tls_key_file = Some(dir.path().join("key.pem"));
    let intake = start(s, true).await;
    assert!(
        intake.url.starts_with("https://localhost:"),
        "{}",
        intake.url
    );

    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (status, body, _) = post(&https, &intake.url, &event("tls-1", "R-TLS")).await;
    assert_eq!(status, 202, "{body}");
    // Plain http on the same port gets no answer.
    let plain = client()
        .post(format!("http://{}/v1/events", intake.addr))
        .bearer_auth(TOKEN)
        .json(&event("tls-2", "R-TLS"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    intake.stop().await;
}
