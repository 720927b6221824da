//! Bad input gets a clear error and the learner keeps serving everyone else; a
//! restarted learner takes its actors over, whose health says when they are ready.

use std::time::Duration;

use spur_core::tensor::encode;
use spur_core::trajectory::Chunk;
use spur_proto::v1::{SubscribeWeightsRequest, TrajectoryChunk};
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn malformed() -> TrajectoryChunk {
    // Claims 32 steps of 2 envs but carries observations for 3 envs.
    TrajectoryChunk {
        actor_id: "vandal".into(),
        policy_version: 1,
        rollout_len: 32,
        num_envs: 2,
        observations: Some(encode(&[33, 3, 4], &vec![0.0f32; 33 * 3 * 4])),
        ..Default::default()
    }
}

/// A chunk that passes every check: 32 steps of 3 cartpole envs, produced under
/// `incarnation`.
fn valid_chunk(incarnation: u64) -> TrajectoryChunk {
    Chunk {
        rewards: vec![1.0; 32 * 3],
        learner_incarnation: incarnation,
        ..Chunk::blank("vandal", 32, 3, 4, 0)
    }
    .to_proto()
}

/// Pushes one chunk and returns the learner's acknowledgement or error.
async fn push_one_result(
    client: &mut spur_proto::v1::learner_client::LearnerClient<tonic::transport::Channel>,
    chunk: TrajectoryChunk,
) -> Result<spur_proto::v1::PushAck, tonic::Status> {
    let mut acks = client
        .push_trajectories(tokio_stream::iter(vec![chunk]))
        .await?
        .into_inner();
    match acks.message().await? {
        Some(ack) => Ok(ack),
        None => Err(tonic::Status::unknown("the stream ended without an answer")),
    }
}

/// Pushes one chunk and returns the status the learner answers with.
async fn push_one(
    client: &mut spur_proto::v1::learner_client::LearnerClient<tonic::transport::Channel>,
    chunk: TrajectoryChunk,
) -> tonic::Status {
    let mut acks = match client
        .push_trajectories(tokio_stream::iter(vec![chunk]))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return status,
    };
    match acks.message().await {
        Ok(Some(ack)) => panic!("a malformed chunk was accepted: {ack:?}"),
        Ok(None) => panic!("the stream ended without an error"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunk_is_rejected_and_others_keep_training() -> anyhow::Result<()> {
    let config = tiny_cartpole(0);
    let learner = TestLearner::start(config.clone(), "malformed").await?;
    let (stop, actor) = spawn_actor(&config, &learner.addr, 0);
    let before = learner
        .wait_for(Duration::from_secs(60), "a few updates", |s| {
            s.policy_version >= 3
        })
        .await?;

    let mut client = learner.client().await?;
    let err = push_one(&mut client, malformed()).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("observations"), "{}", err.message());

    // A NaN reward is refused too, naming the field: the same chunk without the NaN
    // is accepted (it is from another incarnation, so it is counted, not trained on).
    let ack = push_one_result(&mut client, valid_chunk(7)).await?;
    assert_eq!(ack.accepted_chunks, 1);
    assert_eq!(ack.learner_incarnation, before.learner_incarnation);
    let mut nan = valid_chunk(before.learner_incarnation);
    let mut rewards = vec![1.0f32; 96];
    rewards[40] = f32::NAN;
    nan.rewards = Some(encode(&[32, 3], &rewards));
    let err = push_one(&mut client, nan).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("rewards"), "{}", err.message());

    // The well-behaved actor keeps being served and trained on.
    let after = learner
        .wait_for(Duration::from_secs(60), "training to continue", |s| {
            s.policy_version >= before.policy_version + 3
        })
        .await?;
    // Every refusal and drop is counted with its reason.
    assert_eq!(after.dropped_malformed_chunks, 2);
    assert_eq!(after.dropped_steps_malformed, 32 * 2 + 32 * 3);
    assert_eq!(after.dropped_incarnation_chunks, 1);
    assert_eq!(after.dropped_steps_incarnation, 96);
    // Weights are still served to new subscribers.
    let mut weights = client
        .subscribe_weights(SubscribeWeightsRequest {
            actor_id: "observer".into(),
            have_version: 0,
            have_incarnation: 0,
        })
        .await?
        .into_inner();
    let first = weights.message().await?.expect("a weights piece");
    assert!(first.version >= after.policy_version);

    let _ = stop.send(());
    actor.await??;
    learner.stop().await?;
    Ok(())
}

