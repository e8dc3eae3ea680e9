//! Shutdown as an argument.
//!
//! Every long-running task takes a [`CancellationToken`]; nothing reads signals itself. The
//! binary cancels the token on SIGINT or SIGTERM, tests cancel it directly, and tasks get a grace
//! period to drain in-flight work and commit offsets before they are aborted.

use std::time::Duration;

use tokio::task::JoinSet;
pub use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
            _ = terminate => tracing::info!("SIGTERM received, shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
}

/// Waits for every task in `tasks`. When `token` is cancelled the tasks get `grace` to finish on
/// their own before the rest are aborted. The first task error (or panic) cancels the others and
/// is returned.
///
/// # Errors
/// The first error returned by a task, or a panic/abort turned into an error.
pub async fn supervise(
    mut tasks: JoinSet<anyhow::Result<()>>,
    token: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut first_error: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {
                    if !token.is_cancelled() {
                        tracing::warn!("a service task stopped on its own; shutting down the rest");
                        token.cancel();
                    }
                }
                Some(Ok(Err(e))) => {
                    tracing::error!(error.message = %format!("{e:#}"), "service task failed");
                    first_error.get_or_insert(e);
                    token.cancel();
                }
                Some(Err(e)) => {
                    tracing::error!(error.message = %e, "service task panicked or was aborted");
                    first_error.get_or_insert_with(|| anyhow::anyhow!("service task panicked: {e}"));
                    token.cancel();
                }
            },
            _ = token.cancelled() => {
                let deadline = tokio::time::sleep(grace);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        joined = tasks.join_next() => match joined {
                            None => break,
                            Some(Ok(Err(e))) => { first_error.get_or_insert(e); }
                            Some(Err(e)) if !e.is_cancelled() => {
                                first_error.get_or_insert_with(|| anyhow::anyhow!("service task panicked: {e}"));
                            }
                            Some(_) => {}
                        },
                        _ = &mut deadline => {
                            tracing::warn!(remaining = tasks.len(), "grace period over, aborting remaining tasks");
                            tasks.abort_all();
                            while tasks.join_next().await.is_some() {}
                            break;
                        }
                    }
                }
                break;
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
