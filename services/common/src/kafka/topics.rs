//! The topics safeclock reads and writes, creating them, and checking that a changelog is
//! partitioned like its input.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use super::client::{client_config, retry_blocking, BROKER_WAIT};
use crate::config::Settings;

/// The topics safeclock reads and writes. Names carry a version suffix so a breaking schema
/// change gets a new topic instead of surprising existing consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Referral lifecycle events from force systems and intake. Key: referral id.
    ReferralEvents,
    /// Clock transitions (started, warning, breached, met, ...). Key: referral id.
    SlaEvents,
    /// Audit of every escalation attempt, acknowledgement and resolution. Key: escalation id.
    EscalationLog,
    /// Records any consumer refused, with the reason in headers. Key: the original key.
    DeadLetter,
    /// One record per clock with its latest outcome (compacted). Key: referral/rule/clock.
    SlaOutcomes,
    /// The clock's durable state (compacted; binary protobuf). Key: referral id. Partitioned
    /// like `ReferralEvents`.
    ClockState,
    /// The escalator's durable state: open escalations and their pending notifications
    /// (compacted; binary protobuf). Key: escalation id. Partitioned like `SlaEvents`.
    EscalationState,
    /// The exporter's totals and the input offsets they reflect (compacted; JSON). Key: the
    /// exporter's consumer group.
    ExporterState,
    /// Requests to erase a referral, each naming it by a keyed hash (JSON). Key: erasure id.
    /// Read whole by every clock and escalator.
    Erasures,
}

impl Topic {
    /// Every topic, for creating them at start.
    pub const ALL: [Topic; 9] = [
        Topic::ReferralEvents,
        Topic::SlaEvents,
        Topic::SlaOutcomes,
        Topic::EscalationLog,
        Topic::DeadLetter,
        Topic::ClockState,
        Topic::EscalationState,
        Topic::ExporterState,
        Topic::Erasures,
    ];

    /// Whether only the latest record per key matters (the topic is compacted).
    pub fn compacted(self) -> bool {
        matches!(
            self,
            Topic::ClockState | Topic::SlaOutcomes | Topic::EscalationState | Topic::ExporterState
        )
    }

    /// The name without the deployment's prefix.
    pub fn base_name(self) -> &'static str {
        match self {
            Topic::ReferralEvents => "referral-events.v1",
            Topic::SlaEvents => "sla-events.v1",
            Topic::EscalationLog => "escalation-log.v1",
            Topic::DeadLetter => "dead-letter.v1",
            Topic::ClockState => "clock-state.v1",
            Topic::SlaOutcomes => "sla-outcomes.v1",
            Topic::EscalationState => "escalation-state.v1",
            Topic::ExporterState => "exporter-state.v1",
            Topic::Erasures => "erasures.v1",
        }
    }
}

