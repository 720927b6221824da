//! The environment bridge end to end: Gymnasium envs served by `python -m spur_bridge`
//! and stepped over real gRPC, compared with stepping the same envs directly in
//! Python; bad requests; a vanished server; and NetHack through an actor, with its
//! messages reaching the reward service.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use spur_core::config::{Config, EnvKind};
use spur_core::env::remote::{python, BridgeProcess};
use spur_core::env::{EnvBatch, RemoteBatch, StepOutcome};
use spur_core::EnvError;
use spur_proto::v1::env_service_client::EnvServiceClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{RenderRequest, ResetRequest, RewardStatusRequest, StepRequest};
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner};

fn gym_config(gym_id: &str, num_envs: u32) -> Config {
    let mut c = tiny_cartpole(0);
    c.env.kind = EnvKind::Gym;
    c.env.gym_id = gym_id.into();
    c.env.num_envs = num_envs;
    c
}

/// Resets every env with `seeds[i]`, then steps with `actions[t]`, resetting an ended
/// env with the next seed of `more_seeds`; returns every observation seen, in order.
fn play(
    batch: &mut dyn EnvBatch,
    seeds: &[u64],
    actions: &[Vec<i64>],
    more_seeds: &[u64],
) -> Vec<Vec<f32>> {
    let n = batch.num_envs();
    let d = batch.spec().obs_dim;
    let mut obs = vec![0.0; n * d];
    let mut texts = vec![String::new(); n];
    let mut outcomes = vec![StepOutcome::default(); n];
    let all: Vec<usize> = (0..n).collect();
    batch.reset(&all, seeds, &mut obs).unwrap();
    let mut seen = vec![obs.clone()];
    let mut next_seed = more_seeds.iter();
    for a in actions {
        batch.step(a, &mut obs, &mut texts, &mut outcomes).unwrap();
        seen.push(obs.clone());
        let ended: Vec<usize> = (0..n)
            .filter(|&i| outcomes[i].terminated || outcomes[i].truncated)
            .collect();
        if !ended.is_empty() {
            let s: Vec<u64> = ended.iter().map(|_| *next_seed.next().unwrap()).collect();
            batch.reset(&ended, &s, &mut obs).unwrap();
            seen.push(obs.clone());
        }
    }
    seen
}

/// The same protocol as `play`, run by Gymnasium directly in Python (no bridge).
const DIRECT: &str = r#"
import json, sys
import gymnasium as gym
import numpy as np
job = json.load(sys.stdin)
envs = [gym.make(job["id"]) for _ in job["seeds"]]
obs = [np.asarray(e.reset(seed=s)[0], dtype=np.float32) for e, s in zip(envs, job["seeds"])]
seen = [np.concatenate(obs).tolist()]
more = iter(job["more_seeds"])
for actions in job["actions"]:
    ended = []
    for i, (e, a) in enumerate(zip(envs, actions)):
        o, r, term, trunc, _ = e.step(a)
        obs[i] = np.asarray(o, dtype=np.float32)
        if term or trunc:
            ended.append(i)
    seen.append(np.concatenate(obs).tolist())
    if ended:
        for i in ended:
            obs[i] = np.asarray(envs[i].reset(seed=next(more))[0], dtype=np.float32)
        seen.append(np.concatenate(obs).tolist())
json.dump(seen, sys.stdout)
"#;

