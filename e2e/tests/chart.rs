//! The Helm chart, rendered by the real `helm` without a cluster: lint, deterministic rendering,
//! least-privilege RBAC, locked-down pods, webhook configuration wiring, Argo CD sync waves, and
//! values the schema must refuse. (Installing it into the API server is in the e2e suite.)

use std::collections::BTreeSet;

use e2e::helm;
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn render(sets: &[&str]) -> Vec<Value> {
    rt().block_on(helm::template("fw", "fleetwarden-system", sets))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

#[test]
fn helm_lint_strict_passes() {
    let chart = helm::chart();
    let (ok, stdout, stderr) = rt()
        .block_on(helm::run(&["lint", "--strict", chart.to_str().unwrap()]))
        .unwrap();
    assert!(ok, "helm lint --strict failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("0 chart(s) failed"), "{stdout}");
}

#[test]
fn rendering_is_deterministic_and_renders_every_component() {
    let a = render(&[]);
    let b = render(&[]);
    assert_eq!(
        a, b,
        "two renders differ: no random values or lookups allowed"
    );
    let kinds: BTreeSet<String> = a
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "Deployment/fw-fleetwarden-operator",
        "Deployment/fw-fleetwarden-webhooks",
        "Deployment/fw-fleetwarden-gateway",
        "Service/fw-fleetwarden-gateway",
        "Service/fw-fleetwarden-webhooks",
        "Certificate/fw-fleetwarden-webhooks",
        "ValidatingWebhookConfiguration/fw-fleetwarden-webhooks",
        "MutatingWebhookConfiguration/fw-fleetwarden-webhooks",
        "PodDisruptionBudget/fw-fleetwarden-operator",
        "ServiceAccount/fw-fleetwarden-gateway",
    ] {
        assert!(kinds.contains(want), "{want} missing from {kinds:?}");
    }
    assert_eq!(
        find(&a, "Deployment", "fw-fleetwarden-operator")["spec"]["replicas"],
        2
    );
    let without_gateway = render(&["gateway.enabled=false"]);
    assert!(!without_gateway.iter().any(|d| {
        d["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .contains("gateway")
    }));
}

#[test]
fn rbac_is_least_privilege() {
    let docs = render(&[]);
    for role in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).contains("*"),
                    "{} has a wildcard in {field}: {rule}",
                    role["metadata"]["name"]
                );
            }
        }
    }
    // The gateway: read our kinds, patch devices/status, read enrollment Secrets/ConfigMaps.
    let gateway = find(&docs, "ClusterRole", "fw-fleetwarden-gateway");
    let mut grants = BTreeSet::new();
    for rule in gateway["rules"].as_array().unwrap() {
        for resource in strings(&rule["resources"]) {
            for verb in strings(&rule["verbs"]) {
                grants.insert(format!("{resource}:{verb}"));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "devices:get",
        "devices:list",
        "devices:watch",
        "devicegroups:get",
        "devicegroups:list",
        "devicegroups:watch",
        "updaterollouts:get",
        "updaterollouts:list",
        "updaterollouts:watch",
        "devices/status:patch",
        "secrets:get",
        "configmaps:get",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(grants, expected);
    // Enrollment reads can be narrowed to named objects.
    let narrowed = render(&["gateway.enrollmentSecretNames={cell-tokens}"]);
    let rules = find(&narrowed, "ClusterRole", "fw-fleetwarden-gateway")["rules"].clone();
    let secrets = rules
        .as_array()
        .unwrap()
        .iter()
        .find(|r| strings(&r["resources"]).contains("secrets"))
        .unwrap();
    assert_eq!(
        strings(&secrets["resourceNames"]),
        BTreeSet::from(["cell-tokens".to_string()])
    );

    // The operator approves only for the configured issuers, and never writes spec.
    let operator = find(&docs, "ClusterRole", "fw-fleetwarden-operator");
    let approve = operator["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| strings(&r["verbs"]).contains("approve"))
        .unwrap();
    assert_eq!(
        strings(&approve["resources"]),
        BTreeSet::from(["signers".to_string()])
    );
    assert_eq!(
        strings(&approve["resourceNames"]),
        BTreeSet::from(["issuers.cert-manager.io/*".to_string()])
    );
    let scoped = render(&[
        "certManager.approvedIssuers[0].kind=Issuer",
        "certManager.approvedIssuers[0].namespace=plant",
        "certManager.approvedIssuers[0].name=device-ca",
        "certManager.approvedIssuers[1].kind=ClusterIssuer",
        "certManager.approvedIssuers[1].name=fleet",
    ]);
    let approve = find(&scoped, "ClusterRole", "fw-fleetwarden-operator")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| strings(&r["verbs"]).contains("approve"))
        .unwrap()
        .clone();
    assert_eq!(
        strings(&approve["resourceNames"]),
        BTreeSet::from([
            "issuers.cert-manager.io/plant.device-ca".to_string(),
            "clusterissuers.cert-manager.io/fleet".to_string()
        ])
    );
    for rule in operator["rules"].as_array().unwrap() {
        let resources = strings(&rule["resources"]);
        let verbs = strings(&rule["verbs"]);
        if strings(&rule["apiGroups"]).contains("fleetwarden.io") {
            let writes: Vec<_> = verbs
                .iter()
                .filter(|v| !["get", "list", "watch"].contains(&v.as_str()))
                .collect();
            if !writes.is_empty() {
                assert!(
                    resources
                        .iter()
                        .all(|r| r.ends_with("/status") || r == "devices")
                        && !verbs.contains("update")
                        && !verbs.contains("delete"),
                    "operator writes more than status and the finalizer: {rule}"
                );
            }
        }
    }
    // The webhooks write nothing.
    let webhooks = find(&docs, "ClusterRole", "fw-fleetwarden-webhooks");
    for rule in webhooks["rules"].as_array().unwrap() {
        assert_eq!(
            strings(&rule["verbs"]),
            BTreeSet::from(["get".into(), "list".into(), "watch".into()])
        );
    }
}

#[test]
fn pods_are_locked_down_probed_and_sized() {
    let docs = render(&[]);
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        let name = d["metadata"]["name"].as_str().unwrap();
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        assert_eq!(
            pod["serviceAccountName"], name,
            "{name} runs as its own ServiceAccount"
        );
        for c in pod["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["privileged"], false, "{name}");
            assert_eq!(
                strings(&sc["capabilities"]["drop"]),
                BTreeSet::from(["ALL".to_string()]),
                "{name}"
            );
            assert!(
                c["resources"]["requests"]["memory"].is_string()
                    && c["resources"]["limits"]["memory"].is_string(),
                "{name}"
            );
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
            assert!(
                c["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == "metrics"),
                "{name}"
            );
            let image = c["image"].as_str().unwrap();
            assert!(
                image.ends_with(":0.1.0"),
                "{name}: image {image} is pinned to the app version"
            );
        }
    }
    let operator = find(&docs, "Deployment", "fw-fleetwarden-operator");
    let env = &operator["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "POD_NAME"),
        "leader identity from the pod name"
    );
}

#[test]
fn webhook_configurations_are_wired_to_the_service_and_the_certificate() {
    let docs = render(&[]);
    let cert = find(&docs, "Certificate", "fw-fleetwarden-webhooks");
    assert!(
        strings(&cert["spec"]["dnsNames"])
            .contains("fw-fleetwarden-webhooks.fleetwarden-system.svc")
    );
    let secret = cert["spec"]["secretName"].as_str().unwrap();
    let deploy = find(&docs, "Deployment", "fw-fleetwarden-webhooks");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        secret
    );
    for kind in [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        let config = find(&docs, kind, "fw-fleetwarden-webhooks");
        assert_eq!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "fleetwarden-system/fw-fleetwarden-webhooks"
        );
        let hook = &config["webhooks"][0];
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(
            strings(&hook["admissionReviewVersions"]),
            BTreeSet::from(["v1".to_string()])
        );
        assert!(hook["timeoutSeconds"].as_u64().unwrap() <= 10);
        assert_eq!(
            hook["clientConfig"]["service"]["name"],
            "fw-fleetwarden-webhooks"
        );
        let excluded = strings(&hook["namespaceSelector"]["matchExpressions"][0]["values"]);
        assert_eq!(
            excluded,
            BTreeSet::from(["kube-system".to_string(), "fleetwarden-system".to_string()])
        );
        assert_eq!(
            strings(&hook["rules"][0]["resources"]),
            BTreeSet::from([
                "devices".into(),
                "devicegroups".into(),
                "updaterollouts".into()
            ])
        );
    }
}

