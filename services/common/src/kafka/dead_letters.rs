//! Writing refused records to the dead-letter topic.
//!
//! A dead letter is the refused record's key, value and headers plus `safeclock.dlq.*` headers
//! saying why, who refused it and where it was read. Two rules make it trustworthy and make sure
//! it can always be written:
//!
//! - **Only safeclock writes `safeclock.dlq.*` headers.** Any the original record carries are
//!   stripped (and counted in `safeclock.dlq.headers.stripped`) before ours are added, so a
//!   source system cannot choose the reason, the error text or the topic `safeclock dlq replay`
//!   writes to.
//! - **A dead letter is bounded** ([`LetterBounds`], `[dead_letters]`), well under the producer's
//!   `message.max.bytes`, whatever the refused record was (up to the broker's own limit). A value
//!   over `max_payload_bytes` is replaced by its first `prefix_bytes`, with its length and SHA-256
//!   (`safeclock.dlq.payload.*`); a key over `prefix_bytes` likewise (`safeclock.dlq.key.*`); the
//!   original headers are kept in order up to `max_header_bytes` and the rest counted
//!   (`safeclock.dlq.headers.dropped`). Otherwise a record too large to copy would make its own
//!   dead letter fail, and the partition would stop at it.

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use sha2::{Digest, Sha256};

use super::delivery::{
    deliver, try_enqueue, BrokerWait, Failure, Interrupted, Output, ProduceError, Refusal,
};
use super::topics::Topic;
use crate::config::{DeadLetterSettings, Settings};
use crate::event::Rejection;
use crate::metrics::ConsumerMetrics;

/// Header names written on dead-letter records.
pub mod dlq_headers {
    /// Every header safeclock writes on a dead letter starts with this; incoming ones are
    /// stripped.
    pub const PREFIX: &str = "safeclock.dlq.";
    pub const REASON: &str = "safeclock.dlq.reason";
    pub const ERROR: &str = "safeclock.dlq.error";
    pub const SERVICE: &str = "safeclock.dlq.service";
    pub const SOURCE_TOPIC: &str = "safeclock.dlq.source.topic";
    pub const SOURCE_PARTITION: &str = "safeclock.dlq.source.partition";
    pub const SOURCE_OFFSET: &str = "safeclock.dlq.source.offset";
    /// The topic a refused output was meant for (reasons `output_too_large`, `output_refused`).
    pub const OUTPUT_TOPIC: &str = "safeclock.dlq.output.topic";
    /// `true` when the value kept is only a prefix of the original.
    pub const PAYLOAD_TRUNCATED: &str = "safeclock.dlq.payload.truncated";
    /// The original value's length in bytes (when truncated).
    pub const PAYLOAD_LENGTH: &str = "safeclock.dlq.payload.length";
    /// The original value's SHA-256, lower-case hex (when truncated).
    pub const PAYLOAD_SHA256: &str = "safeclock.dlq.payload.sha256";
    /// `true` when the key kept is only a prefix of the original.
    pub const KEY_TRUNCATED: &str = "safeclock.dlq.key.truncated";
    pub const KEY_LENGTH: &str = "safeclock.dlq.key.length";
    pub const KEY_SHA256: &str = "safeclock.dlq.key.sha256";
    /// How many of the original headers did not fit and were left out.
    pub const HEADERS_DROPPED: &str = "safeclock.dlq.headers.dropped";
    /// How many `safeclock.dlq.*` headers the original carried (removed: only safeclock writes
    /// them).
    pub const HEADERS_STRIPPED: &str = "safeclock.dlq.headers.stripped";
}

/// Reason codes for a valid input record whose effects cannot be written.
pub mod output_reasons {
    /// The broker refuses what the record causes as too large.
    pub const TOO_LARGE: &str = "output_too_large";
    /// The broker refuses what the record causes for another reason that would repeat forever.
    pub const REFUSED: &str = "output_refused";
}

/// The reason code for an output refused with `error`.
pub fn output_reason(error: &ProduceError) -> &'static str {
    if error.is_too_large() {
        output_reasons::TOO_LARGE
    } else {
        output_reasons::REFUSED
    }
}

