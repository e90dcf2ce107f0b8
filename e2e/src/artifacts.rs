//! A firmware artifact server for tests: HTTPS with its own CA, serving byte strings put into it
//! and counting downloads per path (so a test can tell a manifest refused before download from
//! one refused after).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Default)]
struct Shelf {
    files: HashMap<String, Bytes>,
    hits: HashMap<String, usize>,
}

pub struct ArtifactServer {
    /// `https://127.0.0.1:PORT`
    pub base_url: String,
    /// PEM CA that signs the server's certificate (the agent's `--artifact-ca`).
    pub ca_file: PathBuf,
    shelf: Arc<Mutex<Shelf>>,
    task: tokio::task::JoinHandle<()>,
}

impl ArtifactServer {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let pki = crate::fleet::ServerPki::generate(dir)?;
        let chain = CertificateDer::pem_file_iter(&pki.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&pki.key)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shelf = Arc::new(Mutex::new(Shelf::default()));
        let served = shelf.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, shelf) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let shelf = shelf.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let mut shelf = shelf.lock().unwrap_or_else(|e| e.into_inner());
                            let found = shelf.files.get(&path).cloned();
                            *shelf.hits.entry(path).or_default() += 1;
                            let response = match found {
                                Some(bytes) => Response::new(Full::new(bytes)),
                                None => {
                                    let mut r =
                                        Response::new(Full::new(Bytes::from_static(b"not found")));
                                    *r.status_mut() = StatusCode::NOT_FOUND;
                                    r
                                }
                            };
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            base_url: format!("https://127.0.0.1:{port}"),
            ca_file: pki.ca,
            shelf,
            task,
        })
    }

    /// Serves `bytes` at `path` (e.g. `/fw/4.2.0.bin`); returns the full URL.
    pub fn put(&self, path: &str, bytes: Vec<u8>) -> String {
        let mut shelf = self.shelf.lock().unwrap_or_else(|e| e.into_inner());
        shelf.files.insert(path.to_string(), Bytes::from(bytes));
        format!("{}{path}", self.base_url)
    }

    /// Requests made for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        let shelf = self.shelf.lock().unwrap_or_else(|e| e.into_inner());
        shelf.hits.get(path).copied().unwrap_or(0)
    }
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
