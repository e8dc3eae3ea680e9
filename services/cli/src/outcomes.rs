//! `safeclock outcomes expire`: the retention of `sla-outcomes`, per force.
//!
//! `sla-outcomes` is compacted: one record per clock, kept until something deletes its key, so a
//! topic retention cannot apply (it would delete a still-open clock's record with its segment)
//! and Kafka has no per-force retention. This command reads the topic and writes a tombstone for
//! every closed clock (met, met late, cancelled) that stopped longer ago than its force's
//! retention (`kafka.retention.sla_outcomes_days`, or `sla_outcomes_days_by_force.<force>`).
//! Open clocks are never expired. Run it daily (the Kubernetes CronJob in deploy/k8s does); it
//! is idempotent, and `--dry-run` only counts.

use std::collections::BTreeMap;

use safeclock_common::config::Settings;
use safeclock_common::kafka::{self, read_compacted_partition, Topic};
use safeclock_common::schema::to_jiff;
use safeclock_common::schema::v1::{OutcomeStatus, SlaOutcome};

#[derive(Debug, clap::Subcommand)]
pub enum OutcomesCommand {
    /// Tombstone the closed clocks' outcomes past their force's retention
    /// (`kafka.retention.sla_outcomes_days[_by_force]`); open clocks are never expired.
    Expire {
        /// Count only; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs a `safeclock outcomes` command.
///
/// # Errors
/// As [`expire`].
pub async fn run(settings: &Settings, command: OutcomesCommand) -> anyhow::Result<()> {
    match command {
        OutcomesCommand::Expire { dry_run } => {
            let found = expire(settings, jiff::Timestamp::now(), dry_run).await?;
            print(settings, &found, dry_run);
            Ok(())
        }
    }
}

/// What [`expire`] found, per force: (closed outcomes kept, expired and tombstoned).
pub type Expired = BTreeMap<String, (usize, usize)>;

/// Tombstones the closed outcomes past their force's retention at `now` (only counts them
/// when `dry_run`).
///
/// # Errors
/// When the topic cannot be read or the tombstones cannot be written.
pub async fn expire(
    settings: &Settings,
    now: jiff::Timestamp,
    dry_run: bool,
) -> anyhow::Result<Expired> {
    let topic = settings.topic(Topic::SlaOutcomes);
    let s = settings.clone();
    let name = topic.clone();
    let (found, expired) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut found = Expired::new();
        let mut expired = Vec::new();
        for p in 0..crate::erase::partitions(&s, &name)? {
            let (latest, _) = read_compacted_partition(&s, &name, p, "safeclock-outcomes-expire")?;
            for (key, value) in latest {
                let Some(value) = value else { continue };
                // Not an outcome (a foreign writer): left alone.
                let Ok(outcome) = serde_json::from_slice::<SlaOutcome>(&value) else {
                    continue;
                };
                if !matches!(
                    outcome.status(),
                    OutcomeStatus::Met | OutcomeStatus::MetLate | OutcomeStatus::Cancelled
                ) {
                    continue;
                }
                let force = outcome
                    .labels
                    .as_ref()
                    .map(|l| l.force_id.clone())
                    .unwrap_or_default();
                let days = s.kafka.retention.sla_outcomes_days_for(&force);
                let stopped = outcome
                    .stopped_at
                    .as_ref()
                    .or(outcome.updated_at.as_ref())
                    .and_then(to_jiff);
                let entry = found.entry(force).or_default();
                let past = stopped.is_some_and(|t| {
                    now.duration_since(t) > jiff::SignedDuration::from_hours(24 * i64::from(days))
                });
                if past {
                    entry.1 += 1;
                    expired.push((p, key));
                } else {
                    entry.0 += 1;
                }
            }
        }
        Ok((found, expired))
    })
    .await??;
    if dry_run || expired.is_empty() {
        return Ok(found);
    }
    let producer = kafka::producer(settings)?;
    crate::erase::write_tombstones(
        &producer,
        expired
            .iter()
            .map(|(p, k)| (topic.as_str(), *p, k.as_str())),
    )
    .await?;
    Ok(found)
}

/// Prints what [`expire`] found.
pub fn print(settings: &Settings, found: &Expired, dry_run: bool) {
    let verb = if dry_run { "would expire" } else { "expired" };
    for (force, (kept, expired)) in found {
        let force = if force.is_empty() { "(none)" } else { force };
        println!(
            "{force}: {verb} {expired} closed outcome(s) older than {} days; {kept} closed kept",
            settings.kafka.retention.sla_outcomes_days_for(force)
        );
    }
    if found.is_empty() {
        println!("no closed outcomes");
    }
}