/// How much of a refused record a dead letter carries (`[dead_letters]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LetterBounds {
    pub max_payload_bytes: usize,
    pub prefix_bytes: usize,
    pub max_header_bytes: usize,
}

impl From<&DeadLetterSettings> for LetterBounds {
    fn from(s: &DeadLetterSettings) -> Self {
        Self {
            max_payload_bytes: s.max_payload_bytes,
            prefix_bytes: s.prefix_bytes,
            max_header_bytes: s.max_header_bytes,
        }
    }
}

/// The longest error text a dead letter carries (ours are short; this bounds the unexpected).
const MAX_ERROR_CHARS: usize = 1024;

/// A record as read (or as this service meant to write it), borrowed.
#[derive(Debug, Clone, Default)]
pub struct Original<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

impl<'a> Original<'a> {
    /// The key, value and headers of `message`.
    pub fn of<M: Message>(message: &'a M) -> Self {
        let headers = message
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default();
        Self {
            key: message.key(),
            payload: message.payload(),
            headers,
        }
    }

    /// The key and value of `output` (its headers are safeclock's own and not carried over).
    pub fn of_output(output: &'a Output) -> Self {
        Self {
            key: output.key.as_deref(),
            payload: output.payload.as_deref(),
            headers: Vec::new(),
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `bytes` if at most `max` long, else its first `prefix` bytes and the original's length and
/// SHA-256.
fn bounded(bytes: &[u8], max: usize, prefix: usize) -> (&[u8], Option<(usize, String)>) {
    if bytes.len() <= max {
        (bytes, None)
    } else {
        (
            &bytes[..prefix.min(bytes.len())],
            Some((bytes.len(), sha256_hex(bytes))),
        )
    }
}

/// `text` cut to at most `max` characters.
fn clip(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Builds a dead letter for the `dlq_topic` from `original`, with `ours` (`safeclock.dlq.*`
/// headers: reason, error, service, source, ...) added after the original's headers: every
/// `safeclock.dlq.*` header of the original stripped, the value, key and headers bounded (see the
/// module doc).
pub fn build_letter(
    bounds: LetterBounds,
    dlq_topic: &str,
    original: &Original<'_>,
    ours: &[(&str, &str)],
) -> Output {
    let mut headers = OwnedHeaders::new();
    let (mut kept_bytes, mut stripped, mut dropped) = (0usize, 0usize, 0usize);
    for (key, value) in &original.headers {
        if key
            .get(..dlq_headers::PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(dlq_headers::PREFIX))
        {
            stripped += 1;
            continue;
        }
        let size = key.len() + value.map_or(0, <[u8]>::len);
        if dropped > 0 || kept_bytes + size > bounds.max_header_bytes {
            dropped += 1;
            continue;
        }
        kept_bytes += size;
        headers = headers.insert(Header { key, value: *value });
    }
    let mut extra: Vec<(&str, String)> = Vec::new();
    let payload = original.payload.map(|p| {
        let (kept, cut) = bounded(p, bounds.max_payload_bytes, bounds.prefix_bytes);
        if let Some((len, hash)) = cut {
            extra.push((dlq_headers::PAYLOAD_TRUNCATED, "true".into()));
            extra.push((dlq_headers::PAYLOAD_LENGTH, len.to_string()));
            extra.push((dlq_headers::PAYLOAD_SHA256, hash));
        }
        kept.to_vec()
    });
    let key = original.key.map(|k| {
        let (kept, cut) = bounded(k, bounds.prefix_bytes, bounds.prefix_bytes);
        if let Some((len, hash)) = cut {
            extra.push((dlq_headers::KEY_TRUNCATED, "true".into()));
            extra.push((dlq_headers::KEY_LENGTH, len.to_string()));
            extra.push((dlq_headers::KEY_SHA256, hash));
        }
        kept.to_vec()
    });
    if dropped > 0 {
        extra.push((dlq_headers::HEADERS_DROPPED, dropped.to_string()));
    }
    if stripped > 0 {
        extra.push((dlq_headers::HEADERS_STRIPPED, stripped.to_string()));
    }
    for (name, value) in ours {
        let value = if *name == dlq_headers::ERROR {
            clip(value, MAX_ERROR_CHARS)
        } else {
            value
        };
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    for (name, value) in &extra {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_str()),
        });
    }
    Output {
        topic: dlq_topic.to_string(),
        partition: None,
        key,
        payload,
        headers: Some(headers),
    }
}

/// Writes refused records to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    service: &'static str,
    metrics: ConsumerMetrics,
    bounds: LetterBounds,
}

impl DeadLetters {
    pub fn new(
        producer: FutureProducer,
        settings: &Settings,
        service: &'static str,
        metrics: ConsumerMetrics,
    ) -> Self {
        Self {
            producer,
            topic: settings.topic(Topic::DeadLetter),
            service,
            metrics,
            bounds: LetterBounds::from(&settings.dead_letters),
        }
    }

    /// The dead letter for input `message`, refused with reason code `reason` and the human
    /// message `error`: the original key, value and headers (bounded, `safeclock.dlq.*` stripped)
    /// plus the reason, the service and where it was read. Counts it (invalid records by reason,
    /// dead letters) and logs it; the caller writes it.
    pub fn letter_for(&self, message: &impl Message, reason: &str, error: &str) -> Output {
        self.input_letter(message, reason, error, &[])
    }

    /// [`DeadLetters::letter_for`] a record refused as invalid.
    pub fn letter(&self, message: &impl Message, rejection: &Rejection) -> Output {
        self.letter_for(message, rejection.reason(), &rejection.to_string())
    }

    /// [`DeadLetters::letter_for`] a valid record whose effects the broker refuses for good
    /// (`error`, for an output to `error.topic`): reason `output_too_large` or `output_refused`.
    pub fn letter_for_refused_output(
        &self,
        message: &impl Message,
        error: &ProduceError,
        detail: &str,
    ) -> Output {
        let reason = output_reason(error);
        let text = format!(
            "what this record causes cannot be written to {}: {detail} ({})",
            error.topic, error.source
        );
        self.metrics
            .outputs_refused
            .with_label_values(&[self.service, reason])
            .inc();
        self.input_letter(
            message,
            reason,
            &text,
            &[(dlq_headers::OUTPUT_TOPIC, error.topic.as_str())],
        )
    }

    /// The dead letter of `message`, a record of a referral that was erased (reason `erased`):
    /// where it was read and why it was refused, but **neither its key, value nor headers**, so
    /// that refusing it does not write the referral back. Replay cannot re-publish it.
    pub fn letter_for_erased(&self, message: &impl Message) -> Output {
        self.letter_with(
            message,
            Original::default(),
            crate::erasure::ERASED,
            "this record's referral was erased; its content is not kept",
            &[],
        )
    }

    fn input_letter(
        &self,
        message: &impl Message,
        reason: &str,
        error: &str,
        more: &[(&str, &str)],
    ) -> Output {
        self.letter_with(message, Original::of(message), reason, error, more)
    }

    fn letter_with(
        &self,
        message: &impl Message,
        original: Original<'_>,
        reason: &str,
        error: &str,
        more: &[(&str, &str)],
    ) -> Output {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let mut ours = vec![
            (dlq_headers::REASON, reason),
            (dlq_headers::ERROR, error),
            (dlq_headers::SERVICE, self.service),
            (dlq_headers::SOURCE_TOPIC, message.topic()),
            (dlq_headers::SOURCE_PARTITION, partition.as_str()),
            (dlq_headers::SOURCE_OFFSET, offset.as_str()),
        ];
        ours.extend_from_slice(more);
        tracing::warn!(
            service = self.service,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason,
            error.message = error,
            "record sent to the dead-letter topic"
        );
        self.metrics
            .invalid
            .with_label_values(&[self.service, reason])
            .inc();
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        build_letter(self.bounds, &self.topic, &original, &ours)
    }

    /// The dead letter for a record this service produced itself and the broker refuses for good
    /// (`error`): its key and value (bounded), the reason (`output_too_large` or
    /// `output_refused`) and the topic it was meant for. There is no source record (a state
    /// record sums up many), so there are no source headers and it cannot be replayed.
    pub fn letter_for_output(&self, output: &Output, error: &ProduceError) -> Output {
        let reason = output_reason(error);
        let text = error.to_string();
        tracing::error!(
            service = self.service,
            topic = output.topic,
            bytes = output.size(),
            reason,
            error.message = %error,
            "a record the broker refuses for good sent to the dead-letter topic instead"
        );
        self.metrics
            .outputs_refused
            .with_label_values(&[self.service, reason])
            .inc();
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        build_letter(
            self.bounds,
            &self.topic,
            &Original::of_output(output),
            &[
                (dlq_headers::REASON, reason),
                (dlq_headers::ERROR, &text),
                (dlq_headers::SERVICE, self.service),
                (dlq_headers::OUTPUT_TOPIC, output.topic.as_str()),
            ],
        )
    }

    /// Enqueues the dead letter of `message` refused as invalid ([`DeadLetters::letter`]) and
    /// returns its delivery future; the source offset may be stored once it resolves.
    ///
    /// # Errors
    /// When the record cannot be enqueued (a [`ProduceError`] inside).
    pub async fn send(
        &self,
        message: &impl Message,
        rejection: &Rejection,
    ) -> anyhow::Result<DeliveryFuture> {
        let letter = self.letter(message, rejection);
        self.enqueue(&letter).await
    }

    async fn enqueue(&self, letter: &Output) -> anyhow::Result<DeliveryFuture> {
        let mut record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&letter.topic);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &letter.payload {
            record = record.payload(v.as_slice());
        }
        if let Some(h) = &letter.headers {
            record = record.headers(h.clone());
        }
        Ok(try_enqueue(&self.producer, record).await?)
    }

    /// The dead letter of a record this service produced itself but could not deliver (e.g. a
    /// notification whose retry budget is spent): `payload` under `key` (bounded), with the
    /// reason headers. There is no source record, so the source headers are omitted.
    pub fn undeliverable(&self, key: &str, payload: &[u8], reason: &str, error: &str) -> Output {
        tracing::warn!(
            service = self.service,
            reason,
            error.message = error,
            "undeliverable record sent to the dead-letter topic"
        );
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        build_letter(
            self.bounds,
            &self.topic,
            &Original {
                key: Some(key.as_bytes()),
                payload: Some(payload),
                headers: Vec::new(),
            },
            &[
                (dlq_headers::REASON, reason),
                (dlq_headers::ERROR, error),
                (dlq_headers::SERVICE, self.service),
            ],
        )
    }

    /// Enqueues [`DeadLetters::undeliverable`].
    ///
    /// # Errors
    /// When the record cannot be enqueued (a [`ProduceError`] inside).
    pub async fn send_undeliverable(
        &self,
        key: &str,
        payload: &[u8],
        reason: &str,
        error: &str,
    ) -> anyhow::Result<DeliveryFuture> {
        let letter = self.undeliverable(key, payload, reason, error);
        self.enqueue(&letter).await
    }

    /// What to do when the broker refuses a dead letter itself for good (its topic's limit is
    /// below even a bounded letter): write the letter again without value, key or original
    /// headers, which is as small as a letter gets. Returns `None` when `letter` is that already.
    pub fn stripped_down(&self, letter: &Output, error: &ProduceError) -> Option<Output> {
        if error.failure != Failure::Refused || letter.payload.is_none() && letter.key.is_none() {
            return None;
        }
        let mut ours: Vec<(String, String)> = Vec::new();
        if let Some(h) = &letter.headers {
            for h in h.iter() {
                if h.key.starts_with(dlq_headers::PREFIX) {
                    ours.push((
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    ));
                }
            }
        }
        if let Some(p) = &letter.payload {
            if !ours.iter().any(|(k, _)| k == dlq_headers::PAYLOAD_LENGTH) {
                ours.push((dlq_headers::PAYLOAD_TRUNCATED.into(), "true".into()));
                ours.push((dlq_headers::PAYLOAD_LENGTH.into(), p.len().to_string()));
                ours.push((dlq_headers::PAYLOAD_SHA256.into(), sha256_hex(p)));
            }
        }
        let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Some(build_letter(
            LetterBounds {
                max_payload_bytes: 0,
                prefix_bytes: 0,
                max_header_bytes: 0,
            },
            &self.topic,
            &Original::default(),
            &ours,
        ))
    }

    /// Writes `outputs` in order ([`deliver`]: an unavailable broker is waited out), and for each
    /// one the broker refuses for good writes its dead letter instead ([`DeadLetters::
    /// letter_for_output`]; a dead letter refused is written again stripped down, and given up
    /// with an error in the log if even that is refused). Returns the indices of the refused
    /// outputs.
    ///
    /// # Errors
    /// As [`deliver`].
    pub async fn write_or_dead_letter(
        &self,
        outputs: &[Output],
        wait: &BrokerWait,
    ) -> Result<Vec<usize>, Interrupted> {
        let refusals = deliver(&self.producer, outputs, wait).await?;
        self.dead_letter_refused(outputs, &refusals, wait).await
    }

    /// Writes the dead letter of each output in `refusals` (refused for good when `outputs` were
    /// written), as [`DeadLetters::write_or_dead_letter`] does. Returns the refused indices.
    ///
    /// # Errors
    /// As [`deliver`].
    pub async fn dead_letter_refused(
        &self,
        outputs: &[Output],
        refusals: &[Refusal],
        wait: &BrokerWait,
    ) -> Result<Vec<usize>, Interrupted> {
        let refused: Vec<usize> = refusals.iter().map(|r| r.index).collect();
        let mut letters: Vec<Output> = refusals
            .iter()
            .filter_map(|r| {
                let o = &outputs[r.index];
                if o.topic == self.topic {
                    self.bare_or_give_up(o, &r.error)
                } else {
                    Some(self.letter_for_output(o, &r.error))
                }
            })
            .collect();
        while !letters.is_empty() {
            let refusals = deliver(&self.producer, &letters, wait).await?;
            letters = refusals
                .iter()
                .filter_map(|r| self.bare_or_give_up(&letters[r.index], &r.error))
                .collect();
        }
        Ok(refused)
    }

    /// [`DeadLetters::stripped_down`], or `None` with an error in the log when `letter` is bare
    /// already.
    fn bare_or_give_up(&self, letter: &Output, error: &ProduceError) -> Option<Output> {
        let bare = self.stripped_down(letter, error);
        if bare.is_none() {
            tracing::error!(
                service = self.service,
                error.message = %error,
                "the broker refuses even a bare dead letter (no value, key or original headers): given up; raise the dead-letter topic's max.message.bytes"
            );
        }
        bare
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: LetterBounds = LetterBounds {
        max_payload_bytes: 256 * 1024,
        prefix_bytes: 4096,
        max_header_bytes: 1024,
    };

    fn headers(o: &Output) -> Vec<(String, String)> {
        o.headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn get<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        h.iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn incoming_dlq_headers_are_stripped_and_ours_are_the_only_ones() {
        let original = Original {
            key: Some(b"R-1"),
            payload: Some(b"{}"),
            headers: vec![
                ("traceparent", Some(b"00-abc".as_slice())),
                (dlq_headers::REASON, Some(b"unknown_force".as_slice())),
                (
                    dlq_headers::SOURCE_TOPIC,
                    Some(b"safeclock.clock-state.v1".as_slice()),
                ),
                ("SafeClock.DLQ.Error", Some(b"forged".as_slice())),
                ("safeclock.intake.client", Some(b"rms".as_slice())),
            ],
        };
        let letter = build_letter(
            BOUNDS,
            "dlq",
            &original,
            &[
                (dlq_headers::REASON, "invalid_json"),
                (dlq_headers::SOURCE_TOPIC, "safeclock.referral-events.v1"),
            ],
        );
        let h = headers(&letter);
        assert_eq!(get(&h, dlq_headers::REASON), ["invalid_json"]);
        assert_eq!(
            get(&h, dlq_headers::SOURCE_TOPIC),
            ["safeclock.referral-events.v1"]
        );
        assert!(get(&h, "SafeClock.DLQ.Error").is_empty());
        assert_eq!(get(&h, dlq_headers::HEADERS_STRIPPED), ["3"]);
        // Other headers are kept, in order, before ours.
        assert_eq!(h[0], ("traceparent".into(), "00-abc".into()));
        assert_eq!(h[1], ("safeclock.intake.client".into(), "rms".into()));
        assert_eq!(letter.payload.as_deref(), Some(&b"{}"[..]));
        assert_eq!(letter.key.as_deref(), Some(&b"R-1"[..]));
    }

    #[test]
    fn a_value_over_the_bound_keeps_its_length_hash_and_a_prefix() {
        let value: Vec<u8> = (0..1_040_000u32).map(|i| (i % 251) as u8).collect();
        let letter = build_letter(
            BOUNDS,
            "dlq",
            &Original {
                key: Some(b"R-1"),
                payload: Some(&value),
                headers: Vec::new(),
            },
            &[(dlq_headers::REASON, "oversized")],
        );
        let h = headers(&letter);
        assert_eq!(letter.payload.as_deref(), Some(&value[..4096]));
        assert_eq!(get(&h, dlq_headers::PAYLOAD_TRUNCATED), ["true"]);
        assert_eq!(get(&h, dlq_headers::PAYLOAD_LENGTH), ["1040000"]);
        assert_eq!(get(&h, dlq_headers::PAYLOAD_SHA256), [sha256_hex(&value)]);
        assert!(letter.size() < 10_000);
        // At the bound, the value is kept whole and nothing says otherwise.
        let whole = vec![b'x'; BOUNDS.max_payload_bytes];
        let letter = build_letter(
            BOUNDS,
            "dlq",
            &Original {
                key: None,
                payload: Some(&whole),
                headers: Vec::new(),
            },
            &[],
        );
        assert_eq!(letter.payload.as_ref().map(Vec::len), Some(whole.len()));
        assert!(get(&headers(&letter), dlq_headers::PAYLOAD_TRUNCATED).is_empty());
    }

    #[test]
    fn the_sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn long_keys_and_many_headers_are_bounded_too() {
        let key = vec![b'k'; 10_000];
        let big = vec![b'h'; 600];
        let original = Original {
            key: Some(&key),
            payload: Some(b"{}"),
            headers: vec![
                ("a", Some(big.as_slice())),
                ("b", Some(big.as_slice())),
                ("c", Some(b"small".as_slice())),
            ],
        };
        let letter = build_letter(BOUNDS, "dlq", &original, &[]);
        let h = headers(&letter);
        assert_eq!(letter.key.as_ref().map(Vec::len), Some(4096));
        assert_eq!(get(&h, dlq_headers::KEY_LENGTH), ["10000"]);
        assert_eq!(get(&h, dlq_headers::KEY_SHA256), [sha256_hex(&key)]);
        // "a" fits in 1024 bytes; "b" does not, so it and everything after it are dropped.
        assert_eq!(get(&h, "a").len(), 1);
        assert!(get(&h, "b").is_empty() && get(&h, "c").is_empty());
        assert_eq!(get(&h, dlq_headers::HEADERS_DROPPED), ["2"]);
    }

    #[test]
    fn error_texts_are_clipped_on_a_character_boundary() {
        let long = "é".repeat(3000);
        let letter = build_letter(
            BOUNDS,
            "dlq",
            &Original::default(),
            &[(dlq_headers::ERROR, &long)],
        );
        let h = headers(&letter);
        assert_eq!(
            get(&h, dlq_headers::ERROR)[0].chars().count(),
            MAX_ERROR_CHARS
        );
    }
}
