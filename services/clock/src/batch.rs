//! One batch's (or one tick's) effects, planned before anything is written, so that a record
//! whose effects cannot be written is refused alone and the partition moves on.
//!
//! A [`Plan`] holds, for every input record of a batch, its fate: applied (with the SLA events it
//! caused), refused (with its dead letter), or skipped (its partition left this instance). Before
//! the first record of a referral is applied, the referral's state is kept as it was (its
//! *pre-image*: exactly what the changelog holds, since every earlier batch and tick wrote its
//! state before the next began).
//!
//! When something a record causes cannot be written (the broker refuses it for good, or the
//! referral's state would be over the bound), the record is **refused after all**: the referral
//! is put back to its pre-image and the batch's other records of that referral are applied again,
//! in order and at the same wall-clock instants, without it. Their SLA events come out the same,
//! under the same ids. This is the rare path: it costs one state export per referral per batch
//! (the pre-image) on the normal path, and the replay only when a record is refused.

use std::collections::{BTreeSet, HashMap};

use jiff::Timestamp;
use rdkafka::message::Message;
use safeclock_common::event::Rejection;
use safeclock_common::kafka::{DeadLetters, Output, ProduceError};
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::{ReferralEvent, ReferralState, SlaEvent};

use crate::engine::Engine;
use crate::outcome;

/// A referral of a partition: what a changelog record is about.
pub(crate) type ReferralKey = (i32, String);

/// What became of one input record.
pub(crate) enum Fate {
    /// Its partition left this instance between the fetch and now: not handled here (its
    /// offset is not stored; the next owner processes it).
    Skipped,
    /// Refused: this dead letter stands for it.
    Refused(Output),
    /// Refused, but the broker refuses even its dead letter stripped of value, key and headers
    /// (a dead-letter topic whose limit is below a few hundred bytes): logged as an error and
    /// counted, and the partition moves on.
    Unrecorded,
    /// Applied to its partition's engine.
    Applied(Applied),
}

/// A record applied to the engine, with what is needed to apply it again.
pub(crate) struct Applied {
    pub(crate) partition: i32,
    pub(crate) event: Box<ReferralEvent>,
    /// The wall-clock instant it was applied at (used again on a replay, so the SLA events come
    /// out the same).
    pub(crate) now: Timestamp,
    pub(crate) events: Vec<SlaEvent>,
}

/// What an output record stands for, so that a refusal can be traced back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// An SLA event or outcome caused by input record `i`.
    Record(usize),
    /// An SLA event or outcome of the tick, number `j`.
    Tick(usize),
    /// The dead letter of input record `i`.
    RecordLetter(usize),
    /// Dead letter number `k` of outputs refused for good.
    Letter(usize),
}

/// Applies one validated event to its engine. **The one place** where the engine may refuse an
/// event (e.g. a per-referral limit): the refusal is dead-lettered with its [`Rejection`] and the
/// event's effects are not kept; every first application and every replay goes through here.
///
/// # Errors
/// The [`Rejection`] to dead-letter the record with.
pub(crate) fn apply_one(
    engine: &mut Engine,
    event: &ReferralEvent,
    now: Timestamp,
) -> Result<Vec<SlaEvent>, Rejection> {
    engine.on_event(event, now).map_err(Rejection::from)
}

/// The effects of one batch or tick, until they are durable.
#[derive(Default)]
pub(crate) struct Plan {
    /// One fate per input record, in batch order (empty for a tick).
    pub(crate) records: Vec<Fate>,
    /// A tick's SLA events; `None` once dead-lettered instead.
    pub(crate) tick: Vec<Option<SlaEvent>>,
    /// Dead letters of outputs the broker refuses for good (they have no input record); `None`
    /// once given up.
    pub(crate) letters: Vec<Option<Output>>,
    /// The state of each referral before this batch first touched it (`None`: it had none).
    before: HashMap<ReferralKey, Option<ReferralState>>,
    /// Referrals whose state the batch or tick changed.
    pub(crate) changed: BTreeSet<ReferralKey>,
    /// Referrals whose state is not written this time (dead-lettered instead): over the limit
    /// with no record of this batch to refuse.
    pub(crate) unwritable: BTreeSet<ReferralKey>,
}

impl Plan {
    /// Keeps `referral`'s state before the batch first changes it.
    pub(crate) fn remember(&mut self, engine: &Engine, partition: i32, referral: &str) {
        self.before
            .entry((partition, referral.to_string()))
            .or_insert_with(|| engine.export(referral));
    }

    /// The plan of a tick that fired `events`.
    pub(crate) fn of_tick(events: Vec<SlaEvent>) -> Self {
        Self {
            tick: events.into_iter().map(Some).collect(),
            ..Self::default()
        }
    }