/// Creates any of `topics` that do not exist yet.
///
/// # Errors
/// When the admin request fails for a reason other than "already exists".
pub async fn ensure_topics(settings: &Settings, topics: &[Topic]) -> anyhow::Result<()> {
    let admin_client = || -> anyhow::Result<AdminClient<DefaultClientContext>> {
        client_config(&settings.kafka, &BTreeMap::new())
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create Kafka admin client: {e}"))
    };
    let mut admin = admin_client()?;
    let names: Vec<String> = topics.iter().map(|t| settings.topic(*t)).collect();
    let configs: Vec<BTreeMap<String, String>> = topics
        .iter()
        .map(|t| topic_configs_with_retention(settings, *t))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .zip(&configs)
        .map(|(n, configs)| {
            let mut topic = NewTopic::new(
                n,
                settings.kafka.partitions,
                TopicReplication::Fixed(settings.kafka.replication_factor),
            );
            for (k, v) in configs {
                topic = topic.set(k, v);
            }
            topic
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // A service may start while the broker is restarting: wait for it (not ready meanwhile).
    let started = std::time::Instant::now();
    let results = loop {
        match admin.create_topics(&new_topics, &opts).await {
            Ok(r) => break r,
            Err(e) if started.elapsed() < BROKER_WAIT => {
                tracing::warn!(error.message = %e, "cannot reach the broker to create topics yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                // A new client, as in `check_copartitioned`: one cut off while connecting may
                // stay cut off.
                admin = admin_client()?;
            }
            Err(e) => anyhow::bail!("cannot create topics {names:?}: {e}"),
        }
    };
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}

/// The configs `topic` is created with: `kafka.topic_configs`, then for a compacted topic
/// `kafka.compacted_topic_configs` and `cleanup.policy=compact` (unless those name a policy that
/// includes it, e.g. `compact,delete`).
pub fn topic_configs(settings: &Settings, topic: Topic) -> BTreeMap<&str, &str> {
    let mut configs: BTreeMap<&str, &str> = settings
        .kafka
        .topic_configs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if topic.compacted() {
        configs.remove("cleanup.policy");
        configs.extend(
            settings
                .kafka
                .compacted_topic_configs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        configs.entry("cleanup.policy").or_insert("compact");
    }
    configs
}

/// [`topic_configs`] as owned strings, with the topic's own retention (`kafka.retention`) as its
/// `retention.ms` unless it is compacted.
pub fn topic_configs_with_retention(settings: &Settings, topic: Topic) -> BTreeMap<String, String> {
    let mut configs: BTreeMap<String, String> = topic_configs(settings, topic)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(days) = settings.kafka.retention.days(topic) {
        let ms = u64::from(days) * 86_400_000;
        configs.insert("retention.ms".into(), ms.to_string());
    }
    configs
}

/// Checks that `changelog` has at least as many partitions as `input`: a service that keeps
/// state per input partition writes it to the same partition number of its changelog.
///
/// # Errors
/// When the topics cannot be described or the changelog has too few partitions.
pub async fn check_copartitioned(
    settings: &Settings,
    input: Topic,
    changelog: Topic,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let count = |topic: &str| -> anyhow::Result<usize> {
            // The broker may be restarting: wait for it (the service is not ready meanwhile),
            // with a new client at each attempt. A client whose first connection the broker's
            // restart cut did not always connect again: the fault suite once saw a clock fail
            // this lookup for two minutes while every other client had reconnected.
            let md = retry_blocking(
                BROKER_WAIT,
                Duration::from_secs(1),
                &format!("cannot describe topic {topic} yet"),
                || {
                    let client: BaseConsumer =
                        client_config(&settings.kafka, &settings.kafka.consumer_properties)
                            .create()?;
                    client.fetch_metadata(Some(topic), Duration::from_secs(10))
                },
            )
            .with_context(|| format!("cannot describe topic {topic}"))?;
            Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
        };
        let input = settings.topic(input);
        let changelog = settings.topic(changelog);
        let (n_in, n_state) = (count(&input)?, count(&changelog)?);
        anyhow::ensure!(
            n_state >= n_in,
            "the changelog {changelog} has {n_state} partitions but {input} has {n_in}: create \
             {changelog} (compacted) with at least {n_in} partitions"
        );
        Ok(())
    })
    .await
    .context("metadata task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacted_topics_are_created_compacted_with_their_configs() {
        let mut settings = Settings::defaults().unwrap();
        settings
            .kafka
            .topic_configs
            .insert("retention.ms".into(), "2592000000".into());
        settings
            .kafka
            .topic_configs
            .insert("cleanup.policy".into(), "delete".into());
        let state = topic_configs(&settings, Topic::ClockState);
        assert_eq!(state.get("cleanup.policy"), Some(&"compact"));
        assert_eq!(state.get("segment.ms"), Some(&"21600000"));
        assert_eq!(state.get("delete.retention.ms"), Some(&"86400000"));
        assert_eq!(state.get("retention.ms"), Some(&"2592000000"));
        let events = topic_configs(&settings, Topic::SlaEvents);
        assert_eq!(events.get("cleanup.policy"), Some(&"delete"));
        assert_eq!(events.get("segment.ms"), None);
        // Each topic that is not compacted gets its own retention, over the shared one.
        for (topic, days) in [
            (Topic::ReferralEvents, 400u64),
            (Topic::SlaEvents, 400),
            (Topic::EscalationLog, 2190),
            (Topic::DeadLetter, 30),
        ] {
            let configs = topic_configs_with_retention(&settings, topic);
            assert_eq!(
                configs.get("retention.ms"),
                Some(&(days * 86_400_000).to_string()),
                "{topic:?}"
            );
        }
        assert_eq!(
            topic_configs_with_retention(&settings, Topic::ClockState).get("retention.ms"),
            Some(&"2592000000".to_string()),
            "a compacted topic keeps the shared configs"
        );
        settings
            .kafka
            .compacted_topic_configs
            .insert("cleanup.policy".into(), "compact,delete".into());
        assert_eq!(
            topic_configs(&settings, Topic::SlaOutcomes).get("cleanup.policy"),
            Some(&"compact,delete")
        );
    }

    #[test]
    fn topic_names_carry_the_prefix_and_a_version() {
        let settings = Settings::defaults().unwrap();
        assert_eq!(
            settings.topic(Topic::ReferralEvents),
            "safeclock.referral-events.v1"
        );
        assert_eq!(
            settings.topic(Topic::DeadLetter),
            "safeclock.dead-letter.v1"
        );
    }
}
