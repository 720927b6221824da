//! A network partition between one actor and the learner: packets vanish, nobody
//! sends FIN or RST. HTTP/2 keepalive (`transport.keepalive_ms`) must notice it on
//! both ends: the learner ends that actor's trajectory stream and trains on with the
//! others, and the actor reconnects once the path is back.
//!
//! The partition is a loopback TCP proxy in this test, not `ip netns`: namespaces
//! with veth pairs do work in this sandbox (as root), but a namespace holds
//! processes, and these actors are tasks of the test process; the proxy needs no
//! root and cuts exactly one actor's path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spur_proto::v1::LearnerStatus;
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards loopback TCP to `upstream` until [`Proxy::cut`]: from then on every
/// byte of the connections it carries is dropped in both directions, their sockets
/// stay open (a close is lost like any byte), and new connections are refused,
/// until [`Proxy::repair`]. A connection that lost bytes stays dead, as a TCP
/// connection would after a long partition.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let is_cut = cut.clone();
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if is_cut.load(Ordering::SeqCst) {
                    continue; // dropped: the peer sees its connection closed
                }
                tokio::spawn(carry(down, upstream, is_cut.clone()));
            }
        });
        Ok(Self { addr, cut, accept })
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn repair(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn carry(down: TcpStream, upstream: SocketAddr, cut: Arc<AtomicBool>) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let lost = Arc::new(AtomicBool::new(false));
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    // The write halves live until both directions end: dropping one sends FIN.
    let _halves = tokio::join!(
        pump(down_r, up_w, cut.clone(), lost.clone()),
        pump(up_r, down_w, cut, lost),
    );
}

/// Copies `from` to `to` while the path is whole; once it was cut, drops what it
/// reads. Returns `to` so that the caller decides when it closes.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) -> OwnedWriteHalf {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            lost.store(true, Ordering::SeqCst);
        }
        if lost.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if !lost.load(Ordering::SeqCst) {
        let _ = to.shutdown().await;
    }
    to
}

fn chunks_of(s: &LearnerStatus, actor_id: &str) -> u64 {
    s.actors
        .iter()
        .find(|a| a.actor_id == actor_id)
        .map_or(0, |a| a.chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_actor_is_dropped_and_rejoins_after_repair() -> anyhow::Result<()> {
    let mut config = tiny_cartpole(0);
    config.transport.keepalive_ms = 300;
    config.actor.max_backoff_ms = 500;
    let keepalive = Duration::from_millis(config.transport.keepalive_ms);
    let learner = TestLearner::start(config.clone(), "partition").await?;
    let upstream: SocketAddr = learner.addr.trim_start_matches("http://").parse()?;
    let proxy = Proxy::start(upstream).await?;
    let (stop0, a0) = spawn_actor(&config, &learner.addr, 0);
    let (stop1, a1) = spawn_actor(&config, &format!("http://{}", proxy.addr), 1);
    learner
        .wait_for(Duration::from_secs(60), "both actors streaming", |s| {
            s.connected_actors == 2 && chunks_of(s, "actor-1") > 0
        })
        .await?;

    proxy.cut();
    let cut_at = Instant::now();
    // Keepalive notices within about 2 x keepalive_ms; the bound leaves room for a
    // busy 2-core machine (status polls, scheduling), far below "never".
    let dropped = learner
        .wait_for(
            keepalive * 10,
            "the learner to drop the partitioned actor's stream",
            |s| s.connected_actors == 1,
        )
        .await?;
    let noticed = cut_at.elapsed();
    eprintln!("the learner noticed the partition after {noticed:?} (keepalive {keepalive:?})");
    let stalled = chunks_of(&dropped, "actor-1");

    let later = learner
        .wait_for(
            Duration::from_secs(60),
            "training to go on with actor 0",
            |s| s.policy_version >= dropped.policy_version + 3,
        )
        .await?;
    assert_eq!(
        chunks_of(&later, "actor-1"),
        stalled,
        "nothing crosses a cut path"
    );
    assert_eq!(later.connected_actors, 1, "{later:?}");

    proxy.repair();
    let repaired_at = Instant::now();
    let rejoined = learner
        .wait_for(Duration::from_secs(30), "actor 1 to rejoin", |s| {
            s.connected_actors == 2 && chunks_of(s, "actor-1") > stalled
        })
        .await?;
    eprintln!(
        "actor 1 rejoined {:?} after the repair",
        repaired_at.elapsed()
    );
    assert!(rejoined.policy_version >= later.policy_version);

    let _ = stop0.send(());
    let _ = stop1.send(());
    a0.await??;
    let s1 = a1.await??;
    assert!(s1.push.reconnects >= 1, "{:?}", s1.push);
    learner.stop().await?;
    Ok(())
}
