//! Recurrent policies over loopback gRPC: on the memory task (a cue, blank steps, a
//! query whose rewarded answer is the cue) LSTM and GRU policies learn to answer far
//! above chance, and a feedforward policy with the same budget cannot.

use std::time::Instant;

use spur_core::config::CoreKind;
use spur_learner::TrainSummary;
use spur_tests::{tiny_memory, train_two_actors, TestLearner};

const BUDGET: u64 = 60_000;

async fn train(core: CoreKind, name: &str) -> anyhow::Result<TrainSummary> {
    train_with(tiny_memory(core, BUDGET), name).await
}

async fn train_with(config: spur_core::Config, name: &str) -> anyhow::Result<TrainSummary> {
    let core = config.model.core;
    let started = Instant::now();
    let (summary, _) = train_two_actors(&config, name).await?;
    eprintln!(
        "{core:?}: mean return {:.3}, success {:.3} after {} env steps in {:.1} s",
        summary.episode_return_mean,
        summary.success_rate,
        summary.env_steps,
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lstm_policy_remembers_the_cue() -> anyhow::Result<()> {
    let s = train(CoreKind::Lstm, "memory-lstm").await?;
    assert!(
        s.episode_return_mean > 0.95,
        "mean return {} (chance is 0.5)",
        s.episode_return_mean
    );
    Ok(())
}

/// The GRU learns with each minibatch's sequences split in two shares on two
/// threads (`learner.threads`); the helper threads ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gru_policy_remembers_the_cue() -> anyhow::Result<()> {
    let mut config = tiny_memory(CoreKind::Gru, BUDGET);
    config.learner.threads = 2;
    let helpers_before = spur_learner::helper_cpu_seconds();
    let s = train_with(config, "memory-gru").await?;
    assert!(
        s.episode_return_mean > 0.95,
        "mean return {} (chance is 0.5)",
        s.episode_return_mean
    );
    assert!(spur_learner::helper_cpu_seconds() > helpers_before);
    Ok(())
}

/// The other estimators train recurrent policies too, from the sequence pass's
/// values and log-probabilities: GAE with an LSTM, and UI-S1's critic-free group
/// advantages (episodes of a group share their cue) with a GRU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurrent_policies_learn_with_gae_and_group_advantages() -> anyhow::Result<()> {
    use spur_core::config::AdvantageKind;
    let mut gae = tiny_memory(CoreKind::Lstm, BUDGET);
    gae.learner.advantage = AdvantageKind::Gae;
    let mut uis1 = tiny_memory(CoreKind::Gru, BUDGET);
    uis1.learner.advantage = AdvantageKind::Uis1;
    uis1.actor.group_size = 4;
    for (config, name) in [(gae, "memory-lstm-gae"), (uis1, "memory-gru-uis1")] {
        let s = train_with(config, name).await?;
        assert!(
            s.episode_return_mean > 0.9,
            "{name}: mean return {} (chance is 0.5)",
            s.episode_return_mean
        );
    }
    Ok(())
}

/// The same budget and network without a core: the query looks the same whatever
/// the cue was, so the policy stays at chance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedforward_policy_stays_at_chance() -> anyhow::Result<()> {
    let s = train(CoreKind::None, "memory-none").await?;
    assert!(
        s.episode_return_mean < 0.65,
        "mean return {} (chance is 0.5)",
        s.episode_return_mean
    );
    Ok(())
}

/// A chunk of the memory task for a learner whose policy holds `state_size` floats
/// of state per env: 16 steps of 2 envs, valid in every other respect.
fn memory_chunk(incarnation: u64, state_size: usize) -> spur_core::trajectory::Chunk {
    spur_core::trajectory::Chunk {
        policy_version: 0,
        learner_incarnation: incarnation,
        ..spur_core::trajectory::Chunk::blank("vandal", 16, 2, 3, state_size)
    }
}

/// Pushes one chunk; the learner's acknowledgement or the status it answered with.
async fn push(
    learner: &TestLearner,
    chunk: spur_proto::v1::TrajectoryChunk,
) -> Result<spur_proto::v1::PushAck, tonic::Status> {
    let mut client = learner
        .client()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut acks = client
        .push_trajectories(tokio_stream::iter(vec![chunk]))
        .await?
        .into_inner();
    acks.message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("the stream ended without an answer"))
}

/// A recurrent learner refuses chunks whose initial state is missing, of the wrong
/// shape or not finite, naming the field, and takes a well-formed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_initial_state_is_refused_naming_the_field() -> anyhow::Result<()> {
    use spur_core::tensor::encode;
    let learner = TestLearner::start(tiny_memory(CoreKind::Lstm, 0), "memory-malformed").await?;
    let incarnation = learner.status().await?.learner_incarnation;
    let s = 64; // an LSTM of 32: hidden and cell state
    let good = memory_chunk(incarnation, s);
    let mut missing = good.to_proto();
    missing.initial_state = None;
    let mut short = good.to_proto();
    short.initial_state = Some(encode(&[2, s - 1], &vec![0.0f32; 2 * (s - 1)]));
    let mut nan = good.to_proto();
    let mut values = vec![0.0f32; 2 * s];
    values[70] = f32::NAN;
    nan.initial_state = Some(encode(&[2, s], &values));
    for (chunk, what) in [(missing, "is missing"), (short, "shape"), (nan, "finite")] {
        let err = push(&learner, chunk).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
        assert!(
            err.message().contains("initial_state") && err.message().contains(what),
            "{what}: {}",
            err.message()
        );
    }
    let ack = push(&learner, good.to_proto()).await?;
    assert_eq!(ack.accepted_chunks, 1);
    let status = learner.status().await?;
    assert_eq!(status.dropped_malformed_chunks, 3);
    learner.stop().await?;
    Ok(())
}
