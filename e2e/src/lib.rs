//! End-to-end harness, in the spirit of controller-runtime's envtest: one real kube-apiserver
//! (with etcd and kube-controller-manager) per test run, the committed CRDs installed into it,
//! a fresh namespace per test, and helpers to run our binaries and the real `kubectl` against it.
//!
//! By default the harness starts its own control plane with `e2e/control-plane.sh` in a private
//! state directory and stops it at the end. With `FLEETWARDEN_E2E_EXISTING_CLUSTER=1` it uses
//! the cluster `KUBECONFIG` points at instead and only removes the namespaces it created.

pub mod artifacts;
pub mod fleet;
pub mod helm;
pub mod issuer;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use tokio::process::{Child, Command};

pub const E2E_LABEL: &str = "fleetwarden.io/e2e";

pub struct Env {
    pub client: Client,
    pub kubeconfig: PathBuf,
    /// Workspace root (where `Cargo.toml`, `examples/` and `charts/` are).
    pub root: PathBuf,
    /// Scratch directory of this run: logs, kubectl cache, control-plane state.
    pub scratch: PathBuf,
    /// Set when this harness started the control plane and must stop it.
    owned_control_plane: Option<PathBuf>,
    namespaces: Mutex<Vec<String>>,
    seq: AtomicU32,
}