#[test]
fn cartpole_through_the_bridge_matches_gymnasium() {
    // Two bridge processes of two envs each: offsets and the split are exercised.
    let mut config = gym_config("CartPole-v1", 4);
    config.env.servers = 2;
    let mut batch = RemoteBatch::connect(&config.env, 4).expect("bridges start");
    assert_eq!(batch.spec().obs_dim, 4);
    assert_eq!(batch.spec().num_actions, 2);
    assert_eq!(batch.spec().max_episode_steps, 500);

    let seeds = [11u64, 12, 13, 14];
    // A fixed, uneven action pattern: episodes end at different steps.
    let actions: Vec<Vec<i64>> = (0..120)
        .map(|t| (0..4).map(|i| ((t * (i + 2) / 3 + i) % 2) as i64).collect())
        .collect();
    let more_seeds: Vec<u64> = (100..400).collect();
    let through_bridge = play(&mut batch, &seeds, &actions, &more_seeds);

    let job = serde_json::json!({
        "id": "CartPole-v1", "seeds": seeds, "actions": actions, "more_seeds": more_seeds,
    });
    let mut child = Command::new(python(&config.env))
        .args(["-c", DIRECT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the venv python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "direct gymnasium run failed");
    let direct: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();

    assert!(
        through_bridge.len() > actions.len() + 3,
        "some episodes ended and were reset"
    );
    assert_eq!(through_bridge.len(), direct.len(), "the same episode ends");
    for (t, (a, b)) in through_bridge.iter().zip(&direct).enumerate() {
        assert_eq!(a, b, "observations differ at record {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let config = gym_config("CartPole-v1", 4);
    let (bridge, addr) = BridgeProcess::spawn(&config.env, 4).unwrap();
    let mut c = EnvServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let e = c
        .step(StepRequest {
            actions: vec![0, 1, 0, 1],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("reset it first"), "{e:?}");

    let e = c
        .reset(ResetRequest {
            env_indices: vec![],
            seeds: vec![1, 2],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("4 envs to reset but 2 seeds"), "{e:?}");
    let e = c
        .reset(ResetRequest {
            env_indices: vec![7],
            seeds: vec![1],
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("env index 7 is outside 0..3"), "{e:?}");

    c.reset(ResetRequest {
        env_indices: vec![],
        seeds: vec![1, 2, 3, 4],
    })
    .await
    .unwrap();
    let e = c
        .step(StepRequest {
            actions: vec![0, 1],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("expected 4 actions (one per env), got 2"),
        "{e:?}"
    );
    let e = c
        .step(StepRequest {
            actions: vec![0, 1, 5, 0],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("action 5 for env 2 is outside 0..1"),
        "{e:?}"
    );
    let e = c.render(RenderRequest { env_index: 9 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // CartPole has no picture.
    let r = c
        .render(RenderRequest { env_index: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(r.text.is_empty());
    // The server kept going: a good step still works.
    let r = c
        .step(StepRequest {
            actions: vec![0, 1, 1, 0],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rewards.len(), 4);
    assert_eq!(r.observations.len(), 4 * 4 * 4);
    drop(bridge);

    // An unknown id: the bridge says so, and the actor-side error carries it.
    let config_bad = gym_config("NoSuchEnv-v7", 2);
    let err = tokio::task::spawn_blocking(move || RemoteBatch::connect(&config_bad.env, 2).err())
        .await
        .unwrap()
        .expect("an unknown env id fails");
    assert!(matches!(err, EnvError::Spawn { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("unknown environment id 'NoSuchEnv-v7'"),
        "{err}"
    );
}

#[test]
fn a_vanished_or_mismatched_server_is_an_error() {
    let config = gym_config("CartPole-v1", 2);
    let (bridge, addr) = BridgeProcess::spawn(&config.env, 2).unwrap();

    // A server of another env id is refused at connect.
    let mut other = gym_config("Acrobot-v1", 2);
    other.env.remote = vec![addr.clone()];
    let err = RemoteBatch::connect(&other.env, 2)
        .err()
        .expect("the ids differ");
    assert!(
        err.to_string()
            .contains("serves CartPole-v1, not env.gym_id = Acrobot-v1"),
        "{err}"
    );
    // So is a wrong env count.
    let mut remote = config.clone();
    remote.env.remote = vec![addr];
    let err = RemoteBatch::connect(&remote.env, 4)
        .err()
        .expect("2 envs, not 4");
    assert!(err.to_string().contains("hold 2 envs in all"), "{err}");

    let mut batch = RemoteBatch::connect(&remote.env, 2).unwrap();
    let mut obs = vec![0.0; 8];
    batch.reset(&[0, 1], &[1, 2], &mut obs).unwrap();
    drop(bridge); // the server goes away mid-run
    let mut texts = vec![String::new(); 2];
    let mut outcomes = vec![StepOutcome::default(); 2];
    let err = batch
        .step(&[0, 1], &mut obs, &mut texts, &mut outcomes)
        .expect_err("nobody serves any more");
    assert!(matches!(err, EnvError::Server { .. }), "{err}");
}

/// NLE ignores Gymnasium's reset seed; the bridge seeds the game itself, so a seed
/// is a dungeon: grouped rollouts (UI-S1) compare episodes of one task.
#[test]
fn nethack_seeds_pick_the_dungeon() {
    for id in ["NetHackScore-v0", "MiniHack-Room-5x5-v0"] {
        let config = gym_config(id, 3);
        let mut batch = RemoteBatch::connect(&config.env, 3).unwrap();
        let d = batch.spec().obs_dim;
        let mut obs = vec![0.0; 3 * d];
        batch.reset(&[0, 1, 2], &[7, 7, 8], &mut obs).unwrap();
        // (`assert!`, not `assert_eq!`: a failure would print 700 floats.)
        assert!(obs[..d] == obs[d..2 * d], "{id}: one seed, one dungeon");
        assert!(
            obs[..d] != obs[2 * d..],
            "{id}: another seed, another dungeon"
        );
        let first = obs[..d].to_vec();
        batch.reset(&[2], &[7], &mut obs).unwrap();
        assert!(
            obs[2 * d..] == first[..],
            "{id}: the seed repeats its dungeon"
        );
        // `spur eval` draws NetHack's map: the hero is on it.
        let picture = batch.render_text(2).expect("NetHack renders");
        assert!(
            picture.contains('@') && picture.contains("HP "),
            "{picture}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nethack_messages_reach_the_reward_service() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let store = std::env::temp_dir().join(format!("spur-nethack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let mut config = gym_config("NetHackScore-v0", 4);
    config.model.hidden = vec![64];
    config.learner.batch_steps = 256;
    config.learner.minibatches = 2;
    config.learner.epochs = 1;
    config.actor.rollout_len = 16;
    config.intrinsic.enabled = true;
    config.reward_service.rules = "judges/nethack.rules".into();
    config.reward_service.goal = "prompts/nethack-score-goal.txt".into();
    config.reward_service.store = store.join("labels.redb").display().to_string();

    let spec = tokio::task::spawn_blocking({
        let env = config.env.clone();
        move || spur_core::env::env_spec(&env)
    })
    .await??;
    let names: Vec<&str> = spec.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["glyphs_crop", "blstats", "message"]);
    assert_eq!(spec.field("glyphs_crop").unwrap().1.shape, vec![9, 9]);
    assert!(spec.has_text);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reward_addr = format!("http://{}", listener.local_addr()?);
    config.reward_service.addr = reward_addr.clone();
    let (stop_rs, rs_stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(spur_reward_service::serve(
        config.clone(),
        spur_reward_service::ServiceOptions {
            root,
            run_dir: None,
        },
        listener,
        async {
            let _ = rs_stopped.await;
        },
    ));
    let learner = TestLearner::start(config.clone(), "nethack").await?;
    let (stop_actor, actor) = spawn_actor(&config, &learner.addr, 0);

    // A few hundred NetHack steps, trained on, with their messages judged.
    let l = learner
        .wait_for(Duration::from_secs(120), "NetHack steps and labels", |s| {
            s.env_steps >= 512 && s.policy_version >= 2 && s.reward_labels > 0
        })
        .await?;
    let mut rs = RewardServiceClient::connect(reward_addr).await?;
    let j = rs.get_status(RewardStatusRequest {}).await?.into_inner();
    assert!(
        j.texts_seen > 0 && j.labels > 0,
        "messages were judged: {j:?}"
    );
    assert!(
        l.reward_labels <= j.labels,
        "the learner holds only judged labels"
    );

    let _ = stop_actor.send(());
    let summary = actor.await??;
    assert!(summary.rollout.env_steps >= 512);
    learner.stop().await?;
    let _ = stop_rs.send(());
    service.await??;
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}

/// MiniHack's 5x5 room through the bridge, with the NetHack network: a random policy
/// finds the goal in about 60% of episodes at a return near 0.5 (step penalties);
/// a trained one always does, in a few steps, well within 100k steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minihack_room_is_learned_through_the_bridge() -> anyhow::Result<()> {
    let mut config = gym_config("MiniHack-Room-5x5-v0", 16);
    config.model.hidden = vec![128];
    config.learner.batch_steps = 2048;
    config.learner.epochs = 2;
    config.learner.minibatches = 4;
    config.learner.lr = 3e-4;
    config.learner.gamma = 0.999;
    config.learner.entropy_coef = 0.01;
    // Ends once the last 100 episodes average 0.9 (about 20k steps in our runs).
    config.stop.target_return = 0.9;
    config.stop.env_steps = 100_000;
    let learner = TestLearner::start(config.clone(), "minihack").await?;
    let (_stop, actor) = spawn_actor(&config, &learner.addr, 0);
    let summary = learner.handle.await??;
    assert!(actor.await??.training_finished);
    assert!(
        summary.env_steps < 100_000
            && summary.success_rate >= 0.95
            && summary.episode_return_mean >= 0.9,
        "success {} and return {} after {} steps",
        summary.success_rate,
        summary.episode_return_mean,
        summary.env_steps
    );
    Ok(())
}