    /// The indices of the records of `key` that are applied, in batch order.
    fn applied_of(&self, key: &ReferralKey) -> Vec<usize> {
        self.records
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f {
                Fate::Applied(a) if a.partition == key.0 && a.event.referral_id == key.1 => Some(i),
                _ => None,
            })
            .collect()
    }

    /// Whether any record of this batch is applied to `key` (a referral only a tick changed has
    /// none).
    pub(crate) fn has_records(&self, key: &ReferralKey) -> bool {
        !self.applied_of(key).is_empty()
    }

    /// Every output of the plan, in order, with its cause: per input record its SLA events and
    /// outcomes (or its dead letter), then the tick's, then dead letters of refused outputs.
    ///
    /// # Errors
    /// When an SLA event cannot be serialised.
    pub(crate) fn outputs(&self, topics: &OutputTopics) -> anyhow::Result<Vec<(Output, Cause)>> {
        let mut out = Vec::new();
        for (i, fate) in self.records.iter().enumerate() {
            match fate {
                Fate::Skipped | Fate::Unrecorded => {}
                Fate::Refused(letter) => out.push((letter.clone(), Cause::RecordLetter(i))),
                Fate::Applied(a) => {
                    for e in &a.events {
                        for o in topics.of_event(e)? {
                            out.push((o, Cause::Record(i)));
                        }
                    }
                }
            }
        }
        for (j, e) in self.tick.iter().enumerate() {
            if let Some(e) = e {
                for o in topics.of_event(e)? {
                    out.push((o, Cause::Tick(j)));
                }
            }
        }
        for (k, l) in self.letters.iter().enumerate() {
            if let Some(l) = l {
                out.push((l.clone(), Cause::Letter(k)));
            }
        }
        Ok(out)
    }

    /// The SLA events of the plan, in order (for metrics and logs).
    pub(crate) fn events(&self) -> impl Iterator<Item = &SlaEvent> {
        self.records
            .iter()
            .filter_map(|f| match f {
                Fate::Applied(a) => Some(a.events.iter()),
                _ => None,
            })
            .flatten()
            .chain(self.tick.iter().flatten())
    }

    /// Refuses record `index` after all (its dead letter: `letter`) and applies the batch's other
    /// records of its referral again without it.
    pub(crate) fn refuse(
        &mut self,
        engines: &mut std::collections::BTreeMap<i32, Engine>,
        index: usize,
        letter: Output,
        dead_letters: &DeadLetters,
        batch: &[impl Message],
    ) {
        let key = match self.records.get(index) {
            Some(Fate::Applied(a)) => (a.partition, a.event.referral_id.clone()),
            _ => return,
        };
        self.records[index] = Fate::Refused(letter);
        self.replay(engines, &key, None, dead_letters, batch);
    }

    /// Refuses every record of `key` in this batch after all (its state is refused for a reason
    /// other than its size), dead-lettering each with `error`.
    pub(crate) fn refuse_all(
        &mut self,
        engines: &mut std::collections::BTreeMap<i32, Engine>,
        key: &ReferralKey,
        error: &ProduceError,
        dead_letters: &DeadLetters,
        batch: &[impl Message],
    ) {
        for i in self.applied_of(key) {
            if let Some(message) = batch.get(i) {
                self.records[i] = Fate::Refused(dead_letters.letter_for_refused_output(
                    message,
                    error,
                    "the referral's state is refused",
                ));
            }
        }
        self.replay(engines, key, None, dead_letters, batch);
    }

    /// Applies the batch's records of `key` again from its pre-image, refusing each record that
    /// leaves the referral's encoded state over `bound` bytes (to the changelog `changelog`).
    pub(crate) fn fit_state(
        &mut self,
        engines: &mut std::collections::BTreeMap<i32, Engine>,
        key: &ReferralKey,
        bound: usize,
        changelog: &str,
        dead_letters: &DeadLetters,
        batch: &[impl Message],
    ) {
        self.replay(engines, key, Some((bound, changelog)), dead_letters, batch);
    }

    /// Puts `key` back to its pre-image and applies its applied records again, in order, at their
    /// instants; with `bound`, a record that leaves the state over it is refused and undone.
    fn replay(
        &mut self,
        engines: &mut std::collections::BTreeMap<i32, Engine>,
        key: &ReferralKey,
        bound: Option<(usize, &str)>,
        dead_letters: &DeadLetters,
        batch: &[impl Message],
    ) {
        let Some(engine) = engines.get_mut(&key.0) else {
            return;
        };
        let before = self.before.get(key).cloned().flatten();
        restore(engine, &key.1, before);
        for i in self.applied_of(key) {
            let Fate::Applied(a) = &mut self.records[i] else {
                continue;
            };
            let undo = bound.map(|_| engine.export(&key.1));
            match apply_one(engine, &a.event, a.now) {
                Ok(events) => a.events = events,
                Err(rejection) => {
                    if let Some(message) = batch.get(i) {
                        self.records[i] = Fate::Refused(dead_letters.letter(message, &rejection));
                    }
                    continue;
                }
            }
            let Some((bound, changelog)) = bound else {
                continue;
            };
            let size = encoded_len(engine, &key.1);
            if size > bound {
                restore(engine, &key.1, undo.flatten());
                if let Some(message) = batch.get(i) {
                    let detail = format!(
                        "the referral's state would be {size} bytes, over the {bound}-byte bound"
                    );
                    self.records[i] = Fate::Refused(dead_letters.letter_for_refused_output(
                        message,
                        &ProduceError::too_large(changelog),
                        &detail,
                    ));
                }
            }
        }
        self.changed.insert(key.clone());
    }
}

