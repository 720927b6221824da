//! spur-env-bridge: environments that live outside the process, in env servers
//! (`spur.v1.EnvService`, served by the Python bridge in `bridge/python`), and the one
//! place that builds any env batch a config describes.
//!
//! - `process`: bridge processes this side starts and supervises
//! - `wire`: connections to env servers, their specs and observations checked
//! - `batch`: [`RemoteBatch`], K envs per server, every server stepped at once
//!
//! With `env.remote` empty a batch starts `env.servers` bridge processes itself
//! (`python -m spur_bridge ... --exit-with-parent`) and stops them when dropped; with
//! addresses it connects to servers someone else runs (a Kubernetes sidecar).
//!
//! A server that dies (its process exits, or a call fails in transport) takes its
//! envs' episodes with it: there is nothing to retry mid-episode. The batch restarts
//! the bridge (for `env.remote`, reconnects to the address, resolving it again) with
//! backoff, up to `env.bridge_restarts` times per server over its life, and reports
//! the envs' episodes [`lost`](spur_core::env::StepOutcome::lost) so that the caller
//! starts new ones; once the budget is spent the failure is an error naming the
//! server. A server that answers out of protocol is an error at once.

mod batch;
mod process;
mod unix;
mod wire;

use std::sync::{Mutex, OnceLock};

use spur_core::config::{EnvConfig, EnvKind};
use spur_core::env::{make_env, EnvBatch, EnvSpec, LocalBatch};
use spur_core::EnvError;

pub use batch::{BridgeInfo, Place, RemoteBatch};
pub use process::{python, BridgeProcess};
pub use wire::EnvClient;

/// Builds `n` environments as the config describes, as one batch: in process for the
/// built-in kinds, through bridge processes or env servers for `gym`.
pub fn make_batch(config: &EnvConfig, n: usize) -> Result<Box<dyn EnvBatch>, EnvError> {
    match config.kind {
        EnvKind::Gym => Ok(Box::new(RemoteBatch::connect(config, n)?)),
        _ => Ok(Box::new(LocalBatch::new(
            (0..n).map(|_| make_env(config)).collect(),
        ))),
    }
}

/// The spec of the environment the config describes (for `gym`, asked of an env
/// server or a short-lived bridge process, once per process and config).
pub fn env_spec(config: &EnvConfig) -> Result<EnvSpec, EnvError> {
    match config.kind {
        EnvKind::Gym => gym_spec(config),
        _ => Ok(make_env(config).spec()),
    }
}

/// The spec of `config`'s gym env: asked of the first `env.remote` server, or of a
/// one-env bridge process started for the question. Cached per process.
fn gym_spec(config: &EnvConfig) -> Result<EnvSpec, EnvError> {
    static CACHE: OnceLock<Mutex<Vec<(EnvConfig, EnvSpec)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some((_, s)) = cache
        .lock()
        .expect("the spec cache is never poisoned")
        .iter()
        .find(|(c, _)| c == config)
    {
        return Ok(s.clone());
    }
    // A thread of its own, so this works from inside an async runtime as well.
    let spec = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<EnvSpec, EnvError> {
                let rt = wire::runtime()?;
                let (addr, _process) = match config.remote.first() {
                    Some(a) => (a.clone(), None),
                    None => {
                        let (p, a) = BridgeProcess::spawn(config, 1)?;
                        (a, Some(p))
                    }
                };
                let (_, reply) = rt.block_on(wire::connect(&addr))?;
                wire::to_spec(&addr, &reply)
            })
            .join()
            .unwrap_or_else(|_| Err(EnvError::Config("the spec query panicked".into())))
    })?;
    cache
        .lock()
        .expect("the spec cache is never poisoned")
        .push((config.clone(), spec.clone()));
    Ok(spec)
}
