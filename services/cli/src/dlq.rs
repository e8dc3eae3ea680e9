//! `safeclock dlq`: look at the dead-letter topic, and replay records once what refused them is
//! fixed (a force added to `forces`, a source system corrected, a rule released).
//!
//! **Listing never shows a record's value unless asked** (`--show-payload`): a refused record is
//! exactly the kind that may carry personal data in the wrong field. What is shown is what the
//! refusing service wrote in the `safeclock.dlq.*` headers: reason, the human message (which
//! names the field, never its value), service, and where the record was read.
//!
//! **Replay** re-produces the original key, value and headers (without the `safeclock.dlq.*`
//! ones, plus `safeclock.dlq.replayed-from`) to the record's source topic, with the idempotent
//! `acks=all` producer, and waits for every acknowledgement. Consumers de-duplicate by event id,
//! so replaying a record that was in fact processed is harmless; a record still invalid simply
//! returns to the dead-letter topic. Replay does not delete anything from the dead-letter topic
//! (Kafka topics are append-only); the replayed-from header ties the two together.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use safeclock_common::config::Settings;
use safeclock_common::kafka::{self, dlq_headers, Topic};

/// Header added to a replayed record: `dead-letter partition/offset` it came from.
pub const REPLAYED_FROM: &str = "safeclock.dlq.replayed-from";

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters: reason, service, where each was read, key. Values are not shown.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Also print each record's value (it may hold personal data: handle the output so).
        #[arg(long)]
        show_payload: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-produce selected dead letters to their source topic.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Only these source positions, `PARTITION:OFFSET` of the source topic (repeatable).
        #[arg(long = "source", value_name = "PARTITION:OFFSET")]
        sources: Vec<String>,
        /// Replay every dead letter the filter selects (required when neither --source nor
        /// --reason narrows the selection).
        #[arg(long)]
        all: bool,
        /// Show what would be replayed without producing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters a command looks at.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only this reason (`invalid_json`, `unknown_force`, ...).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only records refused by this service (`clock`, `exporter`, `escalator`, `intake`).
    #[arg(long)]
    pub service: Option<String>,
    /// Only records read from this topic (full name, with the prefix).
    #[arg(long)]
    pub source_topic: Option<String>,
}

/// One record of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Where it is on the dead-letter topic.
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub error: String,
    pub service: String,
    pub source_topic: String,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub key: Option<String>,
    pub message: OwnedMessage,
}

impl DeadLetter {
    fn from_message(message: OwnedMessage) -> Self {
        let h = |name: &str| header(&message, name).unwrap_or_default();
        Self {
            partition: message.partition(),
            offset: message.offset(),
            reason: h(dlq_headers::REASON),
            error: h(dlq_headers::ERROR),
            service: h(dlq_headers::SERVICE),
            source_topic: h(dlq_headers::SOURCE_TOPIC),
            source_partition: h(dlq_headers::SOURCE_PARTITION).parse().ok(),
            source_offset: h(dlq_headers::SOURCE_OFFSET).parse().ok(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            message,
        }
    }

    fn matches(&self, f: &Filter) -> bool {
        f.reason.as_ref().is_none_or(|r| *r == self.reason)
            && f.service.as_ref().is_none_or(|s| *s == self.service)
            && f.source_topic
                .as_ref()
                .is_none_or(|t| *t == self.source_topic)
    }

    fn source(&self) -> String {
        format!(
            "{}[{}]@{}",
            self.source_topic,
            self.source_partition.map_or("?".into(), |p| p.to_string()),
            self.source_offset.map_or("?".into(), |o| o.to_string())
        )
    }
}

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// How long reading may go without a record once every partition's end is reached (tansu 0.6
/// reports watermarks in batches, so the watermark alone may be early).
const QUIET: Duration = Duration::from_millis(500);
/// How long reading may go without any record at all before it gives up.
const STALL: Duration = Duration::from_secs(10);

/// Every record of the dead-letter topic that `filter` selects, in partition and offset order.
///
/// # Errors
/// When the topic cannot be read.
pub fn read(settings: &Settings, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
    let topic = settings.topic(Topic::DeadLetter);
    let mut cfg = kafka::client_config(&settings.kafka, &settings.kafka.consumer_properties);
    cfg.set("group.id", format!("safeclock-dlq-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50");
    let consumer: BaseConsumer = cfg
        .create()
        .context("cannot create a consumer for the dead-letter topic")?;
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(30))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut remaining = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, *p, Duration::from_secs(30))
            .with_context(|| format!("cannot read the watermarks of {topic}[{p}]"))?;
        if high > low {
            remaining.insert(*p, high - 1);
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let mut last = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                if remaining
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() >= *end)
                {
                    remaining.remove(&m.partition());
                }
                let d = DeadLetter::from_message(m.detach());
                if d.matches(filter) {
                    out.push(d);
                }
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("cannot read {topic}")),
            None => {
                let quiet = last.elapsed();
                if (remaining.is_empty() && quiet >= QUIET) || quiet >= STALL {
                    break;
                }
            }
        }
    }
    out.sort_by_key(|d| (d.partition, d.offset));
    Ok(out)
}