impl Env {
    /// Starts (or connects to) the control plane, builds our binaries, installs the CRDs.
    pub async fn start() -> anyhow::Result<Env> {
        let root = workspace_root();
        check_binaries(&root)?;
        let scratch = std::env::temp_dir().join(format!("fleetwarden-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;

        let existing = std::env::var("FLEETWARDEN_E2E_EXISTING_CLUSTER").is_ok_and(|v| v == "1");
        let (kubeconfig, owned_control_plane) = if existing {
            let path = std::env::var_os("KUBECONFIG")
                .map(PathBuf::from)
                .context("FLEETWARDEN_E2E_EXISTING_CLUSTER=1 needs KUBECONFIG to name the cluster's kubeconfig")?;
            eprintln!("e2e: using the existing cluster in {}", path.display());
            (path, None)
        } else {
            let state = scratch.join("control-plane");
            eprintln!("e2e: starting a control plane in {}", state.display());
            let status = Command::new("bash")
                .arg(root.join("e2e/control-plane.sh"))
                .arg("up")
                .env("FLEETWARDEN_CP_DIR", &state)
                .status()
                .await
                .context("cannot run e2e/control-plane.sh")?;
            if !status.success() {
                bail!(
                    "e2e/control-plane.sh up failed ({status}); its logs are in {}/logs",
                    state.display()
                );
            }
            (state.join("kubeconfig"), Some(state))
        };

        let kc = Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("cannot read kubeconfig {}", kubeconfig.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        // The harness and the test issuer standing in for cert-manager show up in API server
        // logs as fleetwarden-e2e.
        let client = plumbing::kube_client::build(config, "fleetwarden-e2e")?;

        let env = Env {
            client,
            kubeconfig,
            root,
            scratch,
            owned_control_plane,
            namespaces: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
        };
        env.install_crds().await?;
        Ok(env)
    }

    /// Installs (or updates) the committed CRD YAML (ours, and the cert-manager subset the
    /// test control plane lacks) and waits until every CRD is Established.
    pub async fn install_crds(&self) -> anyhow::Result<Vec<String>> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut all =
            read_yaml_dir::<CustomResourceDefinition>(&self.root.join("charts/fleetwarden/crds"))?;
        all.extend(read_yaml_dir::<CustomResourceDefinition>(
            &self.root.join("e2e/crds"),
        )?);
        let mut names = Vec::new();
        for crd in all {
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            match api.create(&PostParams::default(), &crd).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let current = api.get(&name).await?;
                    let mut updated = crd.clone();
                    updated.metadata.resource_version = current.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &updated).await?;
                }
                Err(e) => return Err(e).with_context(|| format!("installing CRD {name}")),
            }
            names.push(name);
        }
        for name in &names {
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(api.clone(), name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} not Established within 30s"))??;
        }
        Ok(names)
    }

    /// Starts an operator that watches only `ns` and elects its leader on a Lease there, and
    /// waits until it leads.
    pub async fn start_operator(&self, ns: &str, tag: &str) -> anyhow::Result<Operator> {
        self.start_operator_as(&self.kubeconfig, ns, tag).await
    }

    /// Like [`Env::start_operator`], talking to the API server through `kubeconfig`.
    pub async fn start_operator_as(
        &self,
        kubeconfig: &Path,
        ns: &str,
        tag: &str,
    ) -> anyhow::Result<Operator> {
        let operator = self.spawn_operator_with(kubeconfig, ns, tag)?;
        eventually(Duration::from_secs(20), "the operator to lead", || async {
            Ok(
                (operator.metric("fleetwarden_operator_leader").await.ok() == Some(1.0))
                    .then_some(()),
            )
        })
        .await
        .with_context(|| format!("operator log:\n{}", operator.process.log()))?;
        Ok(operator)
    }

    /// Starts a gateway serving `ns`, trusting `fleet_ca_pem` for device certificates, with its own
    /// server certificate for 127.0.0.1, and waits until it is ready.
    pub async fn start_gateway(
        &self,
        ns: &str,
        fleet_ca_pem: &str,
        extra: &[&str],
    ) -> anyhow::Result<Gateway> {
        self.start_gateway_as(&self.kubeconfig, ns, fleet_ca_pem, extra)
            .await
    }

    /// Like [`Env::start_gateway`], talking to the API server through `kubeconfig`.
    pub async fn start_gateway_as(
        &self,
        kubeconfig: &Path,
        ns: &str,
        fleet_ca_pem: &str,
        extra: &[&str],
    ) -> anyhow::Result<Gateway> {
        self.start_gateway_on(kubeconfig, ns, fleet_ca_pem, extra, None)
            .await
    }

    /// Starts a gateway for `ns` on `port` (a free one when `None`). A gateway started again for
    /// the same namespace keeps its server certificate, so devices that trust it reconnect.
    pub async fn start_gateway_on(
        &self,
        kubeconfig: &Path,
        ns: &str,
        fleet_ca_pem: &str,
        extra: &[&str],
        port: Option<u16>,
    ) -> anyhow::Result<Gateway> {
        let dir = self.scratch.join(format!("{ns}-gateway-pki"));
        let pki = match fleet::ServerPki::existing(&dir) {
            Some(pki) => pki,
            None => fleet::ServerPki::generate(&dir)?,
        };
        let fleet_ca = dir.join("fleet-ca.pem");
        std::fs::write(&fleet_ca, fleet_ca_pem)?;
        let (port, metrics_port) = (port.map_or_else(free_port, Ok)?, free_port()?);
        let listen = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{metrics_port}");
        let mut args = vec![
            "--watch-namespace",
            ns,
            "--listen",
            &listen,
            "--metrics-addr",
            &metrics,
            "--tls-cert",
            path_str(&pki.cert),
            "--tls-key",
            path_str(&pki.key),
            "--fleet-ca",
            path_str(&fleet_ca),
            "--retry-after",
            "1s",
        ];
        args.extend_from_slice(extra);
        let process = self.spawn_with(
            kubeconfig,
            "fleetwarden-gateway",
            &format!("{ns}-gateway"),
            &args,
        )?;
        let gateway = Gateway {
            process,
            port,
            metrics_port,
            ca_file: pki.ca,
        };
        eventually(
            Duration::from_secs(20),
            "the gateway to be ready",
            || async {
                Ok(http_get(gateway.metrics_port, "/readyz")
                    .await
                    .ok()
                    .filter(|(s, _)| *s == 200)
                    .map(|_| ()))
            },
        )
        .await
        .with_context(|| format!("gateway log:\n{}", gateway.process.log()))?;
        Ok(gateway)
    }

    /// Starts the admission webhooks with a serving certificate for 127.0.0.1 and waits until
    /// their caches are ready.
    pub async fn start_webhooks(&self, tag: &str) -> anyhow::Result<Webhooks> {
        let dir = self.scratch.join(format!("{tag}-webhooks-pki"));
        let pki = fleet::ServerPki::generate(&dir)?;
        let (port, metrics_port) = (free_port()?, free_port()?);
        let listen = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{metrics_port}");
        let process = self.spawn(
            "fleetwarden-webhooks",
            &format!("{tag}-webhooks"),
            &[
                "--listen",
                &listen,
                "--metrics-addr",
                &metrics,
                "--tls-cert",
                path_str(&pki.cert),
                "--tls-key",
                path_str(&pki.key),
            ],
        )?;
        let webhooks = Webhooks {
            process,
            port,
            metrics_port,
            ca_pem: std::fs::read_to_string(&pki.ca)?,
        };
        eventually(
            Duration::from_secs(20),
            "the webhooks to be ready",
            || async {
                Ok(http_get(webhooks.metrics_port, "/readyz")
                    .await
                    .ok()
                    .filter(|(s, _)| *s == 200)
                    .map(|_| ()))
            },
        )
        .await
        .with_context(|| format!("webhooks log:\n{}", webhooks.process.log()))?;
        Ok(webhooks)
    }

    /// Like [`Env::start_operator`], without waiting for it to lead.
    pub fn spawn_operator(&self, ns: &str, tag: &str) -> anyhow::Result<Operator> {
        self.spawn_operator_with(&self.kubeconfig, ns, tag)
    }

    fn spawn_operator_with(
        &self,
        kubeconfig: &Path,
        ns: &str,
        tag: &str,
    ) -> anyhow::Result<Operator> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let process = self.spawn_with(
            kubeconfig,
            "fleetwarden-operator",
            &format!("{ns}-{tag}"),
            &[
                "--watch-namespace",
                ns,
                "--lease-namespace",
                ns,
                "--identity",
                tag,
                "--metrics-addr",
                &addr,
                "--lease-duration",
                "6s",
                "--renew-deadline",
                "4s",
                "--retry-period",
                "1s",
            ],
        )?;
        Ok(Operator { process, port })
    }

    /// A copy of the harness kubeconfig that impersonates ServiceAccount `namespace/name` (with
    /// the groups Kubernetes gives ServiceAccounts), so a process runs with exactly that
    /// account's RBAC.
    pub fn kubeconfig_as_service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        let mut config: serde_json::Value = serde_norway::from_str(&text)?;
        let users = config["users"]
            .as_array_mut()
            .context("kubeconfig without users")?;
        for user in users {
            user["user"]["as"] =
                serde_json::json!(format!("system:serviceaccount:{namespace}:{name}"));
            user["user"]["as-groups"] = serde_json::json!([
                "system:serviceaccounts",
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated"
            ]);
        }
        let path = self.scratch.join(format!("kubeconfig-{namespace}-{name}"));
        std::fs::write(&path, serde_norway::to_string(&config)?)?;
        Ok(path)
    }

    /// A fresh namespace for one test, removed when the run ends.
    pub async fn namespace(&self, test: &str) -> anyhow::Result<String> {
        let slug: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        // The process id keeps names unique across runs against the same cluster.
        let name = format!(
            "e2e-{}-{}-{}",
            slug.trim_matches('-'),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some([(E2E_LABEL.to_string(), "true".to_string())].into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .with_context(|| format!("creating namespace {name}"))?;
        self.namespaces
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push(name.clone());
        Ok(name)
    }

    /// The real `kubectl`, pointed at this cluster, with a private discovery cache so freshly
    /// installed CRDs are seen at once.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.scratch.join("kubectl-cache"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl; `Ok(stdout)` on success, `Err` with its stderr otherwise.
    pub async fn kubectl_run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .await
            .context("cannot run kubectl (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Path of one of our binaries (checked to be current by `Env::start`).
    pub fn binary(&self, name: &str) -> PathBuf {
        target_dir(&self.root).join(profile()).join(name)
    }

    /// CPU time (user + system, seconds) a component of the control plane this harness started
    /// has used: `kube-apiserver`, `etcd` or `kube-controller-manager`. `None` for a shared or
    /// external control plane.
    pub fn control_plane_cpu_seconds(&self, component: &str) -> Option<f64> {
        let state = self.owned_control_plane.as_ref()?;
        let pid = std::fs::read_to_string(state.join(format!("{component}.pid"))).ok()?;
        cpu_seconds(pid.trim().parse().ok()?)
    }

    /// Starts one of our binaries against this cluster; output goes to `<scratch>/<log_name>.log`.
    pub fn spawn(&self, binary: &str, log_name: &str, args: &[&str]) -> anyhow::Result<Process> {
        self.spawn_with(&self.kubeconfig, binary, log_name, args)
    }

    /// Like [`Env::spawn`], at the lowest CPU priority (`nice -n 19`, inherited by every thread
    /// of the process). For load generators that stand in for machines other than the control
    /// plane's, e.g. a simulated fleet, so that they take only CPU the control plane leaves idle.
    pub fn spawn_low_priority(
        &self,
        binary: &str,
        log_name: &str,
        args: &[&str],
    ) -> anyhow::Result<Process> {
        let path = self.binary(binary);
        let mut niced = vec!["-n", "19", path.to_str().unwrap_or_default()];
        niced.extend_from_slice(args);
        self.launch(
            Command::new("nice"),
            &self.kubeconfig,
            binary,
            log_name,
            &niced,
        )
    }

    /// Like [`Env::spawn`], with another kubeconfig (e.g. one impersonating a ServiceAccount).
    pub fn spawn_with(
        &self,
        kubeconfig: &Path,
        binary: &str,
        log_name: &str,
        args: &[&str],
    ) -> anyhow::Result<Process> {
        self.launch(
            Command::new(self.binary(binary)),
            kubeconfig,
            binary,
            log_name,
            args,
        )
    }

    fn launch(
        &self,
        mut command: Command,
        kubeconfig: &Path,
        binary: &str,
        log_name: &str,
        args: &[&str],
    ) -> anyhow::Result<Process> {
        let log_path = self.scratch.join(format!("{log_name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "FLEETWARDEN_LOG",
                std::env::var("FLEETWARDEN_E2E_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        Ok(Process { child, log_path })
    }

    /// Stops the API server alone (etcd and the controller-manager keep running), for fault
    /// tests. Only when this harness started the control plane.
    pub async fn apiserver_stop(&self) -> anyhow::Result<()> {
        self.control_plane("apiserver-stop").await
    }

    /// Starts the API server again on the same port and waits until it is ready.
    pub async fn apiserver_start(&self) -> anyhow::Result<()> {
        self.control_plane("apiserver-start").await
    }

    async fn control_plane(&self, command: &str) -> anyhow::Result<()> {
        let state = self.owned_control_plane.as_ref().context(
            "the API server belongs to an existing cluster; fault tests need the harness's own",
        )?;
        let status = Command::new("bash")
            .arg(self.root.join("e2e/control-plane.sh"))
            .arg(command)
            .env("FLEETWARDEN_CP_DIR", state)
            .status()
            .await?;
        anyhow::ensure!(status.success(), "control-plane.sh {command} failed");
        Ok(())
    }

    /// Removes what the run created; stops the control plane if the harness started it.
    pub async fn stop(self) {
        if let Some(state) = &self.owned_control_plane {
            let status = Command::new("bash")
                .arg(self.root.join("e2e/control-plane.sh"))
                .arg("down")
                .env("FLEETWARDEN_CP_DIR", state)
                .status()
                .await;
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("e2e: control-plane.sh down failed: {status:?}");
            }
            if std::env::var_os("FLEETWARDEN_E2E_KEEP_LOGS").is_some() {
                eprintln!("e2e: logs kept in {}", self.scratch.display());
            } else {
                let _ = std::fs::remove_dir_all(&self.scratch);
            }
        } else {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let names = self
                .namespaces
                .lock()
                .map(|n| n.clone())
                .unwrap_or_default();
            for ns in names {
                let _ = api.delete(&ns, &DeleteParams::default()).await;
            }
            eprintln!("e2e: logs kept in {}", self.scratch.display());
        }
    }
}

/// A gateway process under test: its device port, metrics port, and the CA file devices use to
/// trust it.
pub struct Gateway {
    pub process: Process,
    pub port: u16,
    pub metrics_port: u16,
    pub ca_file: PathBuf,
}

impl Gateway {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Sum of a gateway metric's samples (see [`sum_metric`]).
    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let (status, body) = http_get(self.metrics_port, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(sum_metric(&body, prefix))
    }
}

/// A webhooks process under test: its HTTPS port, metrics port, and the CA that signed its
/// serving certificate (the `caBundle` of a webhook configuration).
pub struct Webhooks {
    pub process: Process,
    pub port: u16,
    pub metrics_port: u16,
    pub ca_pem: String,
}

impl Webhooks {
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let (status, body) = http_get(self.metrics_port, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(sum_metric(&body, prefix))
    }
}

/// An operator process under test and its metrics port.
pub struct Operator {
    pub process: Process,
    pub port: u16,
}

impl Operator {
    /// Sum of every sample of a metric whose name (with labels) starts with `prefix`, e.g.
    /// `fleetwarden_operator_api_writes_total` or
    /// `fleetwarden_operator_enrollments_total{result="denied",reason="CaRequested"}`.
    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let (status, body) = http_get(self.port, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(sum_metric(&body, prefix))
    }
}

/// Sums the samples of an OpenMetrics text whose series starts with `prefix` (a name, or a name
/// with its first labels: `name{a="x"` matches `name{a="x",b="y"}`).
pub fn sum_metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with([' ', '{', ',']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// A process of ours under test.
pub struct Process {
    child: Child,
    pub log_path: PathBuf,
}

impl Process {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then wait up to `grace` for a clean exit. Returns whether it exited successfully.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<bool> {
        let pid = self.pid().context("process already exited")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                self.child.kill().await?;
                bail!(
                    "process {pid} did not exit within {grace:?} of SIGTERM; log: {}",
                    self.log_path.display()
                )
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The JSON report `fleetwarden-agent simulate` prints when it ends (the last one in its log).
    pub fn simulator_report(&self) -> Option<serde_json::Value> {
        self.log()
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"devices\""))
            .and_then(|l| serde_json::from_str(l).ok())
    }
}

/// The last `lines` lines of `text`, for error messages with a log excerpt.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout` saying `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain HTTP/1.1 GET on loopback: `(status, body)`. Enough for probes and /metrics.
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP response without a status")?;
    Ok((status, body.to_string()))
}

/// Reads every `*.yaml` in a directory (multi-document allowed), in file-name order.
pub fn read_yaml_dir<T: serde::de::DeserializeOwned>(dir: &Path) -> anyhow::Result<Vec<T>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        out.extend(read_yaml_file(&file)?);
    }
    Ok(out)
}

/// Reads the documents of one YAML file.
pub fn read_yaml_file<T: serde::de::DeserializeOwned>(file: &Path) -> anyhow::Result<Vec<T>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(doc)
            .with_context(|| format!("parsing {}", file.display()))?;
        if value.is_null() {
            continue;
        }
        out.push(
            serde_norway::from_value(value)
                .with_context(|| format!("decoding {}", file.display()))?,
        );
    }
    Ok(out)
}

