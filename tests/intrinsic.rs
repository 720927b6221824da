//! The reward pipeline end to end over real gRPC: actor texts reach the reward
//! service, labels come back to the learner as reward-model versions, and the
//! learner's intrinsic rewards follow them.

use std::time::Duration;

use spur_core::config::{Config, EnvKind, RewardModelKind, SplitEnvs};
use spur_proto::v1::RewardStatusRequest;
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner, TestRewardService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_labels_reach_the_learner() -> anyhow::Result<()> {
    pipeline(RewardModelKind::Retrieval, SplitEnvs::Off).await
}

/// The same pipeline fed by an actor of two lanes (each lane sends its texts on a
/// stream of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_labels_reach_the_learner_from_an_actor_of_two_lanes() -> anyhow::Result<()> {
    pipeline(RewardModelKind::Retrieval, SplitEnvs::On).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_network_reaches_the_learner() -> anyhow::Result<()> {
    pipeline(RewardModelKind::Classification, SplitEnvs::Off).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranking_network_reaches_the_learner() -> anyhow::Result<()> {
    pipeline(RewardModelKind::Ranking, SplitEnvs::Off).await
}

async fn pipeline(kind: RewardModelKind, split: SplitEnvs) -> anyhow::Result<()> {
    let store = std::env::temp_dir().join(format!(
        "spur-e2e-{kind:?}-{split:?}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&store);

    let mut config: Config = tiny_cartpole(0);
    config.env.kind = EnvKind::Keyroom;
    config.env.keyroom_size = 4;
    config.intrinsic.enabled = true;
    config.intrinsic.model = kind;
    config.actor.split_envs = split;
    config.reward_service.store = store.join("labels.redb").display().to_string();

    // The reward service with the built-in rule judge, on a free port.
    let service = TestRewardService::start(&mut config).await?;

    let learner =
        TestLearner::start(config.clone(), &format!("intrinsic-{kind:?}-{split:?}")).await?;
    let (stop_actor, actor) = spawn_actor(&config, &learner.addr, 0);

    // Keyroom emits texts; the rule judge finds "you pick up the key" and friends
    // helpful. The learner must end up holding exactly the service's table.
    let mut rs = service.client().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (judge, seen) = loop {
        let j = rs.get_status(RewardStatusRequest {}).await?.into_inner();
        let l = learner.status().await?;
        // Retrieval: the learner holds exactly the service's table. Classification: it
        // holds the service's newest network and scores texts with it.
        // Ranking: pairs were judged and the learner's normalized scores are in use
        // (they centre on 0, so their mean can have either sign).
        let same_model = match kind {
            RewardModelKind::Retrieval => l.reward_labels == j.labels,
            RewardModelKind::Classification => l.reward_labels > 0,
            RewardModelKind::Ranking => l.reward_labels > 0 && j.ranked_pairs > 0,
        };
        let rewarded = match kind {
            RewardModelKind::Ranking => l.intrinsic_reward_mean != 0.0,
            _ => l.intrinsic_reward_mean > 0.0,
        };
        if j.positive_labels >= 1
            && same_model
            && l.reward_model_version >= 2
            && l.reward_model_version == j.model_version
            && rewarded
        {
            break (j, l);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "labels never reached the learner: judge {j:?}, learner {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        judge.texts_seen >= judge.labels,
        "texts came from the actor"
    );
    assert_eq!(
        judge.calls_per_labelled_text, 1.0,
        "one judge look per unique text"
    );
    assert!(
        seen.reward_model_version >= 2,
        "labels arrived as new versions"
    );
    let expected_kind = match kind {
        RewardModelKind::Retrieval => "retrieval",
        RewardModelKind::Classification => "classification",
        RewardModelKind::Ranking => "ranking",
    };
    assert_eq!(judge.model_kind, expected_kind);
    if kind != RewardModelKind::Retrieval {
        assert!(
            seen.reward_model_loss > 0.0,
            "the network's loss came along"
        );
    }

    let _ = stop_actor.send(());
    actor.await??;
    learner.stop().await?;
    service.stop().await?;
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}
