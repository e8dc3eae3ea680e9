//! `sla-outcomes`: one record per clock for data platforms, rewritten at every transition.
//!
//! Built from the SLA event the engine just emitted (which carries the clock's cumulative state:
//! pauses, whether and by which record it breached), plus the elapsed working days on the force's
//! working-day calendar, so a warehouse can report timeliness in the units the rule uses.

use safeclock_common::policy::Policy;
use safeclock_common::rules::CalendarChoice;
use safeclock_common::schema::to_jiff;
use safeclock_common::schema::v1::{OutcomeStatus, SlaEvent, SlaOutcome, SlaTransition};

/// The outcome record's key: `referral_id/rule_id/clock_id`.
pub fn outcome_id(event: &SlaEvent) -> String {
    format!("{}/{}/{}", event.referral_id, event.rule_id, event.clock_id)
}

/// The clock's outcome as of `event`.
pub fn from_event(event: &SlaEvent, policy: &Policy) -> SlaOutcome {
    let transition = event.transition();
    let corrected = transition == SlaTransition::Corrected;
    let status = match transition {
        SlaTransition::Met | SlaTransition::Corrected => OutcomeStatus::Met,
        SlaTransition::MetLate => OutcomeStatus::MetLate,
        SlaTransition::Cancelled => OutcomeStatus::Cancelled,
        _ if event.breached => OutcomeStatus::OpenBreached,
        _ => OutcomeStatus::Open,
    };
    let stopped_at = matches!(
        status,
        OutcomeStatus::Met | OutcomeStatus::MetLate | OutcomeStatus::Cancelled
    )
    .then_some(event.occurred_at)
    .flatten();
    let labels = event.labels.clone().unwrap_or_default();
    let working_days = match (
        event.started_at.as_ref().and_then(to_jiff),
        event.occurred_at.as_ref().and_then(to_jiff),
        policy
            .calendars
            .resolve(&CalendarChoice::Force, &labels.force_id),
    ) {
        (Some(start), Some(end), Some(calendar)) => calendar.working_days_between(start, end),
        _ => 0,
    };
    SlaOutcome {
        outcome_id: outcome_id(event),
        referral_id: event.referral_id.clone(),
        rule_id: event.rule_id.clone(),
        clock_id: event.clock_id.clone(),
        instance: event.instance.clone(),
        rule_title: event.rule_title.clone(),
        severity: event.severity,
        labels: Some(labels),
        status: status as i32,
        started_at: event.started_at,
        deadline: event.deadline,
        stopped_at,
        target: event.target,
        elapsed: event.elapsed,
        elapsed_working_days: working_days,
        paused_total: event.paused_total,
        pauses: event.pauses,
        breached: event.breached || corrected,
        breach_sla_event_id: if corrected {
            event.corrects_sla_event_id.clone()
        } else {
            event.breach_sla_event_id.clone()
        },
        breach_corrected: corrected,
        correction_sla_event_id: if corrected {
            event.sla_event_id.clone()
        } else {
            String::new()
        },
        last_sla_event_id: event.sla_event_id.clone(),
        last_transition: event.transition,
        updated_at: event.emitted_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use safeclock_common::config::Settings;

    fn replay(lines: &[&str], tick: &str) -> (Vec<SlaEvent>, Policy) {
        let policy = Policy::load(&Settings::defaults().unwrap()).unwrap();
        let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
        let mut out = Vec::new();
        for l in lines {
            let e = safeclock_common::event::decode_referral_event(l.as_bytes()).unwrap();
            let now = to_jiff(e.occurred_at.as_ref().unwrap()).unwrap();
            out.extend(engine.on_tick(now));
            out.extend(engine.on_event(&e, now).unwrap());
        }
        out.extend(engine.on_tick(tick.parse().unwrap()));
        (out, policy)
    }

    fn last_for<'a>(events: &'a [SlaEvent], rule: &str) -> &'a SlaEvent {
        events.iter().rev().find(|e| e.rule_id == rule).unwrap()
    }

    const RECEIVED: &str = r#"{"eventId":"e1","referralId":"R-1","forceId":"nottinghamshire","occurredAt":"2026-11-27T10:00:00Z","referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}}"#;

    #[test]
    fn a_late_stop_is_met_late_and_breached_with_working_days_counted() {
        let contacted = r#"{"eventId":"e2","referralId":"R-1","forceId":"nottinghamshire","occurredAt":"2026-12-02T10:00:00Z","victimContacted":{}}"#;
        let (events, policy) = replay(&[RECEIVED, contacted], "2026-12-02T10:00:00Z");
        let o = from_event(last_for(&events, "victim-contact"), &policy);
        assert_eq!(o.status(), OutcomeStatus::MetLate);
        assert!(o.breached && !o.breach_corrected);
        assert!(!o.breach_sla_event_id.is_empty());
        assert_eq!(o.outcome_id, format!("R-1/victim-contact/e1"));
        // Fri 27 Nov -> Wed 2 Dec: Mon 30 Nov and Tue 1 Dec are whole working days between.
        assert_eq!(o.elapsed_working_days, 2);
        assert_eq!(o.elapsed.unwrap().seconds, 5 * 86_400);
        assert!(o.stopped_at.is_some());
    }

    #[test]
    fn a_breach_corrected_by_a_late_recorded_stop_is_met_and_says_so() {
        let late_record = r#"{"eventId":"e2","referralId":"R-1","forceId":"nottinghamshire","occurredAt":"2026-11-28T09:00:00Z","recordedAt":"2026-11-29T09:00:00Z","victimContacted":{}}"#;
        let policy = Policy::load(&Settings::defaults().unwrap()).unwrap();
        let mut engine = Engine::new(policy.rules.clone(), policy.calendars.clone());
        let received = safeclock_common::event::decode_referral_event(RECEIVED.as_bytes()).unwrap();
        engine
            .on_event(&received, "2026-11-27T10:00:00Z".parse().unwrap())
            .unwrap();
        let mut events = engine.on_tick("2026-11-28T10:00:01Z".parse().unwrap());
        let stop = safeclock_common::event::decode_referral_event(late_record.as_bytes()).unwrap();
        events.extend(
            engine
                .on_event(&stop, "2026-11-29T09:00:00Z".parse().unwrap())
                .unwrap(),
        );
        let o = from_event(last_for(&events, "victim-contact"), &policy);
        assert_eq!(o.status(), OutcomeStatus::Met);
        assert!(o.breached && o.breach_corrected);
        assert!(!o.correction_sla_event_id.is_empty());
    }

    #[test]
    fn an_open_clock_past_its_deadline_is_open_breached() {
        let (events, policy) = replay(&[RECEIVED], "2026-11-28T10:00:00Z");
        let o = from_event(last_for(&events, "victim-contact"), &policy);
        assert_eq!(o.status(), OutcomeStatus::OpenBreached);
        assert!(o.stopped_at.is_none());
    }
}
