//! Learner and actors over loopback gRPC actually learn, and late joiners are served.

use std::time::Duration;

use safetensors::{Dtype, SafeTensors};
use spur_core::config::WeightsDtype;
use spur_core::model::ActorCritic;
use spur_proto::v1::SubscribeWeightsRequest;
use spur_tests::{spawn_actor, tiny_cartpole, train_two_actors, TestLearner};

/// Two actors and a learner with a tiny MLP on cartpole: the mean return climbs far
/// above a random policy's (about 22) within a small budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_return_rises_well_above_random() -> anyhow::Result<()> {
    learns(tiny_cartpole(200_000), "learns").await
}

/// The same with GAE advantages instead of V-trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_with_gae_advantages() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(200_000);
    config.learner.advantage = spur_core::config::AdvantageKind::Gae;
    learns(config, "learns-gae").await
}

/// GAE from the actors' own values and log-probabilities (`learner.actor_estimates`):
/// the learner skips its pass over the batch, so its proximal policy is the acting
/// one and the measured KL from behaviour to proximal is exactly 0 in every update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_with_the_actors_values() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(200_000);
    config.learner.advantage = spur_core::config::AdvantageKind::Gae;
    config.learner.actor_estimates = true;
    learns(config, "learns-actor-values").await?;
    let metrics = metrics_of("learns-actor-values")?;
    let kls: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).map(|v| v["behaviour_kl"].as_f64()))
        .collect::<Result<Option<Vec<f64>>, _>>()?
        .expect("a behaviour_kl column");
    assert!(!kls.is_empty());
    assert!(kls.iter().all(|&k| k == 0.0), "{kls:?}");
    Ok(())
}

/// The critic on normalised returns (`learner.normalize_returns`), with the values
/// the actors' critic gave (scaled back by the learner): it learns, and the
/// statistics took in every trained step's target and found CartPole's returns'
/// spread (tens, not the unit scale the critic learns on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_with_normalized_returns() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(200_000);
    config.learner.advantage = spur_core::config::AdvantageKind::Gae;
    config.learner.actor_estimates = true;
    config.learner.normalize_returns = true;
    learns(config, "learns-normalized").await?;
    let metrics = metrics_of("learns-normalized")?;
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("at least one update"))?;
    assert_eq!(
        last["return_count"].as_f64(),
        last["env_steps"].as_f64(),
        "{last}"
    );
    assert!(
        last["return_std"].as_f64().expect("return_std") > 5.0,
        "{last}"
    );
    Ok(())
}

/// Autograd instead of the MLP's closed form, each minibatch step and the pass
/// before each update split over two threads (`learner.threads`): it learns, and the
/// helper threads ran (they count their CPU time share by share).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_with_steps_split_over_two_threads() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(200_000);
    config.learner.explicit_mlp_gradients = false;
    config.learner.threads = 2;
    let helpers_before = spur_learner::helper_cpu_seconds();
    learns(config, "learns-split").await?;
    assert!(
        spur_learner::helper_cpu_seconds() > helpers_before,
        "the helper threads trained"
    );
    Ok(())
}

/// UI-S1's critic-free estimator over groups of 4 episodes that share a start state,
/// with a spread filter that drops groups whose returns lie close together (early
/// short episodes, and groups that all reach the step limit): it still learns, and
/// `metrics.jsonl` counts the groups it kept and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_with_uis1_group_advantages() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(200_000);
    config.learner.advantage = spur_core::config::AdvantageKind::Uis1;
    config.actor.group_size = 4;
    config.learner.group_min_spread = 5.0;
    learns(config, "learns-uis1").await?;
    let metrics = metrics_of("learns-uis1")?;
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("at least one update"))?;
    let (kept, dropped) = (
        last["groups_kept"].as_u64().expect("groups_kept column"),
        last["groups_dropped"]
            .as_u64()
            .expect("groups_dropped column"),
    );
    assert!(kept > 0 && dropped > 0, "kept {kept}, dropped {dropped}");
    // An update that trained on nothing (every group of its batch dropped) has no
    // loss to report (null), and one that trained has numbers.
    for line in metrics.lines() {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let trained = row["minibatch_steps"].as_u64().expect("minibatch_steps") > 0;
        for column in ["policy_loss", "entropy", "grad_norm"] {
            assert_eq!(row[column].is_f64(), trained, "{column} in {row}");
        }
    }
    Ok(())
}

/// V-trace plus UI-S1's episode-level term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_with_hybrid_advantages() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(200_000);
    config.learner.advantage = spur_core::config::AdvantageKind::Hybrid;
    config.actor.group_size = 4;
    learns(config, "learns-hybrid").await
}