use serde::Deserialize as _;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Build profile of the binaries under test: `debug`, or `FLEETWARDEN_E2E_PROFILE` (e.g.
/// `release` for measurements).
fn profile() -> String {
    std::env::var("FLEETWARDEN_E2E_PROFILE").unwrap_or_else(|_| "debug".into())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Binaries the tests start, with the crates they are built from.
const BINARIES: &[(&str, &[&str])] = &[
    ("fleetwarden-operator", &["operator", "crds", "plumbing"]),
    ("fleetwarden-gateway", &["gateway", "crds", "plumbing"]),
    ("fleetwarden-agent", &["agent", "crds", "plumbing"]),
    ("kubectl-fleet", &["cli", "crds"]),
    ("fleetwarden-webhooks", &["webhooks", "crds", "plumbing"]),
];

/// Checks that the binaries under test exist and are newer than their sources. Cargo holds the
/// build directory lock while tests run, so the harness cannot build them itself.
fn check_binaries(root: &Path) -> anyhow::Result<()> {
    let fix = "build them first: cargo build --workspace --bins (add --release with FLEETWARDEN_E2E_PROFILE=release)";
    for (binary, crates) in BINARIES {
        let path = target_dir(root).join(profile()).join(binary);
        let built = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(|_| anyhow!("{} is missing; {fix}", path.display()))?;
        for krate in *crates {
            if newest_source(&root.join(krate).join("src")).is_some_and(|t| t > built) {
                bail!(
                    "{} is older than the sources in {krate}/; {fix}",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// CPU time (user + system, seconds) process `pid` has used, all its threads together; `None`
/// once it has exited.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[cfg(test)]
mod tests {
    use super::sum_metric;

    #[test]
    fn metric_sums_select_whole_series_names() {
        let text =
            "# TYPE x counter\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\nx_total_other 7\nx 1\n";
        assert_eq!(sum_metric(text, "x_total"), 5.0);
        assert_eq!(sum_metric(text, "x_total{a=\"2\"}"), 3.0);
        assert_eq!(sum_metric(text, "x"), 1.0);
        assert_eq!(sum_metric(text, "y"), 0.0);
    }
}
