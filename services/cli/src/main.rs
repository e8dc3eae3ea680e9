//! `safeclock`: run the services, check configuration, or watch the embedded demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use safeclock::app::{self, Service};
use safeclock::demo::{self, DemoOptions};
use safeclock_common::config::{LogFormat, Settings};
use safeclock_common::policy::Policy;
use safeclock_common::shutdown::{cancel_on_signal, CancellationToken};
use safeclock_common::telemetry;

/// mimalloc rather than the system allocator: the services allocate and free many small
/// records per event on several threads, and the escalator grows to millions of states; see
/// docs/benchmarks.md for what it changed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "safeclock",
    version,
    about = "No child-protection referral left waiting: SLA clocks, escalation and metrics on Kafka."
)]
struct Cli {
    /// Configuration file (TOML); layered over the built-in defaults, under SAFECLOCK__* variables.
    #[arg(long, global = true, env = "SAFECLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a service (or all of them) against the configured Kafka cluster.
    Run {
        #[arg(value_enum)]
        service: Service,
    },
    /// Load and validate the configuration, print a summary, and exit non-zero if it is invalid.
    CheckConfig,
    /// Print the deadline of a clock: start time plus target on a calendar.
    Deadline {
        /// When the clock starts (RFC 3339, e.g. 2026-11-29T10:00:00Z or 2026-11-29T10:00:00+00:00).
        #[arg(long)]
        start: String,
        /// The target: "72h", "28 days", "15 working days", "1 working day", "next school day".
        #[arg(long)]
        target: String,
        /// Calendar name (default: england-and-wales; england-and-wales-schools for "next school day").
        #[arg(long)]
        calendar: Option<String>,
    },
    /// Replay referral events (JSON lines) offline and print each clock's timeline: which rule
    /// applied and why, start, warnings, pauses, deadline, outcome.
    Explain {
        /// File of referral events, one proto3 JSON record per line.
        #[arg(long)]
        events: PathBuf,
        /// Only this referral.
        #[arg(long)]
        referral: Option<String>,
        /// Run the wall clock up to this time (RFC 3339) after the last event.
        #[arg(long)]
        until: Option<String>,
    },
    /// Run every service on an in-process Kafka cluster with generated referrals on accelerated
    /// time, printing warnings, breaches and escalations as they happen.
    Demo {
        /// How long to run, in real seconds.
        #[arg(long, default_value_t = 32.0)]
        duration: f64,
        /// Simulated seconds per real second (14400: four hours pass every second).
        #[arg(long, default_value_t = 14_400.0)]
        speed: f64,
        /// Where to serve /metrics, /healthz and /readyz.
        #[arg(long, default_value = "127.0.0.1:9464")]
        http: SocketAddr,
        /// Seed for the generated referrals (same seed, same story).
        #[arg(long, default_value_t = 2015)]
        seed: u64,
    },
    /// Erase a referral: an erasure request every running service applies (its state dropped,
    /// its records refused from then on), then tombstones for its keys on every compacted topic.
    Erase {
        /// The referral id, as the source system sent it.
        #[arg(long)]
        referral: String,
        /// Why, as a code (e.g. subject_request, recorded_in_error); never free text.
        #[arg(long)]
        reason: String,
        /// Who asks, as a code (default: the user running the command).
        #[arg(long)]
        by: Option<String>,
        /// Seconds to let running services apply the request before the tombstones are
        /// written (longer than their `tick_interval_ms`).
        #[arg(long, default_value_t = 10.0)]
        settle: f64,
    },
    /// The retention of `sla-outcomes`: expire closed clocks' outcomes past their force's period.
    Outcomes {
        #[command(subcommand)]
        command: safeclock::outcomes::OutcomesCommand,
    },
    /// List dead letters with their reasons, or replay selected ones to their source topic.
    Dlq {
        #[command(subcommand)]
        command: safeclock::dlq::DlqCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("safeclock: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("safeclock: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses an RFC 3339 time given as `flag`, with an error naming the flag.
fn parse_time(flag: &str, value: &str) -> anyhow::Result<jiff::Timestamp> {
    value
        .parse()
        .map_err(|e| anyhow::anyhow!("{flag} {value:?} is not an RFC 3339 time: {e}"))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Deadline {
            start,
            target,
            calendar,
        } => {
            let settings = Settings::load(cli.config.as_deref())?;
            let policy = Policy::load(&settings)?;
            let start = parse_time("--start", &start)?;
            let target = safeclock_calendar::Target::parse(&target)?;
            let name = calendar.unwrap_or_else(|| {
                if target == safeclock_calendar::Target::NextSchoolDay {
                    "england-and-wales-schools".into()
                } else {
                    "england-and-wales".into()
                }
            });
            let cal = policy.calendars.calendars.require(&name)?;
            let deadline = cal.deadline(start, &target)?;
            let local = deadline.to_zoned(safeclock_calendar::london());
            println!("{}", local.timestamp().display_with_offset(local.offset()));
            Ok(())
        }
        Command::Explain {
            events,
            referral,
            until,
        } => {
            let settings = Settings::load(cli.config.as_deref())?;
            let policy = Policy::load(&settings)?;
            let input = std::fs::read_to_string(&events)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", events.display()))?;
            let until = until.map(|u| parse_time("--until", &u)).transpose()?;
            let x = safeclock_clock::explain::replay(&policy, &input, referral.as_deref(), until);
            print!("{}", safeclock_clock::explain::render(&policy, &x));
            Ok(())
        }
        Command::CheckConfig => {
            let settings = Settings::load(cli.config.as_deref())?;
            let policy = Policy::load(&settings)?;
            println!(
                "configuration OK{}",
                cli.config
                    .as_ref()
                    .map(|p| format!(" ({})", p.display()))
                    .unwrap_or_default()
            );
            println!("  brokers:      {}", settings.kafka.brokers);
            let built = safeclock_common::kafka::builtin_features();
            let optional = safeclock_common::kafka::OPTIONAL_FEATURES
                .iter()
                .map(|(builtin, cargo, what)| {
                    if built.iter().any(|b| b == builtin) {
                        format!("{what}: yes")
                    } else {
                        format!("{what}: no (cargo feature `{cargo}`)")
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            println!(
                "  kafka client: librdkafka {}; {optional}",
                rdkafka::util::get_rdkafka_version().1
            );
            for t in safeclock_common::kafka::Topic::ALL {
                println!("  topic:        {}", settings.topic(t));
            }
            let tls = |s: &safeclock_common::config::ServerSettings| {
                if s.tls() {
                    " (https)"
                } else {
                    ""
                }
            };
            println!(
                "  ops endpoint: {}{}",
                settings.ops.listen,
                tls(&settings.ops.server)
            );
            println!("  forces:       {}", settings.forces.len());
            println!(
                "  rules:        {} ({})",
                policy.rules.rules.len(),
                if settings.rules.paths.is_empty() {
                    "built-in default pack".to_string()
                } else {
                    format!("{} path(s)", settings.rules.paths.len())
                }
            );
            println!(
                "  calendars:    {}",
                policy
                    .calendars
                    .calendars
                    .names()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let esc = &settings.escalator;
            println!(
                "  receivers:    {}",
                esc.all_receivers()
                    .iter()
                    .map(|r| format!("{} ({:?})", r.name, r.kind).to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "  policies:     {}",
                esc.all_policies()
                    .iter()
                    .map(|p| format!("{} ({} levels)", p.name, p.levels.len()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("  routes:       {} top-level", esc.routes.len());
            println!(
                "  ack API:      {}",
                if esc.api.tokens.is_empty() {
                    "off (no escalator.api.tokens)".to_string()
                } else {
                    format!(
                        "{}{} ({} tokens)",
                        esc.api.listen,
                        tls(&esc.api.server),
                        esc.api.tokens.len()
                    )
                }
            );
            println!(
                "  intake:       {}",
                if settings.intake.tokens.is_empty() {
                    "no clients (no intake.tokens)".to_string()
                } else {
                    format!(
                        "{}{} ({} clients)",
                        settings.intake.listen,
                        tls(&settings.intake.server),
                        settings.intake.tokens.len()
                    )
                }
            );
            Ok(())
        }
        Command::Run { service } => {
            let settings = Arc::new(Settings::load(cli.config.as_deref())?);
            let format = if cli.log_json {
                LogFormat::Json
            } else {
                settings.telemetry.format
            };
            telemetry::init(format, &settings.telemetry.filter);
            tracing::info!(?service, settings = ?settings, "starting");
            if settings.time.offset_secs != 0 {
                tracing::warn!(
                    offset_secs = settings.time.offset_secs,
                    "the wall clock is shifted ([time] offset_secs): deadlines fire at simulated times"
                );
            }
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            let running = app::start(
                settings.clone(),
                service,
                settings.time.source(),
                settings.ops.listen,
                shutdown,
            )
            .await?;
            running.wait().await
        }
        Command::Erase {
            referral,
            reason,
            by,
            settle,
        } => {
            let settings = Settings::load(cli.config.as_deref())?;
            let by = by.unwrap_or_else(|| {
                std::env::var("USER")
                    .unwrap_or_else(|_| "operator".into())
                    .to_ascii_lowercase()
            });
            anyhow::ensure!(
                settle.is_finite() && settle >= 0.0,
                "--settle must be a number of seconds"
            );
            let settle = std::time::Duration::from_secs_f64(settle);
            let erased =
                safeclock::erase::erase(&settings, &referral, &reason, &by, settle).await?;
            safeclock::erase::print(&settings, &erased);
            Ok(())
        }
        Command::Outcomes { command } => {
            let settings = Settings::load(cli.config.as_deref())?;
            safeclock::outcomes::run(&settings, command).await
        }
        Command::Dlq { command } => {
            let settings = Settings::load(cli.config.as_deref())?;
            safeclock::dlq::run(&settings, command).await
        }
        Command::Demo {
            duration,
            speed,
            http,
            seed,
        } => {
            anyhow::ensure!(duration > 0.0, "--duration must be positive");
            anyhow::ensure!(speed >= 1.0, "--speed must be at least 1");
            demo::run(DemoOptions {
                duration: std::time::Duration::from_secs_f64(duration),
                speed,
                http,
                seed,
                log_json: cli.log_json,
            })
            .await
        }
    }
}
