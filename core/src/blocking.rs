//! Blocking work (tch, env steps) on a thread of its own, with its result awaited
//! from async code.

use tokio::sync::oneshot;

/// Runs `work` on a new thread called `name`; its result arrives on the returned
/// channel, which closes without a value if `work` panics.
pub fn on_own_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<oneshot::Receiver<T>> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(work());
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_result_arrives_and_a_panic_closes_the_channel() {
        let rx = on_own_thread("t", || std::thread::current().name().map(String::from));
        assert_eq!(rx.unwrap().await.unwrap().as_deref(), Some("t"));
        let rx = on_own_thread("p", || -> u32 { panic!("on purpose") });
        assert!(rx.unwrap().await.is_err());
    }
}
