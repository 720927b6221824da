//! Prometheus `/metrics` for a role: an HTTP listener on `run.prometheus_listen`
//! (off when empty) that serves the gauges and counters the role records. Port 0
//! lets the system pick a free port; the role then writes the address it bound to
//! the file named by `SPUR_METRICS_ADDR_FILE`, as `spur local` asks of its children.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The variable naming the file a role writes its bound metrics address into.
pub const ADDR_FILE_ENV: &str = "SPUR_METRICS_ADDR_FILE";

/// Starts serving `/metrics` on `listen` for `role`; nothing when `listen` is empty.
pub async fn install(listen: &str, role: &str) -> anyhow::Result<()> {
    if listen.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("run.prometheus_listen: bad address {listen}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve Prometheus metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let handle = PrometheusBuilder::new()
        .add_global_label("role", role)
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;
    tokio::spawn(upkeep(handle.clone()));
    let app =
        axum::Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the Prometheus listener stopped");
        }
    });
    if let Some(file) = std::env::var_os(ADDR_FILE_ENV) {
        spur_core::checkpoint::write_atomic(file.as_ref(), bound.to_string().as_bytes())
            .with_context(|| format!("cannot write ${ADDR_FILE_ENV}"))?;
    }
    tracing::info!(addr = %bound, role, "serving Prometheus metrics");
    Ok(())
}

/// Folds recorded histograms into their summaries now and then, so they stay small.
async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// The address the `slot`-th child of `spur local` uses: the configured port plus
/// `slot`, so children on one machine do not collide (port 0 stays 0: each child
/// binds a port of its own and reports it).
pub fn child_listen(listen: &str, slot: u16) -> Option<String> {
    let mut addr: SocketAddr = listen.parse().ok()?;
    if addr.port() != 0 {
        addr.set_port(addr.port().checked_add(slot)?);
    }
    Some(addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_get_consecutive_ports() {
        assert_eq!(
            child_listen("0.0.0.0:9100", 3).as_deref(),
            Some("0.0.0.0:9103")
        );
        assert_eq!(child_listen("", 1), None);
        assert_eq!(
            child_listen("127.0.0.1:0", 3).as_deref(),
            Some("127.0.0.1:0")
        );
        assert_eq!(child_listen("127.0.0.1:65535", 1), None);
    }
}
