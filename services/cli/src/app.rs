//! Runs one or more services in this process, behind one ops endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use safeclock_common::config::Settings;
use safeclock_common::kafka::{self, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::{self, Readiness};
use safeclock_common::service::ServiceDeps;
use safeclock_common::time::SharedTime;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A service that `safeclock run` can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Clock,
    Escalator,
    Exporter,
    /// The HTTP intake gateway (needs `[intake.tokens]`).
    Intake,
    /// Every service in one process (intake too when `[intake.tokens]` is set).
    All,
}

impl Service {
    fn expand(self, settings: &Settings) -> Vec<Service> {
        match self {
            Service::All => {
                let mut all = vec![Service::Clock, Service::Escalator, Service::Exporter];
                if !settings.intake.tokens.is_empty() {
                    all.push(Service::Intake);
                }
                all
            }
            s => vec![s],
        }
    }
}

/// Services running in this process.
pub struct Running {
    /// Where /metrics, /healthz and /readyz are served.
    pub ops_addr: SocketAddr,
    pub registry: Registry,
    pub readiness: Readiness,
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
    grace: std::time::Duration,
}

impl Running {
    /// Waits until the services stop (after `shutdown` is cancelled, or one fails).
    ///
    /// # Errors
    /// The first service error.
    pub async fn wait(self) -> anyhow::Result<()> {
        safeclock_common::shutdown::supervise(self.tasks, self.shutdown, self.grace).await
    }
}

/// Starts `service` (or all of them) with the ops endpoint on `ops_listen`.
///
/// # Errors
/// When topics cannot be created or the ops endpoint cannot bind.
pub async fn start(
    settings: Arc<Settings>,
    service: Service,
    time: SharedTime,
    ops_listen: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let registry = Registry::new();
    let readiness = Readiness::default();
    if settings.kafka.create_topics {
        kafka::ensure_topics(&settings, &Topic::ALL).await?;
    }
    safeclock_common::metrics::register_build_info(&registry)?;
    let consumer_metrics = ConsumerMetrics::register(&registry)?;
    let deps = ServiceDeps {
        settings: settings.clone(),
        registry: registry.clone(),
        readiness: readiness.clone(),
        time,
    };
    let mut tasks = JoinSet::new();
    let (ops_addr, ops_task) = ops::bind(
        ops_listen,
        &settings.ops.server,
        registry.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    tasks.spawn(async move { ops_task.await? });
    for s in service.expand(&settings) {
        let (deps, m, token) = (deps.clone(), consumer_metrics.clone(), shutdown.clone());
        match s {
            Service::Clock => tasks.spawn(safeclock_clock::run(deps, m, token)),
            Service::Escalator => tasks.spawn(safeclock_escalator::run(deps, m, token)),
            Service::Exporter => tasks.spawn(safeclock_exporter::run(deps, m, token)),
            Service::Intake => tasks.spawn(safeclock_intake::run(deps, m, token)),
            Service::All => unreachable!("expanded above"),
        };
    }
    Ok(Running {
        ops_addr,
        registry,
        readiness,
        tasks,
        shutdown,
        grace: settings.shutdown.grace_period(),
    })
}