/// Puts `referral` back to `state` (`None`: it had none).
fn restore(engine: &mut Engine, referral: &str, state: Option<ReferralState>) {
    match state {
        Some(s) => engine.import(s),
        None => engine.forget(referral),
    }
}

/// The size of `referral`'s encoded state (0 when it has none).
pub(crate) fn encoded_len(engine: &Engine, referral: &str) -> usize {
    engine
        .export(referral)
        .map_or(0, |s| prost::Message::encoded_len(&s))
}

/// Where the clock's outputs go, and how they are encoded.
pub(crate) struct OutputTopics {
    pub(crate) sla: String,
    pub(crate) outcomes: String,
    pub(crate) changelog: String,
    pub(crate) policy: Policy,
}

impl OutputTopics {
    /// The SLA event and its `sla-outcomes` record.
    ///
    /// # Errors
    /// When either cannot be serialised.
    pub(crate) fn of_event(&self, event: &SlaEvent) -> anyhow::Result<[Output; 2]> {
        let outcome = outcome::from_event(event, &self.policy);
        Ok([
            Output::new(
                &self.sla,
                event.referral_id.as_bytes(),
                Some(serde_json::to_vec(event)?),
            ),
            Output::new(
                &self.outcomes,
                outcome.outcome_id.as_bytes(),
                Some(serde_json::to_vec(&outcome)?),
            ),
        ])
    }

    /// The changelog record of `key`'s state (a tombstone once the engine holds nothing for it).
    pub(crate) fn of_state(&self, engine: &Engine, key: &ReferralKey) -> Output {
        let payload = engine
            .export(&key.1)
            .map(|s| prost::Message::encode_to_vec(&s));
        Output::new(&self.changelog, key.1.as_bytes(), payload).to_partition(key.0)
    }
}

