//! The `spur.v1.RewardService` gRPC service.

use std::sync::Arc;

use spur_proto::v1::reward_service_server::RewardService;
use spur_proto::v1::{
    RewardModelRequest, RewardModelUpdate, RewardServiceStatus, RewardStatusRequest, SubmitSummary,
    TextBatch,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::labeler::Labeler;
use crate::stats::Stats;

/// Most texts one `TextBatch` may carry.
pub const MAX_TEXTS_PER_BATCH: usize = 10_000;

pub struct RewardGrpc {
    pub labeler: Arc<Labeler>,
}

#[tonic::async_trait]
impl RewardService for RewardGrpc {
    async fn submit_texts(
        &self,
        request: Request<Streaming<TextBatch>>,
    ) -> Result<Response<SubmitSummary>, Status> {
        let mut stream = request.into_inner();
        let mut summary = SubmitSummary::default();
        while let Some(batch) = stream.message().await? {
            if batch.texts.len() > MAX_TEXTS_PER_BATCH {
                return Err(Status::invalid_argument(format!(
                    "a text batch holds {} texts, at most {MAX_TEXTS_PER_BATCH} are allowed",
                    batch.texts.len()
                )));
            }
            summary.received_texts += batch.texts.len() as u64;
            summary.new_texts += self.labeler.submit(batch.texts);
        }
        Ok(Response::new(summary))
    }

    type SubscribeRewardModelStream = ReceiverStream<Result<RewardModelUpdate, Status>>;

    async fn subscribe_reward_model(
        &self,
        request: Request<RewardModelRequest>,
    ) -> Result<Response<Self::SubscribeRewardModelStream>, Status> {
        debug!(
            subscriber = request.get_ref().subscriber,
            "reward-model subscriber"
        );
        let (tx, rx) = mpsc::channel(16);
        let labeler = self.labeler.clone();
        tokio::spawn(async move {
            'resync: loop {
                let (full, mut deltas) = labeler.model.subscribe();
                let mut version = full.version;
                if tx.send(Ok(full)).await.is_err() {
                    return;
                }
                loop {
                    match deltas.recv().await {
                        Ok(update) if update.version > version => {
                            version = update.version;
                            if tx.send(Ok((*update).clone())).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Fell behind: start over with the whole table.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue 'resync,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_status(
        &self,
        _request: Request<RewardStatusRequest>,
    ) -> Result<Response<RewardServiceStatus>, Status> {
        Ok(Response::new(status(&self.labeler)))
    }
}

/// The service's counters, as `GetStatus` answers them.
pub fn status(labeler: &Labeler) -> RewardServiceStatus {
    let l = labeler;
    let s = &l.stats;
    let labels = l.model.label_count() as u64;
    let (backlog, shed) = {
        let b = l.backlog.lock().expect("backlog lock poisoned");
        (b.depth() as u64, b.shed)
    };
    let judged = Stats::get(&s.texts_judged);
    let (kind, loss) = l.model.kind_and_loss();
    RewardServiceStatus {
        judge: l.judge_id.clone(),
        prompt_version: l.prompt_version.clone(),
        model_version: l.model.version(),
        texts_seen: Stats::get(&s.texts_seen),
        unique_texts: labels + backlog,
        store_hits: Stats::get(&s.store_hits),
        labels,
        positive_labels: l.model.positives() as u64,
        llm_calls: Stats::get(&s.llm_calls),
        llm_failures: Stats::get(&s.llm_failures),
        unparseable_answers: Stats::get(&s.unparseable),
        backlog,
        shed_texts: shed,
        llm_latency_p50_ms: s.latency_quantile(0.5),
        llm_latency_p99_ms: s.latency_quantile(0.99),
        calls_per_labelled_text: if labels > 0 {
            judged as f64 / labels as f64
        } else {
            0.0
        },
        ranked_pairs: Stats::get(&s.ranked_pairs),
        model_kind: kind.into(),
        model_loss: loss,
    }
}

/// Sets the Prometheus gauges `spur_reward_*` from the counters.
pub fn publish_gauges(s: &RewardServiceStatus) {
    let gauges = [
        ("texts_seen", s.texts_seen as f64),
        ("unique_texts", s.unique_texts as f64),
        ("store_hits", s.store_hits as f64),
        (
            "store_hit_rate",
            s.store_hits as f64 / s.texts_seen.max(1) as f64,
        ),
        ("labels", s.labels as f64),
        ("positive_labels", s.positive_labels as f64),
        ("ranked_pairs", s.ranked_pairs as f64),
        ("llm_calls", s.llm_calls as f64),
        ("llm_failures", s.llm_failures as f64),
        ("unparseable_answers", s.unparseable_answers as f64),
        ("backlog", s.backlog as f64),
        ("shed_texts", s.shed_texts as f64),
        ("llm_latency_p50_ms", s.llm_latency_p50_ms),
        ("llm_latency_p99_ms", s.llm_latency_p99_ms),
        ("calls_per_labelled_text", s.calls_per_labelled_text),
        ("model_version", s.model_version as f64),
        ("model_loss", s.model_loss),
    ];
    for (name, v) in gauges {
        metrics::gauge!(format!("spur_reward_{name}")).set(v);
    }
}
