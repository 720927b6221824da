//! The one shutdown signal every role waits on: SIGINT or SIGTERM.

use tokio::signal::unix::SignalKind;

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal() {
    let mut term = match tokio::signal::unix::signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM, only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
