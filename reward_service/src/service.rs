//! The `spur.v1.RewardService` gRPC service. Calls that come while the label store
//! loads wait for it; when shutdown starts, streams end and calls get `Unavailable`.

use std::sync::Arc;

use spur_proto::v1::reward_service_server::RewardService;
use spur_proto::v1::{
    RewardModelRequest, RewardModelUpdate, RewardServiceStatus, RewardStatusRequest, SubmitSummary,
    TextBatch,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::error::RequestError;
use crate::labeler::Labeler;
use crate::stats::Stats;
use crate::tasks::Tasks;

/// Most texts one `TextBatch` may carry.
pub const MAX_TEXTS_PER_BATCH: usize = 10_000;

pub struct RewardGrpc {
    /// `Some` once the label store is loaded.
    pub labeler: watch::Receiver<Option<Arc<Labeler>>>,
    /// Cancelled when shutdown starts.
    pub cancel: CancellationToken,
    /// Where subscription streams run.
    pub tasks: Tasks,
}

impl RewardGrpc {
    /// The labeler, once the label store is loaded (a call waits for it).
    async fn labeler(&self) -> Result<Arc<Labeler>, Status> {
        let mut rx = self.labeler.clone();
        let ready = async move {
            let labeler = rx.wait_for(Option::is_some).await.ok()?;
            (*labeler).clone()
        };
        self.cancel
            .run_until_cancelled(ready)
            .await
            .flatten()
            .ok_or_else(|| RequestError::ShuttingDown.into())
    }
}

#[tonic::async_trait]
impl RewardService for RewardGrpc {
    async fn submit_texts(
        &self,
        request: Request<Streaming<TextBatch>>,
    ) -> Result<Response<SubmitSummary>, Status> {
        let labeler = self.labeler().await?;
        let mut stream = request.into_inner();
        let mut summary = SubmitSummary::default();
        loop {
            let batch = tokio::select! {
                b = stream.message() => b?,
                _ = self.cancel.cancelled() => return Err(RequestError::ShuttingDown.into()),
            };
            let Some(batch) = batch else { break };
            if batch.texts.len() > MAX_TEXTS_PER_BATCH {
                return Err(RequestError::BatchTooLarge {
                    texts: batch.texts.len(),
                    limit: MAX_TEXTS_PER_BATCH,
                }
                .into());
            }
            summary.received_texts += batch.texts.len() as u64;
            summary.new_texts += labeler.submit(batch.texts);
        }
        Ok(Response::new(summary))
    }

    type SubscribeRewardModelStream = ReceiverStream<Result<RewardModelUpdate, Status>>;

    async fn subscribe_reward_model(
        &self,
        request: Request<RewardModelRequest>,
    ) -> Result<Response<Self::SubscribeRewardModelStream>, Status> {
        let labeler = self.labeler().await?;
        let subscriber = request.into_inner().subscriber;
        debug!(subscriber, "reward-model subscriber");
        let (tx, rx) = mpsc::channel(16);
        let cancel = self.cancel.clone();
        let stream = async move {
            if cancel
                .run_until_cancelled(forward(&labeler, &tx))
                .await
                .is_none()
            {
                // A client that does not read misses the reason, not the end.
                let _ = tx.try_send(Err(RequestError::ShuttingDown.into()));
            }
        };
        let name = format!("reward-model stream to {subscriber:?}");
        self.tasks.spawn(name, stream);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_status(
        &self,
        _request: Request<RewardStatusRequest>,
    ) -> Result<Response<RewardServiceStatus>, Status> {
        Ok(Response::new(status(&*self.labeler().await?)))
    }
}

/// Sends the whole table (or the newest weights), then each newer version, until the
/// subscriber goes away.
async fn forward(labeler: &Labeler, tx: &mpsc::Sender<Result<RewardModelUpdate, Status>>) {
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
    let retry_waiting = l.retry.lock().expect("retry lock poisoned").waiting() as u64;
    let judged = Stats::get(&s.texts_judged);
    let (kind, loss) = l.model.kind_and_loss();
    RewardServiceStatus {
        judge: l.judge_id.clone(),
        prompt_version: l.prompt_version.clone(),
        model_version: l.model.version(),
        texts_seen: Stats::get(&s.texts_seen),
        unique_texts: labels + backlog + retry_waiting,
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
        model_kind: kind.name().into(),
        model_loss: loss,
        retry_waiting,
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
        ("retry_waiting", s.retry_waiting as f64),
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
