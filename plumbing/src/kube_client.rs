//! The Kubernetes client of every Fleetwarden process: kube's default stack (kubeconfig, or the
//! pod's service account; TLS and authentication as configured) plus a `User-Agent` naming the
//! process. kube sends none, so without it API server logs, audit events and request metrics
//! cannot tell the operator's requests from the gateway's.

use anyhow::Context as _;
use http::{HeaderValue, Request, header::USER_AGENT};
use kube::client::{Body, ClientBuilder};
use tower::util::MapRequestLayer;

/// Builds the client from the environment (`KUBECONFIG`, `~/.kube/config` or the in-cluster
/// service account).
pub async fn connect(process: &str) -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await.context(
        "no Kubernetes configuration: set KUBECONFIG or run in a pod with a service account",
    )?;
    build(config, process)
}

/// Like [`connect`], from a configuration already read.
pub fn build(config: kube::Config, process: &str) -> anyhow::Result<kube::Client> {
    let agent = HeaderValue::from_str(&user_agent(process))
        .with_context(|| format!("{process:?} cannot be sent as a User-Agent"))?;
    let builder = ClientBuilder::try_from(config).context("cannot build the Kubernetes client")?;
    Ok(builder
        .with_layer(&MapRequestLayer::new(move |mut request: Request<Body>| {
            request.headers_mut().insert(USER_AGENT, agent.clone());
            request
        }))
        .build())
}

/// `fleetwarden-operator/0.1.0`, in the `product/version` form API server logs show.
pub fn user_agent(process: &str) -> String {
    format!("{process}/{}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use axum::{Router, http::HeaderMap, routing::get};

    use super::*;

    async fn echo_agent(headers: HeaderMap) -> String {
        headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
            .to_string()
    }

    #[tokio::test]
    async fn requests_name_the_process() {
        let app = Router::new().route("/agent", get(echo_agent));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let client = build(kube::Config::new(url.parse().unwrap()), "fleetwarden-test").unwrap();
        let request = Request::get("/agent").body(Vec::new()).unwrap();
        let agent = client.request_text(request).await.unwrap();
        assert_eq!(
            agent,
            format!("fleetwarden-test/{}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[tokio::test]
    async fn a_name_that_is_no_header_value_is_refused() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let Err(err) = build(config, "bad\nname") else {
            panic!("a User-Agent with a newline was accepted");
        };
        assert!(format!("{err:#}").contains("User-Agent"), "{err:#}");
    }
}
