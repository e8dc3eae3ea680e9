//! `safeclock dlq`: look at the dead-letter topic, and replay records once what refused them is
//! fixed (a force added to `forces`, a source system corrected, a rule released).
//!
//! **Listing never shows a record's value unless asked** (`--show-payload`): a refused record is
//! exactly the kind that may carry personal data in the wrong field. What is shown is what the
//! refusing service wrote in the `safeclock.dlq.*` headers: reason, the human message (which
//! names the field, never its value), service, and where the record was read.
//!
//! **Listing escapes** every control character (terminal escape sequences, carriage returns,
//! C1 controls) and bidirectional-override character in what it prints, keys, headers and values
//! alike, as `\u{..}`: a dead letter's content comes from whoever wrote the refused record.
//!
//! **Replay** re-produces the original key, value and headers (without the `safeclock.dlq.*`
//! ones, plus `safeclock.dlq.replayed-from`) to the record's source topic, with the idempotent
//! `acks=all` producer, and waits for every acknowledgement. Consumers de-duplicate by event id,
//! so replaying a record that was in fact processed is harmless; a record still invalid simply
//! returns to the dead-letter topic. Replay does not delete anything from the dead-letter topic
//! (Kafka topics are append-only); the replayed-from header ties the two together.
//!
//! **Replay writes only to `referral-events`**, and only whole records. The target is the
//! letter's source topic, which safeclock's services write themselves (incoming `safeclock.dlq.*`
//! headers are stripped before theirs are added, and where a record carries several, the last is
//! theirs); a letter whose source is any other topic is refused before anything is produced:
//! state topics (`clock-state`, `escalation-state`, `exporter-state`) are never written by
//! anything but their service, and `sla-events` letters are not replayed either, because the
//! clock is the only writer of `sla-events`: a replay would put a record the clock did not
//! derive, carrying whatever the refused record said, straight in front of the escalator (pages)
//! and the force data platforms. An `sla-events` record the escalator or exporter refuses is a
//! clock defect or a foreign writer, to investigate (`--show-payload`), not to re-publish. A
//! letter that keeps only part of its record (a value, key or headers over the dead-letter
//! bounds) or has no source at all (an undeliverable notification, a refused output) is refused
//! too.

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
    /// The original value's length and SHA-256 when the letter keeps only a prefix of it.
    pub payload_truncated: Option<(String, String)>,
    /// Whether the letter keeps less than the whole original record (value, key or headers).
    pub partial: bool,
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
            payload_truncated: header(&message, dlq_headers::PAYLOAD_TRUNCATED).map(|_| {
                (
                    header(&message, dlq_headers::PAYLOAD_LENGTH).unwrap_or_default(),
                    header(&message, dlq_headers::PAYLOAD_SHA256).unwrap_or_default(),
                )
            }),
            partial: [
                dlq_headers::PAYLOAD_TRUNCATED,
                dlq_headers::KEY_TRUNCATED,
                dlq_headers::HEADERS_DROPPED,
            ]
            .iter()
            .any(|h| header(&message, h).is_some()),
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
            escape(&self.source_topic),
            self.source_partition.map_or("?".into(), |p| p.to_string()),
            self.source_offset.map_or("?".into(), |o| o.to_string())
        )
    }
}

/// The value of header `name`: the **last** one, since safeclock appends its own after the
/// original record's (and, since it strips incoming `safeclock.dlq.*` headers, a letter written
/// by this version has only its own).
fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// `text` with every control character (C0, DEL, C1: terminal escape sequences, carriage
/// returns, backspaces) and bidirectional-formatting character written as `\u{..}`, and `\` as
/// `\\`, so that printing it cannot drive the terminal or disguise what it shows.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// How long reading may go without a record once every partition's end is reached (records
/// appended meanwhile are read too).
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

/// Prints the selected dead letters ([`render`]).
pub fn print(letters: &[DeadLetter], show_payload: bool, json: bool) {
    print!("{}", render(letters, show_payload, json));
}

