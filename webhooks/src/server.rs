//! The HTTPS endpoint the API server calls: `POST /validate` and `POST /mutate`, bodies up to
//! `max_body` bytes, answered from the watch caches without any API call.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use crds::{DeviceGroup, UpdateRollout};
use futures::StreamExt;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    metrics::{Metrics, ReasonLabels, ReviewLabels, WebhookLabels},
    review::{self, Answer},
    rules::Cluster,
};

/// DeviceGroups and UpdateRollouts, fed by watches.
#[derive(Clone)]
pub struct Caches {
    pub groups: Store<DeviceGroup>,
    pub rollouts: Store<UpdateRollout>,
}

impl Caches {
    pub fn start(client: Client, shutdown: CancellationToken) -> Self {
        let (groups, group_writer) = reflector::store();
        let (rollouts, rollout_writer) = reflector::store();
        let group_stream = watcher(
            Api::<DeviceGroup>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|g: &mut DeviceGroup| g.managed_fields_mut().clear())
        .reflect(group_writer)
        .for_each(|_| futures::future::ready(()));
        let rollout_stream = watcher(
            Api::<UpdateRollout>::all(client),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|r: &mut UpdateRollout| r.managed_fields_mut().clear())
        .reflect(rollout_writer)
        .for_each(|_| futures::future::ready(()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! { _ = group_stream => {}, _ = stop.cancelled() => {} }
        });
        tokio::spawn(async move {
            tokio::select! { _ = rollout_stream => {}, _ = shutdown.cancelled() => {} }
        });
        Self { groups, rollouts }
    }

    pub async fn ready(&self) -> anyhow::Result<()> {
        self.groups.wait_until_ready().await?;
        self.rollouts.wait_until_ready().await?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct AppState {
    pub caches: Caches,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn validate(
    State(s): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return refuse(&s, e),
    };
    let start = Instant::now();
    let groups = s.caches.groups.state();
    let rollouts = s.caches.rollouts.state();
    let cluster = Cluster {
        groups: groups.iter().map(AsRef::as_ref).collect(),
        rollouts: rollouts.iter().map(AsRef::as_ref).collect(),
        now: jiff::Timestamp::now(),
    };
    let answer = review::validate(&body, &cluster);
    respond(&s, "validate", start, answer)
}

async fn mutate(
    State(s): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return refuse(&s, e),
    };
    let start = Instant::now();
    let answer = review::mutate(&body);
    respond(&s, "mutate", start, answer)
}

fn refuse(s: &AppState, e: axum::extract::rejection::BytesRejection) -> Response {
    let status = e.status();
    let reason = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "unreadable_body"
    };
    s.metrics
        .refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
    tracing::warn!(reason, error = %e, "request refused");
    (status, format!("{}\n", e.body_text())).into_response()
}

fn respond(s: &AppState, webhook: &'static str, start: Instant, answer: Answer) -> Response {
    s.metrics
        .reviews
        .get_or_create(&ReviewLabels {
            webhook,
            kind: answer.kind.map_or("other", |k| k.label()),
            verdict: answer.verdict.label(),
        })
        .inc();
    s.metrics
        .latency
        .get_or_create(&WebhookLabels { webhook })
        .observe(start.elapsed().as_secs_f64());
    if let Some(message) = &answer.message {
        tracing::info!(webhook, kind = answer.kind.map_or("other", |k| k.label()), verdict = answer.verdict.label(), %message, "request not admitted");
    }
    let status = if answer.verdict == review::Verdict::Invalid {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    match serde_json::to_vec(&answer.review) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves `app` over TLS until `shutdown`, then lets in-flight reviews finish (up to `drain`).
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, app, metrics, shutdown) = (
            acceptor.clone(),
            app.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    _ => {
                        metrics
                            .refused
                            .get_or_create(&ReasonLabels {
                                reason: "tls_handshake",
                            })
                            .inc();
                        tracing::debug!(%remote, "TLS handshake failed or timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after {drain:?}; closing them");
    }
}
