//! Prometheus `/metrics` for a role: an HTTP listener on `run.prometheus_listen`
//! (off when empty) that serves the gauges and counters the role records.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Starts serving `/metrics` on `listen` for `role`; nothing when `listen` is empty.
pub fn install(listen: &str, role: &str) -> anyhow::Result<()> {
    if listen.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("run.prometheus_listen: bad address {listen}"))?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("role", role)
        .install()
        .with_context(|| format!("cannot serve Prometheus metrics on {addr}"))?;
    tracing::info!(%addr, role, "serving Prometheus metrics");
    Ok(())
}

/// The address the `slot`-th child of `spur local` uses: the configured port plus
/// `slot`, so children on one machine do not collide.
pub fn child_listen(listen: &str, slot: u16) -> Option<String> {
    let mut addr: SocketAddr = listen.parse().ok()?;
    addr.set_port(addr.port().checked_add(slot)?);
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
        assert_eq!(child_listen("127.0.0.1:65535", 1), None);
    }
}