/// The listing of the selected dead letters, every text escaped ([`escape`]).
pub fn render(letters: &[DeadLetter], show_payload: bool, json: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let payload = |d: &DeadLetter| {
        escape(&String::from_utf8_lossy(
            d.message.payload().unwrap_or_default(),
        ))
    };
    if json {
        for d in letters {
            let mut v = serde_json::json!({
                "partition": d.partition,
                "offset": d.offset,
                "reason": escape(&d.reason),
                "error": escape(&d.error),
                "service": escape(&d.service),
                "sourceTopic": escape(&d.source_topic),
                "sourcePartition": d.source_partition,
                "sourceOffset": d.source_offset,
                "key": d.key.as_deref().map(escape),
            });
            if let Some((length, sha256)) = &d.payload_truncated {
                v["payloadLength"] = escape(length).into();
                v["payloadSha256"] = escape(sha256).into();
            }
            if show_payload {
                v["payload"] = payload(d).into();
            }
            let _ = writeln!(out, "{v}");
        }
        return out;
    }
    let _ = writeln!(
        out,
        "{:<10} {:<20} {:<10} {:<50} {:<24} error",
        "dlq", "reason", "service", "source", "key"
    );
    for d in letters {
        let _ = writeln!(
            out,
            "{:<10} {:<20} {:<10} {:<50} {:<24} {}",
            format!("{}@{}", d.partition, d.offset),
            escape(&d.reason),
            escape(&d.service),
            d.source(),
            d.key.as_deref().map_or_else(|| "-".to_string(), escape),
            escape(&d.error)
        );
        if let Some((length, sha256)) = &d.payload_truncated {
            let _ = writeln!(
                out,
                "           value cut to a prefix: {} bytes, sha256 {}",
                escape(length),
                escape(sha256)
            );
        }
        if show_payload {
            let _ = writeln!(out, "           payload: {}", payload(d));
        }
    }
    let _ = writeln!(out, "{} dead letter(s)", letters.len());
    out
}