/// A learner that dies after its last checkpoint and comes back from it, behind the
/// versions the actor holds: the new incarnation takes the actor over and trains on.
/// (Before incarnations, the actor's "future" chunks were dropped forever.) The
/// learning-rate schedule, the clock and the return statistics go on from the
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_resumed_from_an_older_checkpoint_takes_over() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(0);
    config.learner.checkpoint_every = 2;
    config.learner.lr_anneal = true;
    config.learner.normalize_returns = true;
    config.stop.env_steps = 50_000_000; // far away: only the schedule's position matters
    let learner = TestLearner::start(config.clone(), "restart").await?;
    let addr = learner.addr.clone();
    let run_dir = learner.run_dir.clone();
    let (stop, actor) = spawn_actor(&config, &addr, 0);
    learner
        .wait_for(Duration::from_secs(60), "a few updates", |s| {
            s.policy_version >= 9
        })
        .await?;
    let first = learner.stop().await?;
    // Keep only an old checkpoint, as if the learner had died long after writing it.
    let ckpts = spur_core::checkpoint::list(&run_dir.join("checkpoints"))?;
    let (old, newer) = ckpts.split_first().expect("checkpoints were written");
    for p in newer {
        std::fs::remove_file(p)?;
    }
    let resumed_from = spur_core::checkpoint::load_file(old)?;
    assert!(resumed_from.version < first.policy_version);
    let meta = |k: &str| -> u64 { resumed_from.metadata[k].parse().unwrap() };
    let rows_before = metrics_rows(&run_dir);

    // Same port, resumed from the old checkpoint.
    let socket = addr.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind(&socket).await?;
    let (stop_l, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = spur_learner::LearnerOptions {
        run_dir: run_dir.clone(),
        resume: true,
        discard_chunks: false,
    };
    let second = tokio::spawn(spur_learner::serve(config.clone(), opts, listener, async {
        let _ = stopped.await;
    }));
    spur_tests::wait_serving(&addr).await?;
    let mut client = spur_proto::v1::learner_client::LearnerClient::connect(addr.clone()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = client
            .get_status(spur_proto::v1::StatusRequest {})
            .await?
            .into_inner();
        if s.policy_version >= resumed_from.version + 4 {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "training did not resume: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Counters continue from the checkpoint, and trained steps are counted apart
    // from received ones.
    assert!(s.updates >= meta("spur.updates") + 4, "{s:?}");
    assert!(s.env_steps > meta("spur.env_steps"), "{s:?}");
    assert!(s.env_steps_received >= s.env_steps, "{s:?}");
    assert_ne!(s.learner_incarnation, meta("spur.learner_incarnation"));

    let _ = stop.send(());
    let _ = stop_l.send(());
    second.await??;
    let summary = actor.await??;
    assert!(summary.rollout.discarded_chunks <= 1, "{summary:?}");

    // The lr schedule and the clock go on where the checkpoint left them.
    let rows = metrics_rows(&run_dir);
    let resumed = &rows[rows_before.len()];
    assert_eq!(resumed["updates"].as_u64(), Some(meta("spur.updates") + 1));
    let before_update =
        resumed["env_steps"].as_f64().unwrap() - resumed["batch_steps"].as_f64().unwrap();
    let want_lr = config.learner.lr * (1.0 - before_update / config.stop.env_steps as f64);
    assert!(
        (resumed["lr"].as_f64().unwrap() - want_lr).abs() < 1e-12,
        "{resumed}"
    );
    let saved_time: f64 = resumed_from.metadata["spur.time_s"].parse()?;
    assert!(
        resumed["time_s"].as_f64().unwrap() >= saved_time,
        "{resumed}"
    );
    // Every trained step's value target went into the statistics, before and after.
    let saved_count: f64 = resumed_from.metadata["spur.return_count"].parse()?;
    assert_eq!(saved_count, meta("spur.env_steps") as f64);
    assert_eq!(
        resumed["return_count"].as_f64(),
        Some(saved_count + resumed["batch_steps"].as_f64().unwrap()),
        "{resumed}"
    );
    Ok(())
}

fn metrics_rows(run_dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics rows are JSON"))
        .collect()
}

/// The status `spur.v1.Actor` has on the actor's health port, None while it does not
/// answer.
async fn actor_health(addr: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let req = HealthCheckRequest {
        service: spur_actor::HEALTH_SERVICE.into(),
    };
    let status = client.check(req).await.ok()?.into_inner().status;
    ServingStatus::try_from(status).ok()
}

/// Polls the actor's health until it reports `want`, failing after a minute.
async fn wait_actor_health(addr: &str, want: ServingStatus) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = actor_health(addr).await;
        if now == Some(want) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the actor's health never said {want:?}; last {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The actor's readiness follows its learner: NOT_SERVING while no learner answers,
/// SERVING once it acts with the learner's weights over an open stream, NOT_SERVING
/// while the learner is gone, SERVING again under the learner's next incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_health_follows_its_learner() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(0);
    config.learner.checkpoint_every = 2;
    config.actor.max_backoff_ms = 200;
    let run_dir = spur_tests::test_run_dir("actor-health");
    let _ = std::fs::remove_dir_all(&run_dir);
    // The learner's port is taken before any learner serves on it.
    let held = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let learner_addr = held.local_addr()?.to_string();
    let health = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let health_addr = health.local_addr()?.to_string();
    let (stop_actor, actor_stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = spur_actor::ActorOptions {
        actor_id: "actor-health".into(),
        index: Some(0),
        learner_addr: Some(format!("http://{learner_addr}")),
    };
    let actor = tokio::spawn(spur_actor::serve(
        config.clone(),
        opts,
        Some(health),
        async {
            let _ = actor_stopped.await;
        },
    ));
    // Without a learner there are no weights: the first answer is NOT_SERVING.
    let first = loop {
        if let Some(s) = actor_health(&health_addr).await {
            break s;
        }
        assert!(!actor.is_finished(), "the actor stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first, ServingStatus::NotServing);

    let start_learner = |listener, resume| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let opts = spur_learner::LearnerOptions {
            run_dir: run_dir.clone(),
            resume,
            discard_chunks: false,
        };
        let handle = tokio::spawn(spur_learner::serve(config.clone(), opts, listener, async {
            let _ = stopped.await;
        }));
        (stop, handle)
    };
    let (stop, learner) = start_learner(held, false);
    wait_actor_health(&health_addr, ServingStatus::Serving).await?;

    // The learner goes away: the actor reconnects and is not ready meanwhile.
    let _ = stop.send(());
    learner.await??;
    wait_actor_health(&health_addr, ServingStatus::NotServing).await?;

    // A new learner on the same address, from the checkpoint: ready again.
    let listener = tokio::net::TcpListener::bind(&learner_addr).await?;
    let (stop, learner) = start_learner(listener, true);
    wait_actor_health(&health_addr, ServingStatus::Serving).await?;

    let _ = stop_actor.send(());
    let summary = actor.await??;
    assert!(summary.push.reconnects >= 1, "{summary:?}");
    // The health port closes with the actor.
    assert_eq!(actor_health(&health_addr).await, None);
    let _ = stop.send(());
    learner.await??;
    Ok(())
}

/// An actor whose weight stream was down when training ended (it was redialing) still
/// hears that it ended when it comes back: the learner keeps serving until every actor
/// that sent chunks lately has been told, then ends without waiting for its drain
/// deadline. Before, the learner was gone by then and the actor redialed for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_away_when_training_ends_is_still_told() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(96 * 2);
    config.learner.batch_steps = 96;
    config.learner.epochs = 1;
    config.learner.minibatches = 1;
    config.run.drain_timeout_ms = 120_000;
    let learner = TestLearner::start(config, "told-late").await?;
    let mut client = learner.client().await?;
    // Chunks of one "actor" that never subscribes while training runs.
    let finished = loop {
        let s = learner.status().await?;
        if s.training_finished {
            break s;
        }
        let mut chunk = valid_chunk(s.learner_incarnation);
        chunk.policy_version = s.policy_version;
        match push_one_result(&mut client, chunk).await {
            Ok(ack) => assert_eq!(ack.accepted_chunks, 1),
            // The budget was reached between the status and the push.
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status}"),
        }
    };
    assert!(finished.env_steps >= 96 * 2);
    // A second of redial backoff, then the actor subscribes again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !learner.handle.is_finished(),
        "the learner waits for the actor"
    );
    let mut weights = learner
        .client()
        .await?
        .subscribe_weights(SubscribeWeightsRequest {
            actor_id: "vandal".into(),
            have_version: finished.policy_version,
            have_incarnation: finished.learner_incarnation,
        })
        .await?
        .into_inner();
    let piece = weights.message().await?.expect("the final version");
    assert!(piece.training_finished && piece.version == finished.policy_version);
    // Told: the learner ends now, far within its 2-minute drain.
    let summary = tokio::time::timeout(Duration::from_secs(20), learner.handle).await???;
    assert!(summary.env_steps >= 96 * 2);
    Ok(())
}

