//! Bad input gets a clear error and the learner keeps serving everyone else.

use std::time::Duration;

use spur_core::tensor::encode;
use spur_proto::v1::{SubscribeWeightsRequest, TrajectoryChunk};
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner};
use tonic::Code;

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

    // A NaN reward is refused too, naming the field.
    let mut nan = malformed();
    nan.num_envs = 3;
    nan.rewards = Some(encode(&[32, 3], &vec![f32::NAN; 96]));
    let err = push_one(&mut client, nan).await;
    assert_eq!(err.code(), Code::InvalidArgument);

    // The well-behaved actor keeps being served and trained on.
    let after = learner
        .wait_for(Duration::from_secs(60), "training to continue", |s| {
            s.policy_version >= before.policy_version + 3
        })
        .await?;
    assert!(after.actors.iter().all(|a| a.actor_id != "vandal"));
    // Weights are still served to new subscribers.
    let mut weights = client
        .subscribe_weights(SubscribeWeightsRequest {
            actor_id: "observer".into(),
            have_version: 0,
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

/// A learner that vanishes and comes back: the actor reconnects on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_reconnects_after_the_learner_restarts() -> anyhow::Result<()> {
    let config = tiny_cartpole(0);
    let learner = TestLearner::start(config.clone(), "restart").await?;
    let addr = learner.addr.clone();
    let run_dir = learner.run_dir.clone();
    let (stop, actor) = spawn_actor(&config, &addr, 0);
    learner
        .wait_for(Duration::from_secs(60), "a few updates", |s| {
            s.policy_version >= 3
        })
        .await?;
    let first = learner.stop().await?;
    assert!(first.checkpoint.exists());

    // Same port, resumed from the checkpoint.
    let socket = addr.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind(&socket).await?;
    let (stop_l, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = spur_learner::LearnerOptions {
        run_dir,
        resume: true,
    };
    let second = tokio::spawn(spur_learner::serve(config.clone(), opts, listener, async {
        let _ = stopped.await;
    }));
    spur_tests::wait_serving(&addr).await?;
    let mut client = spur_proto::v1::learner_client::LearnerClient::connect(addr.clone()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = client
            .get_status(spur_proto::v1::StatusRequest {})
            .await?
            .into_inner();
        if s.actors
            .iter()
            .any(|a| a.actor_id == "actor-0" && a.chunks >= 2)
        {
            assert!(
                s.policy_version >= first.policy_version,
                "resumed from the checkpoint"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the actor never came back: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let _ = stop_l.send(());
    second.await??;
    let _ = actor.await?;
    Ok(())
}