/// Why `letter` cannot be replayed to `input` (the `referral-events` topic), if it cannot.
pub fn not_replayable(letter: &DeadLetter, input: &str) -> Option<String> {
    let at = format!("dead letter {}@{}", letter.partition, letter.offset);
    if letter.source_topic.is_empty() {
        return Some(format!(
            "{at} has no source record ({} {}): it was not read from a topic, so there is nothing to replay",
            dlq_headers::REASON,
            escape(&letter.reason)
        ));
    }
    if letter.source_topic != input {
        return Some(format!(
            "{at} was read from {}: only letters from {input} are replayed (state topics are written \
             by their service alone, and sla-events by the clock alone)",
            escape(&letter.source_topic)
        ));
    }
    if letter.partial {
        return Some(format!(
            "{at} keeps only part of its record (its value, key or headers were over the \
             dead-letter bounds): replaying it would write a different record"
        ));
    }
    None
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
/// Nothing is produced unless every selected letter can be replayed ([`not_replayable`]): only
/// whole records, and only to `referral-events`.
///
/// # Errors
/// When a letter cannot be replayed (each named, with why), or the broker does not acknowledge.
pub async fn replay(settings: &Settings, letters: &[DeadLetter]) -> anyhow::Result<usize> {
    let input = settings.topic(Topic::ReferralEvents);
    let refused: Vec<String> = letters
        .iter()
        .filter_map(|d| not_replayable(d, &input))
        .collect();
    if !refused.is_empty() {
        anyhow::bail!(
            "nothing replayed: {} of the {} selected dead letters cannot be replayed (narrow the \
             selection, e.g. --source-topic {input}):\n  {}",
            refused.len(),
            letters.len(),
            refused.join("\n  ")
        );
    }
    let producer = kafka::producer(settings)?;
    let distinct = one_per_source_record(letters);
    let mut deliveries = Vec::with_capacity(distinct.len());
    for d in &distinct {
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
        let mut record = FutureRecord::<[u8], [u8]>::to(&d.source_topic)
            .payload(d.message.payload().unwrap_or_default())
            .headers(headers);
        // The original key bytes (not its lossy text form).
        if let Some(k) = d.message.key() {
            record = record.key(k);
        }
        deliveries.push(kafka::try_enqueue(&producer, record).await?);
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
                let input = settings.topic(Topic::ReferralEvents);
                for why in selected.iter().filter_map(|d| not_replayable(d, &input)) {
                    println!("cannot be replayed: {why}");
                }
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

    fn sourced(topic: &str, extra: &[(&str, &str)]) -> DeadLetter {
        let mut headers = OwnedHeaders::new();
        for (k, v) in [
            (dlq_headers::REASON, "unknown_force"),
            (dlq_headers::SERVICE, "clock"),
            (dlq_headers::SOURCE_TOPIC, topic),
            (dlq_headers::SOURCE_PARTITION, "0"),
            (dlq_headers::SOURCE_OFFSET, "4"),
        ]
        .iter()
        .chain(extra)
        {
            headers = headers.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        DeadLetter::from_message(OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"R-1".to_vec()),
            "dlq".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            9,
            Some(headers),
        ))
    }

    #[test]
    fn only_whole_letters_from_referral_events_are_replayed() {
        let input = "safeclock.referral-events.v1";
        assert_eq!(not_replayable(&sourced(input, &[]), input), None);
        for other in [
            "safeclock.clock-state.v1",
            "safeclock.escalation-state.v1",
            "safeclock.exporter-state.v1",
            "safeclock.sla-events.v1",
            "safeclock.sla-outcomes.v1",
        ] {
            let why = not_replayable(&sourced(other, &[]), input).unwrap();
            assert!(why.contains("only letters from"), "{why}");
        }
        let cut = sourced(input, &[(dlq_headers::PAYLOAD_TRUNCATED, "true")]);
        assert!(not_replayable(&cut, input).unwrap().contains("only part"));
        let no_source = letter(3, "escalator", None);
        assert!(not_replayable(&no_source, input)
            .unwrap()
            .contains("no source record"));
    }

    #[test]
    fn the_last_header_of_a_name_is_the_one_read() {
        // A letter written before incoming safeclock.dlq.* headers were stripped: the forged
        // ones come first, safeclock's own last.
        let mut headers = OwnedHeaders::new();
        for (k, v) in [
            (dlq_headers::SOURCE_TOPIC, "safeclock.clock-state.v1"),
            (dlq_headers::REASON, "forged"),
            (dlq_headers::REASON, "invalid_json"),
            (dlq_headers::SOURCE_TOPIC, "safeclock.referral-events.v1"),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let d = DeadLetter::from_message(OwnedMessage::new(
            None,
            None,
            "dlq".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            1,
            Some(headers),
        ));
        assert_eq!(d.reason, "invalid_json");
        assert_eq!(d.source_topic, "safeclock.referral-events.v1");
    }

    #[test]
    fn control_and_bidi_characters_are_escaped() {
        assert_eq!(escape("R-1"), "R-1");
        assert_eq!(escape("Ré-1 ✓"), "Ré-1 ✓");
        assert_eq!(
            escape("\x1b[2J\x1b]0;owned\x07"),
            "\\u{1b}[2J\\u{1b}]0;owned\\u{7}"
        );
        assert_eq!(escape("a\rb\nc\td"), "a\\u{d}b\\u{a}c\\u{9}d");
        // C1 CSI, DEL, and a right-to-left override.
        assert_eq!(
            escape("\u{9b}31m\u{7f}\u{202e}"),
            "\\u{9b}31m\\u{7f}\\u{202e}"
        );
        // A backslash is doubled, so an escape in the output is never ambiguous.
        assert_eq!(escape("\\u{1b}"), "\\\\u{1b}");
    }
}
