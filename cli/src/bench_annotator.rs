//! `spur bench annotator`: how close the reward service comes to its judge's limit.
//! A judge that answers every request after a fixed latency, with at most
//! `reward_service.max_concurrent` requests in flight, can answer at most
//! `max_concurrent / latency` requests per second; the benchmark submits unique texts
//! to a real reward service (in this process, on a fresh label store) pointed at such
//! a judge over the OpenAI-compatible HTTP protocol, and reports the judge calls per
//! second it achieved against that bound, the texts labelled per second, and the
//! most requests it saw in flight at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use clap::Args;
use spur_core::config::{JudgeKind, RewardModelKind};
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{RewardServiceStatus, RewardStatusRequest, TextBatch};
use tokio::net::TcpListener;

use crate::ConfigArgs;

#[derive(Args)]
pub struct AnnotatorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Unique texts submitted.
    #[arg(long, default_value_t = 20_000)]
    texts: usize,
    /// Seconds the judge takes to answer each request.
    #[arg(long, default_value_t = 0.05)]
    latency_s: f64,
}

/// The judge: counts requests and the most in flight at once, answers after
/// `latency` with one verdict per numbered event of the prompt.
#[derive(Default)]
struct Judge {
    latency: Duration,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

async fn completions(
    State(judge): State<Arc<Judge>>,
    Json(body): Json<serde_json::Value>,
) -> Json<serde_json::Value> {
    judge.requests.fetch_add(1, Ordering::Relaxed);
    let now = judge.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    judge.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
    // "1. text" lines: the events the prompt asks about.
    let events = prompt
        .lines()
        .filter(|l| {
            l.split_once(". ")
                .is_some_and(|(n, _)| n.parse::<usize>().is_ok())
        })
        .count();
    tokio::time::sleep(judge.latency).await;
    judge.in_flight.fetch_sub(1, Ordering::SeqCst);
    let verdicts: Vec<bool> = (0..events).map(|i| i % 3 == 0).collect();
    Json(serde_json::json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": spur_reward_service::parse::format_labels(&verdicts),
            },
            "finish_reason": "stop"
        }]
    }))
}

/// Serves the judge on a free loopback port; returns its base URL.
async fn serve_judge(judge: Arc<Judge>) -> anyhow::Result<String> {
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(judge);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/v1"))
}

pub async fn annotator(args: AnnotatorArgs) -> anyhow::Result<std::process::ExitCode> {
    let judge = Arc::new(Judge {
        latency: Duration::from_secs_f64(args.latency_s),
        ..Judge::default()
    });
    let url = serve_judge(judge.clone()).await?;
    let dir = std::env::temp_dir().join(format!("spur-bench-annotator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ours = [
        "intrinsic.enabled=true".to_string(),
        "intrinsic.model=retrieval".into(),
        "reward_service.judge=openai".into(),
        format!("reward_service.openai_base_url={url}"),
        format!("reward_service.store={}", dir.join("labels.redb").display()),
        // Every submitted text waits for its label: none is shed.
        format!("reward_service.backlog={}", args.texts.max(1)),
    ];
    let config = crate::bench_scale::load(&args.config, &ours)?;
    anyhow::ensure!(
        config.reward_service.judge == JudgeKind::Openai
            && config.intrinsic.model == RewardModelKind::Retrieval,
        "the annotator benchmark measures the OpenAI-compatible judge with retrieval labels"
    );
    let r = &config.reward_service;
    let cap = r.max_concurrent as f64 / args.latency_s;
    println!(
        "judge: {:.0} ms per request, at most {} in flight (bound {cap:.1} calls/s); \
         {} texts per request, {} unique texts",
        args.latency_s * 1e3,
        r.max_concurrent,
        r.batch_size,
        args.texts
    );
    let service =
        spur_reward_service::InProcess::start(config.clone(), std::path::PathBuf::from("."))
            .await?;
    let addr = service.addr.clone();
    let mut client = RewardServiceClient::connect(addr).await?;
    // The service answers GetStatus once its label store is open.
    client.get_status(RewardStatusRequest {}).await?;
    let (labelled, elapsed) = label_all(&mut client, args.texts).await?;
    service.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    report(&judge, &labelled, elapsed, cap, args.texts);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Submits `n` unique texts and waits until every one is labelled; returns the
/// service's final status and the time from the first submission.
async fn label_all(
    client: &mut RewardServiceClient<tonic::transport::Channel>,
    n: usize,
) -> anyhow::Result<(RewardServiceStatus, Duration)> {
    let batches: Vec<TextBatch> = (0..n)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|ids| TextBatch {
            actor_id: "bench".into(),
            texts: ids.iter().map(|i| format!("event number {i}")).collect(),
        })
        .collect();
    let started = Instant::now();
    client
        .submit_texts(tokio_stream::iter(batches))
        .await
        .context("submitting texts")?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let status = client
            .get_status(RewardStatusRequest {})
            .await?
            .into_inner();
        if status.labels as usize >= n {
            return Ok((status, started.elapsed()));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} texts labelled after 600 s",
            status.labels
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report(judge: &Judge, status: &RewardServiceStatus, elapsed: Duration, cap: f64, n: usize) {
    let secs = elapsed.as_secs_f64();
    let calls = judge.requests.load(Ordering::Relaxed) as f64;
    let rate = calls / secs;
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| texts labelled | {} |", status.labels);
    println!("| time to label all | {secs:.2} s |");
    println!("| texts/s through the service | {:.0} |", n as f64 / secs);
    println!("| judge calls | {calls:.0} |");
    println!("| judge calls/s | {rate:.1} |");
    println!("| bound: max_concurrent / latency | {cap:.1} |");
    println!("| achieved / bound | {:.2}x |", rate / cap);
    println!(
        "| most requests in flight | {} |",
        judge.most_in_flight.load(Ordering::SeqCst)
    );
    println!(
        "| judge latency seen by the service, p50 / p99 | {:.0} / {:.0} ms |",
        status.llm_latency_p50_ms, status.llm_latency_p99_ms
    );
}