#[test]
fn argo_cd_sync_waves_order_crds_webhook_configuration_then_controllers() {
    let docs = render(&[]);
    let wave = |kind: &str, name: &str| -> i64 {
        find(&docs, kind, name)["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
            .as_str()
            .unwrap_or_else(|| panic!("{kind} {name} has no sync wave"))
            .parse()
            .unwrap()
    };
    let crd_dir = helm::chart().join("crds");
    let mut crd_waves = BTreeSet::new();
    for entry in std::fs::read_dir(crd_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let crd: Value = serde_norway::from_str(&text).unwrap();
        crd_waves.insert(
            crd["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    let crd = *crd_waves.iter().max().unwrap();
    let webhook = wave("Deployment", "fw-fleetwarden-webhooks");
    let cert = wave("Certificate", "fw-fleetwarden-webhooks");
    let config = wave("ValidatingWebhookConfiguration", "fw-fleetwarden-webhooks");
    let operator = wave("Deployment", "fw-fleetwarden-operator");
    assert!(
        crd < webhook && cert <= webhook && webhook < config && config < operator,
        "waves: crds {crd}, certificate {cert}, webhook {webhook}, configuration {config}, operator {operator}"
    );
}

#[test]
fn the_values_schema_refuses_bad_values_with_their_path() {
    let chart = helm::chart();
    let chart = chart.to_str().unwrap();
    for (set, expected) in [
        ("operator.replicas=0", "/operator/replicas"),
        ("webhooks.failurePolicy=Maybe", "/webhooks/failurePolicy"),
        (
            "operater.replicas=2",
            "additional properties 'operater' not allowed",
        ),
        ("gateway.service.type=Internal", "/gateway/service/type"),
        (
            "operator.leaseDuration=15 seconds",
            "/operator/leaseDuration",
        ),
        ("webhooks.timeoutSeconds=60", "/webhooks/timeoutSeconds"),
        (
            "certManager.approvedIssuers[0].kind=Signer",
            "/certManager/approvedIssuers/0/kind",
        ),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("metrics.port=80", "/metrics/port"),
        ("gateway.lastSeenCheckIns=-1", "/gateway/lastSeenCheckIns"),
    ] {
        let (ok, _, stderr) = rt()
            .block_on(helm::run(&["template", "fw", chart, "--set", set]))
            .unwrap();
        assert!(!ok, "{set} was accepted");
        assert!(
            stderr.contains(expected),
            "{set}: expected {expected:?} in\n{stderr}"
        );
    }
}