/// Weights go to actors as bfloat16 (`learner.weights_dtype`): what a subscriber
/// receives after updates holds only BF16 tensors and loads into a policy, and two
/// actors acting on the rounded weights still learn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartpole_learns_from_bf16_weights() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(0);
    config.learner.weights_dtype = WeightsDtype::Bf16;
    let learner = TestLearner::start(config.clone(), "bf16-payload").await?;
    let (stop, actor) = spawn_actor(&config, &learner.addr, 0);
    let trained = learner
        .wait_for(Duration::from_secs(60), "version 2", |s| {
            s.policy_version >= 2
        })
        .await?;
    let mut weights = learner
        .client()
        .await?
        .subscribe_weights(SubscribeWeightsRequest::default())
        .await?
        .into_inner();
    let mut payload = Vec::new();
    let version = loop {
        let piece = weights.message().await?.expect("a weights piece");
        payload.extend_from_slice(&piece.data);
        if piece.chunk_index + 1 == piece.num_chunks {
            break piece.version;
        }
    };
    assert!(version >= trained.policy_version);
    let st = SafeTensors::deserialize(&payload)?;
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::BF16, "{name}");
    }
    let spec = spur_env_bridge::env_spec(&config.env)?;
    ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu)?.load_safetensors(&payload)?;
    let _ = stop.send(());
    actor.await??;
    learner.stop().await?;

    config.stop.env_steps = 200_000;
    learns(config, "learns-bf16").await
}

/// `metrics.jsonl` of the test run `name` (the run directory [`learns`] trained in).
fn metrics_of(name: &str) -> std::io::Result<String> {
    std::fs::read_to_string(spur_tests::test_run_dir(name).join("metrics.jsonl"))
}

async fn learns(config: spur_core::Config, name: &str) -> anyhow::Result<()> {
    let (summary, actors) = train_two_actors(&config, name).await?;
    for s in actors {
        assert!(
            s.training_finished,
            "actors learn from the learner that training ended"
        );
        assert!(s.rollout.env_steps > 0);
    }
    assert!(summary.env_steps >= 200_000);
    assert!(
        summary.episode_return_mean > 100.0,
        "mean return {} after {} steps",
        summary.episode_return_mean,
        summary.env_steps
    );
    assert!(summary.checkpoint.exists());
    Ok(())
}

/// An actor that joins after several updates starts from the latest weights, and the
/// learner trains on its chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_actor_gets_latest_weights_and_is_used() -> anyhow::Result<()> {
    let config = tiny_cartpole(0);
    let learner = TestLearner::start(config.clone(), "late-join").await?;
    let (stop0, a0) = spawn_actor(&config, &learner.addr, 0);
    let before = learner
        .wait_for(Duration::from_secs(60), "version 5", |s| {
            s.policy_version >= 5
        })
        .await?;
    let (stop1, a1) = spawn_actor(&config, &learner.addr, 1);
    let joined = learner
        .wait_for(Duration::from_secs(60), "chunks from the late actor", |s| {
            s.actors
                .iter()
                .any(|a| a.actor_id == "actor-1" && a.chunks >= 3)
        })
        .await?;
    let late = joined
        .actors
        .iter()
        .find(|a| a.actor_id == "actor-1")
        .unwrap();
    assert!(
        late.first_policy_version >= before.policy_version,
        "the late actor acted first with version {} although {} was out",
        late.first_policy_version,
        before.policy_version
    );
    // Its chunks go into updates: training keeps advancing with both actors, and none
    // of the late actor's chunks are dropped as stale.
    let v = joined.policy_version;
    let after = learner
        .wait_for(Duration::from_secs(60), "more updates", |s| {
            s.policy_version >= v + 3
        })
        .await?;
    assert_eq!(after.dropped_stale_chunks, 0);
    let _ = stop0.send(());
    let _ = stop1.send(());
    a0.await??;
    a1.await??;
    learner.stop().await?;
    Ok(())
}

/// UI-S1's semi-online mode: replaying keyroom expert trajectories (reward 1 per
/// step that matches the expert, one patch per episode, imitation on patched
/// steps), the policy comes to follow the expert far beyond a random policy's
/// fraction of a step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_online_replay_learns_to_follow_the_expert() -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("spur-semi-online-{}.jsonl", std::process::id()));
    let mut lines = Vec::new();
    let mut total_steps = 0;
    for seed in 0..200 {
        let t = spur_core::env::replay::keyroom_expert(4, None, seed)
            .expect("the scripted solver reaches the goal");
        total_steps += t.steps.len();
        lines.push(serde_json::to_string(&t)?);
    }
    std::fs::write(&path, lines.join("\n"))?;
    let mean_len = total_steps as f64 / 200.0;

    let mut config = tiny_cartpole(150_000);
    config.env.kind = spur_core::config::EnvKind::Replay;
    config.env.replay_path = path.display().to_string();
    config.learner.gamma = 0.5;
    config.learner.entropy_coef = 0.01;
    let (summary, _) = train_two_actors(&config, "semi-online").await?;
    let _ = std::fs::remove_file(&path);
    // The return counts matched steps; a random policy matches a fifth of its
    // actions and stops at the second mismatch.
    assert!(
        summary.episode_return_mean > 0.6 * mean_len,
        "matched {:.1} of {:.1} expert steps",
        summary.episode_return_mean,
        mean_len
    );
    Ok(())
}