/// Prints the selected dead letters.
pub fn print(letters: &[DeadLetter], show_payload: bool, json: bool) {
    if json {
        for d in letters {
            let mut v = serde_json::json!({
                "partition": d.partition,
                "offset": d.offset,
                "reason": d.reason,
                "error": d.error,
                "service": d.service,
                "sourceTopic": d.source_topic,
                "sourcePartition": d.source_partition,
                "sourceOffset": d.source_offset,
                "key": d.key,
            });
            if show_payload {
                v["payload"] = String::from_utf8_lossy(d.message.payload().unwrap_or_default())
                    .into_owned()
                    .into();
            }
            println!("{v}");
        }
        return;
    }
    println!(
        "{:<10} {:<20} {:<10} {:<50} {:<24} error",
        "dlq", "reason", "service", "source", "key"
    );
    for d in letters {
        println!(
            "{:<10} {:<20} {:<10} {:<50} {:<24} {}",
            format!("{}@{}", d.partition, d.offset),
            d.reason,
            d.service,
            d.source(),
            d.key.as_deref().unwrap_or("-"),
            d.error
        );
        if show_payload {
            println!(
                "           payload: {}",
                String::from_utf8_lossy(d.message.payload().unwrap_or_default())
            );
        }
    }
    println!("{} dead letter(s)", letters.len());
}

/// Parses `PARTITION:OFFSET`.
fn parse_source(s: &str) -> anyhow::Result<(i32, i64)> {
    let (p, o) = s
        .split_once(':')
        .with_context(|| format!("--source {s:?} is not PARTITION:OFFSET"))?;
    Ok((
        p.trim()
            .parse()
            .with_context(|| format!("--source {s:?}: partition is not a number"))?,
        o.trim()
            .parse()
            .with_context(|| format!("--source {s:?}: offset is not a number"))?,
    ))
}

/// The letters that stand for distinct source records, first of each. A record on a topic two
/// services read (referral events: the clock and the exporter) is refused by each of them, and
/// a service that re-reads it after a crash refuses it again; replaying every copy would put
/// the record back several times. Letters without a whole source position are all kept.
pub fn one_per_source_record(letters: &[DeadLetter]) -> Vec<&DeadLetter> {
    let mut seen = std::collections::HashSet::new();
    letters
        .iter()
        .filter(|d| match (d.source_partition, d.source_offset) {
            (Some(p), Some(o)) if !d.source_topic.is_empty() => {
                seen.insert((d.source_topic.as_str(), p, o))
            }
            _ => true,
        })
        .collect()
}