/// The input record `message` decoded by the caller: kept with its fate.
pub(crate) fn applied(
    message: &impl Message,
    event: ReferralEvent,
    now: Timestamp,
    events: Vec<SlaEvent>,
) -> Fate {
    Fate::Applied(Applied {
        partition: message.partition(),
        event: Box::new(event),
        now,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Headers, OwnedMessage};
    use safeclock_common::config::Settings;
    use safeclock_common::kafka::dlq_headers;
    use std::collections::BTreeMap;

    const AT: &str = "2025-03-03T09:00:00Z";

    fn record(offset: i64, json: String) -> OwnedMessage {
        OwnedMessage::new(
            Some(json.into_bytes()),
            Some(b"R-1".to_vec()),
            "safeclock.referral-events.v1".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    fn kind_event(id: &str, kind: &str) -> String {
        format!(
            r#"{{"eventId":"{id}","referralId":"R-1","forceId":"nottinghamshire","occurredAt":"{AT}",{kind}}}"#
        )
    }

    fn seized(id: &str, device: &str) -> String {
        kind_event(id, &format!(r#""deviceSeized":{{"deviceRef":"{device}"}}"#))
    }

    struct Fixture {
        engines: BTreeMap<i32, Engine>,
        dead_letters: DeadLetters,
        registry: prometheus::Registry,
    }

    fn fixture() -> Fixture {
        let settings = Settings::defaults().unwrap();
        let policy = Policy::load(&settings).unwrap();
        let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create()
            .unwrap();
        let registry = prometheus::Registry::new();
        let metrics = safeclock_common::metrics::ConsumerMetrics::register(&registry).unwrap();
        Fixture {
            engines: BTreeMap::from([(0, Engine::new(policy.rules, policy.calendars))]),
            dead_letters: DeadLetters::new(producer, &settings, "clock", metrics),
            registry,
        }
    }

    /// Applies `batch` as the service does, and returns the plan.
    fn apply(f: &mut Fixture, batch: &[OwnedMessage]) -> Plan {
        let now: Timestamp = AT.parse().unwrap();
        let mut plan = Plan::default();
        for m in batch {
            let event =
                safeclock_common::event::decode_referral_event(m.payload().unwrap()).unwrap();
            let engine = f.engines.get_mut(&0).unwrap();
            plan.remember(engine, 0, &event.referral_id);
            let events = apply_one(engine, &event, now).unwrap();
            plan.records.push(applied(m, event, now, events));
        }
        plan
    }

    fn header(o: &Output, name: &str) -> Option<String> {
        o.headers
            .as_ref()?
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
    }

    fn device_clocks(f: &Fixture) -> Vec<String> {
        let mut v: Vec<String> = f.engines[&0]
            .export("R-1")
            .unwrap()
            .clocks
            .into_iter()
            .filter(|c| c.rule_id == "device-examination")
            .map(|c| c.instance.chars().take(8).collect())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_record_that_makes_a_state_too_large_is_refused_and_the_others_stay() {
        let mut f = fixture();
        let big = |c: char| format!("{c}{}", "x".repeat(20_000));
        let batch = vec![
            record(
                0,
                kind_event(
                    "e-0",
                    r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}"#,
                ),
            ),
            record(1, seized("e-1", &big('A'))),
            record(2, seized("e-2", &big('B'))),
            record(3, seized("e-3", &big('C'))),
            record(4, seized("e-4", "D-small")),
        ];
        let mut plan = apply(&mut f, &batch);
        assert!(encoded_len(&f.engines[&0], "R-1") > 60_000);
        let bound = 50_000;
        plan.fit_state(
            &mut f.engines,
            &(0, "R-1".into()),
            bound,
            "safeclock.clock-state.v1",
            &f.dead_letters,
            &batch,
        );
        // Two 20 KB devices fit, the third does not; the small one after it does.
        let fates: Vec<&str> = plan
            .records
            .iter()
            .map(|f| match f {
                Fate::Applied(_) => "applied",
                Fate::Refused(_) => "refused",
                _ => "other",
            })
            .collect();
        assert_eq!(
            fates,
            ["applied", "applied", "applied", "refused", "applied"]
        );
        assert!(encoded_len(&f.engines[&0], "R-1") <= bound);
        // (The first 8 characters of each device's instance.)
        assert_eq!(device_clocks(&f), ["Axxxxxxx", "Bxxxxxxx", "D-small"]);
        let Fate::Refused(letter) = &plan.records[3] else {
            unreachable!()
        };
        assert_eq!(
            header(letter, dlq_headers::REASON).as_deref(),
            Some("output_too_large")
        );
        assert_eq!(
            header(letter, dlq_headers::SOURCE_OFFSET).as_deref(),
            Some("3")
        );
        assert_eq!(
            header(letter, dlq_headers::OUTPUT_TOPIC).as_deref(),
            Some("safeclock.clock-state.v1")
        );
        // The record itself is whole in its letter (it is under the dead-letter bound).
        assert_eq!(letter.payload.as_deref(), batch[3].payload());
        // The SLA events of the kept records are there, the refused one's are not.
        let started: Vec<&str> = plan
            .events()
            .filter(|e| e.rule_id == "device-examination")
            .map(|e| &e.instance[..1])
            .collect();
        assert_eq!(started, ["A", "B", "D"]);
        let refused = f
            .registry
            .gather()
            .iter()
            .find(|m| m.name() == "safeclock_outputs_refused_total")
            .map(|m| m.get_metric()[0].get_counter().get_value());
        assert_eq!(refused, Some(1.0));
    }

    #[test]
    fn a_refused_record_is_undone_and_the_referrals_other_records_replayed_with_the_same_ids() {
        let mut f = fixture();
        let batch = vec![
            record(
                0,
                kind_event(
                    "e-0",
                    r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}"#,
                ),
            ),
            record(1, seized("e-1", "DEV-1")),
            record(2, seized("e-2", "DEV-2")),
        ];
        let mut plan = apply(&mut f, &batch);
        let ids_before: Vec<String> = plan
            .events()
            .filter(|e| e.instance != "DEV-1")
            .map(|e| e.sla_event_id.clone())
            .collect();
        let letter = f.dead_letters.letter_for_refused_output(
            &batch[1],
            &ProduceError::too_large("safeclock.sla-events.v1"),
            "test",
        );
        plan.refuse(&mut f.engines, 1, letter, &f.dead_letters, &batch);
        assert_eq!(device_clocks(&f), ["DEV-2"]);
        let ids_after: Vec<String> = plan.events().map(|e| e.sla_event_id.clone()).collect();
        assert_eq!(ids_after, ids_before);
        // The refused event is not in the seen ids either: a replay of it is applied afresh.
        let engine = f.engines.get_mut(&0).unwrap();
        let again =
            safeclock_common::event::decode_referral_event(batch[1].payload().unwrap()).unwrap();
        assert!(!engine
            .on_event(&again, AT.parse().unwrap())
            .unwrap()
            .is_empty());
    }
}
