//! Graceful shutdown: the first SIGTERM or SIGINT cancels the token so the process can finish
//! in-flight work; a second one exits at once.

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first signal; exits the process on the second.
pub async fn watch_signals(shutdown: CancellationToken, what: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutdown requested; {what}");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting immediately");
    std::process::exit(130);
}