/// A learner told to discard what it takes (the ingest benchmark's) acknowledges,
/// counts and dequeues every chunk but trains on none and keeps none: five chunks,
/// each a whole batch, leave the weights at their first version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarding_learner_accepts_every_chunk_and_trains_on_none() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(0);
    // One valid chunk (32 steps of 3 envs) is a batch: kept, it would be trained on.
    config.learner.batch_steps = 96;
    let learner = TestLearner::start_discarding(config, "discarding-learner").await?;
    let mut client = learner.client().await?;
    let first = learner.status().await?;
    for _ in 0..5 {
        let ack = push_one_result(&mut client, valid_chunk(first.learner_incarnation)).await?;
        assert_eq!(ack.accepted_chunks, 1, "{ack:?}");
    }
    // Every chunk leaves the queue; give a kept batch time to be trained on.
    learner
        .wait_for(Duration::from_secs(30), "the queue to empty", |s| {
            s.queue_depth == 0
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = learner.status().await?;
    assert_eq!(after.env_steps_received, 5 * 96, "{after:?}");
    assert_eq!(after.updates, 0, "{after:?}");
    assert_eq!(after.env_steps, 0, "{after:?}");
    assert_eq!(after.policy_version, first.policy_version, "{after:?}");
    learner.stop().await?;
    Ok(())
}