/// Re-produces the source records of `letters` to their source topics, each once however many
/// services refused it ([`one_per_source_record`]), and waits for every acknowledgement;
/// returns how many records were replayed.
///
/// # Errors
/// When a record has no source topic, or the broker does not acknowledge.
pub async fn replay(settings: &Settings, letters: &[DeadLetter]) -> anyhow::Result<usize> {
    let producer = kafka::producer(settings)?;
    let distinct = one_per_source_record(letters);
    let mut deliveries = Vec::with_capacity(distinct.len());
    for d in &distinct {
        anyhow::ensure!(
            !d.source_topic.is_empty(),
            "dead letter {}@{} has no {} header: cannot tell where to replay it",
            d.partition,
            d.offset,
            dlq_headers::SOURCE_TOPIC
        );
        let mut headers = OwnedHeaders::new();
        if let Some(original) = d.message.headers() {
            for h in original.iter() {
                if !h.key.starts_with("safeclock.dlq.") {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        let from = format!("{}/{}", d.partition, d.offset);
        headers = headers.insert(Header {
            key: REPLAYED_FROM,
            value: Some(from.as_str()),
        });
        let mut record = FutureRecord::<str, [u8]>::to(&d.source_topic)
            .payload(d.message.payload().unwrap_or_default())
            .headers(headers);
        if let Some(k) = d.key.as_deref() {
            record = record.key(k);
        }
        deliveries.push(kafka::enqueue(&producer, record).await?);
    }
    kafka::await_deliveries(deliveries).await?;
    Ok(distinct.len())
}

/// Runs a `safeclock dlq` command.
///
/// # Errors
/// When the topic cannot be read or written, or the selection is ambiguous.
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            filter,
            show_payload,
            json,
        } => {
            let s = settings.clone();
            let letters = tokio::task::spawn_blocking(move || read(&s, &filter)).await??;
            print(&letters, show_payload, json);
            Ok(())
        }
        DlqCommand::Replay {
            filter,
            sources,
            all,
            dry_run,
        } => {
            anyhow::ensure!(
                all || !sources.is_empty() || filter.reason.is_some(),
                "say what to replay: --source PARTITION:OFFSET, --reason REASON, or --all"
            );
            let wanted = sources
                .iter()
                .map(|s| parse_source(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let s = settings.clone();
            let letters = tokio::task::spawn_blocking(move || read(&s, &filter)).await??;
            let selected: Vec<DeadLetter> = letters
                .into_iter()
                .filter(|d| {
                    wanted.is_empty()
                        || wanted.iter().any(|(p, o)| {
                            d.source_partition == Some(*p) && d.source_offset == Some(*o)
                        })
                })
                .collect();
            print(&selected, false, false);
            let distinct = one_per_source_record(&selected).len();
            if distinct < selected.len() {
                println!(
                    "{} dead letters are {distinct} source record(s): each is replayed once",
                    selected.len()
                );
            }
            if dry_run {
                println!("dry run: nothing replayed");
                return Ok(());
            }
            let n = replay(settings, &selected).await?;
            println!("replayed {n} record(s) to their source topics");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_partition_colon_offset() {
        assert_eq!(parse_source("2:17").unwrap(), (2, 17));
        assert_eq!(parse_source(" 0 : 5 ").unwrap(), (0, 5));
        for bad in ["2", "a:1", "1:b", ""] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains("--source"), "{err}");
        }
    }

    #[test]
    fn filters_match_reason_service_and_topic() {
        let m = OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"R-1".to_vec()),
            "dlq".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            3,
            Some(
                OwnedHeaders::new()
                    .insert(Header {
                        key: dlq_headers::REASON,
                        value: Some("unknown_force"),
                    })
                    .insert(Header {
                        key: dlq_headers::SERVICE,
                        value: Some("clock"),
                    })
                    .insert(Header {
                        key: dlq_headers::SOURCE_TOPIC,
                        value: Some("in"),
                    })
                    .insert(Header {
                        key: dlq_headers::SOURCE_OFFSET,
                        value: Some("9"),
                    }),
            ),
        );
        let d = DeadLetter::from_message(m);
        assert_eq!((d.source_offset, d.source_partition), (Some(9), None));
        assert!(d.matches(&Filter::default()));
        let f = |reason: &str, service: &str| Filter {
            reason: Some(reason.into()),
            service: Some(service.into()),
            source_topic: Some("in".into()),
        };
        assert!(d.matches(&f("unknown_force", "clock")));
        assert!(!d.matches(&f("invalid_json", "clock")));
        assert!(!d.matches(&f("unknown_force", "exporter")));
    }

    fn letter(offset: i64, service: &str, source: Option<(&str, i32, i64)>) -> DeadLetter {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: dlq_headers::SERVICE,
            value: Some(service),
        });
        if let Some((topic, partition, offset)) = source {
            headers = headers
                .insert(Header {
                    key: dlq_headers::SOURCE_TOPIC,
                    value: Some(topic),
                })
                .insert(Header {
                    key: dlq_headers::SOURCE_PARTITION,
                    value: Some(&partition.to_string()),
                })
                .insert(Header {
                    key: dlq_headers::SOURCE_OFFSET,
                    value: Some(&offset.to_string()),
                });
        }
        DeadLetter::from_message(OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "dlq".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            Some(headers),
        ))
    }

    #[test]
    fn a_record_refused_by_several_services_is_replayed_once() {
        let letters = [
            letter(0, "clock", Some(("in", 1, 7))),
            letter(1, "exporter", Some(("in", 1, 7))),
            letter(2, "clock", Some(("in", 1, 7))), // refused again after a crash
            letter(3, "clock", Some(("in", 2, 7))),
            letter(4, "clock", Some(("other", 1, 7))),
            letter(5, "escalator", None), // an undeliverable notification: no source
            letter(6, "escalator", None),
        ];
        let offsets: Vec<i64> = one_per_source_record(&letters)
            .iter()
            .map(|d| d.offset)
            .collect();
        assert_eq!(offsets, [0, 3, 4, 5, 6]);
    }
}
