//! Client configuration and producers, and waiting out a broker that is restarting.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::{KafkaSettings, Settings};

/// A librdkafka client config with the brokers and every pass-through property.
pub fn client_config(kafka: &KafkaSettings, extra: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers);
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in kafka.properties.iter().chain(extra.iter()) {
        cfg.set(k, v);
    }
    // OpenSSL is built from source (openssl-src), so its own default CA directory is
    // /usr/local/ssl, not the system's. Unless the operator names the CAs, librdkafka looks in
    // the usual system places (/etc/ssl/certs/ca-certificates.crt and the like).
    let tls = cfg
        .get("security.protocol")
        .is_some_and(|p| p.to_ascii_uppercase().ends_with("SSL"));
    let names_ca = ["ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores"]
        .iter()
        .any(|k| cfg.get(k).is_some());
    if tls && !names_ca {
        cfg.set("ssl.ca.location", "probe");
    }
    cfg
}

/// What librdkafka was compiled with: its `builtin.features` (`ssl`, `sasl_plain`, `sasl_scram`,
/// `sasl_oauthbearer`, `zstd`, and `sasl_gssapi` or `oidc` only when safeclock was built with its
/// cargo feature `gssapi` or `oidc`).
pub fn builtin_features() -> Vec<String> {
    let list = ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .unwrap_or_default();
    list.split(',')
        .map(str::trim)
        // librdkafka built with cmake (the `oidc` feature does) defines WITH_SASL_CYRUS as 0,
        // and its list tests only whether it is defined: it then claims `sasl_gssapi` although
        // no GSSAPI provider was compiled. Only the `gssapi` feature builds one.
        .filter(|f| !f.is_empty() && (*f != "sasl_gssapi" || cfg!(feature = "gssapi")))
        .map(str::to_string)
        .collect()
}

/// The optional parts of the Kafka client that need system libraries at build time, each an
/// opt-in cargo feature of the `safeclock` crate: (librdkafka's builtin feature, cargo feature,
/// what it is for).
pub const OPTIONAL_FEATURES: [(&str, &str, &str); 2] = [
    ("sasl_gssapi", "gssapi", "Kerberos (SASL GSSAPI)"),
    ("oidc", "oidc", "OAUTHBEARER with OIDC token retrieval"),
];

/// A producer for outputs: `acks=all` and idempotent unless the operator overrides it.
///
/// `linger.ms` is 1: every safeclock writer waits for its records' acknowledgements before it
/// goes on (a batch's offsets, an intake answer, a page after its state write), so whatever a
/// batch waits to fill is added to every batch, one after another. Measured at a million open
/// clocks (docs/benchmarks.md): 1 ms against 5 ms took the breach append from p99 76 to 64 ms
/// and the page from p99 121 to 104 ms; the clock end to end was always benchmarked at 1 ms.
///
/// # Errors
/// When librdkafka refuses the configuration (the message names the property).
pub fn producer(settings: &Settings) -> anyhow::Result<FutureProducer> {
    producer_with(settings, None)
}

/// A producer, transactional when `transactional_id` is given (transactions are initialised,
/// which fences any older instance with the same id).
///
/// # Errors
/// When librdkafka refuses the configuration or the broker refuses the transactional id.
pub fn producer_with(
    settings: &Settings,
    transactional_id: Option<&str>,
) -> anyhow::Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("compression.type", "lz4");
    // Operator properties last, so they win.
    let base = client_config(&settings.kafka, &settings.kafka.producer_properties);
    for (k, v) in base.config_map() {
        cfg.set(k, v);
    }
    if let Some(id) = transactional_id {
        cfg.set("transactional.id", id);
    }
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    let producer: FutureProducer = cfg
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka producer: {e}"))?;
    if transactional_id.is_some() {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot initialise Kafka transactions (does the broker support them?): {e}"
                )
            })?;
    }
    Ok(producer)
}

/// How long a starting service waits for an unreachable broker before it gives up (and its
/// supervisor restarts it).
pub(super) const BROKER_WAIT: Duration = Duration::from_secs(120);

/// Calls `attempt` until it succeeds or `give_up_after` has passed, pausing `pause` after each
/// failure and logging it as `what`: for blocking calls to a broker that may be restarting.
pub(crate) fn retry_blocking<T>(
    give_up_after: Duration,
    pause: Duration,
    what: &str,
    mut attempt: impl FnMut() -> KafkaResult<T>,
) -> KafkaResult<T> {
    let started = std::time::Instant::now();
    loop {
        match attempt() {
            Err(e) if started.elapsed() < give_up_after => {
                tracing::warn!(error.message = %e, "{what}; retrying");
                std::thread::sleep(pause);
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_property_reaches_librdkafka_and_safeclock_keeps_its_own() {
        let mut settings = Settings::defaults().unwrap();
        settings.kafka.brokers = "kafka-1:9093".into();
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "safeclock"),
            ("sasl.password", "hunter2"),
            ("ssl.ca.location", "/etc/ssl/force-ca.pem"),
        ] {
            settings.kafka.properties.insert(k.into(), v.into());
        }
        settings
            .kafka
            .producer_properties
            .insert("acks".into(), "1".into());
        let cfg = client_config(&settings.kafka, &settings.kafka.producer_properties);
        assert_eq!(cfg.get("bootstrap.servers"), Some("kafka-1:9093"));
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cfg.get("ssl.ca.location"), Some("/etc/ssl/force-ca.pem"));
        assert_eq!(cfg.get("acks"), Some("1"), "operator overrides win");
    }

    #[test]
    fn tls_without_named_cas_uses_the_system_cas_not_the_vendored_openssl_directory() {
        let mut settings = Settings::defaults().unwrap();
        let cfg = client_config(&settings.kafka, &BTreeMap::new());
        assert_eq!(
            cfg.get("ssl.ca.location"),
            None,
            "plaintext: nothing to verify"
        );
        settings
            .kafka
            .properties
            .insert("security.protocol".into(), "sasl_ssl".into());
        let cfg = client_config(&settings.kafka, &BTreeMap::new());
        assert_eq!(cfg.get("ssl.ca.location"), Some("probe"));
        // librdkafka accepts it, and with it the client can be created.
        cfg.create_native_config().unwrap();
        let pem = BTreeMap::from([("ssl.ca.pem".to_string(), "-----BEGIN".to_string())]);
        let cfg = client_config(&settings.kafka, &pem);
        assert_eq!(cfg.get("ssl.ca.location"), None, "the operator's CAs win");
    }
}
