//! Leader election between real operator processes on a real Lease.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, ensure};
use e2e::{Env, Process, eventually, free_port, http_get};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

const LEASE: Duration = Duration::from_secs(6);
const RETRY: Duration = Duration::from_secs(1);

struct Replica {
    id: String,
    port: u16,
    process: Process,
}

fn start_replica(env: &Env, ns: &str, id: &str) -> anyhow::Result<Replica> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let process = env.spawn(
        "fleetwarden-operator",
        &format!("{ns}-{id}"),
        &[
            "--identity",
            id,
            "--watch-namespace",
            ns,
            "--lease-name",
            "fleetwarden-operator",
            "--lease-namespace",
            ns,
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
    Ok(Replica {
        id: id.to_string(),
        port,
        process,
    })
}

async fn holder(api: &Api<Lease>) -> anyhow::Result<Option<String>> {
    Ok(api
        .get_opt("fleetwarden-operator")
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

async fn leader_gauge(port: u16) -> anyhow::Result<String> {
    let (status, body) = http_get(port, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    body.lines()
        .find(|l| l.starts_with("fleetwarden_operator_leader "))
        .map(|l| {
            l.trim_start_matches("fleetwarden_operator_leader ")
                .to_string()
        })
        .context("no fleetwarden_operator_leader gauge in /metrics")
}

/// Starts two replicas and waits for one to lead; returns (leader, standby).
async fn elect(env: &Env, ns: &str, api: &Api<Lease>) -> anyhow::Result<(Replica, Replica)> {
    let a = start_replica(env, ns, "replica-a")?;
    let b = start_replica(env, ns, "replica-b")?;
    let leader = eventually(Duration::from_secs(20), "a leader", || async {
        holder(api).await
    })
    .await?;
    let (leader, standby) = if leader == a.id { (a, b) } else { (b, a) };
    for r in [&leader, &standby] {
        let port = r.port;
        eventually(Duration::from_secs(10), "ready probes", || async move {
            let ready = http_get(port, "/readyz")
                .await
                .ok()
                .filter(|(s, _)| *s == 200);
            let live = http_get(port, "/healthz")
                .await
                .ok()
                .filter(|(s, _)| *s == 200);
            Ok(ready.and(live))
        })
        .await
        .with_context(|| format!("{} never became ready; log:\n{}", r.id, r.process.log()))?;
    }
    ensure!(
        leader_gauge(leader.port).await? == "1",
        "leader's gauge is not 1"
    );
    ensure!(
        leader_gauge(standby.port).await? == "0",
        "standby's gauge is not 0"
    );
    Ok((leader, standby))
}

pub async fn one_of_two_operators_leads_and_a_standby_takes_over_after_a_kill(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let ns = env.namespace("leader-kill").await?;
    let api: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let (mut leader, mut standby) = elect(&env, &ns, &api).await?;

    leader.process.kill().await?;
    let killed_at = jiff::Timestamp::now();
    let lease = api.get("fleetwarden-operator").await?;
    let spec = lease.spec.context("lease without spec")?;
    let last_renewal = spec.renew_time.context("lease never renewed")?.0;
    let transitions_before = spec.lease_transitions.unwrap_or(0);

    let standby_id = standby.id.clone();
    eventually(
        Duration::from_secs(20),
        "the standby to take over",
        || async {
            Ok((holder(&api).await?.as_deref() == Some(standby_id.as_str())).then_some(()))
        },
    )
    .await
    .with_context(|| format!("standby log:\n{}", standby.process.log()))?;
    let spec = api
        .get("fleetwarden-operator")
        .await?
        .spec
        .context("lease without spec")?;
    let acquired = spec.acquire_time.context("no acquireTime")?.0;
    let after_expiry = acquired.duration_since(last_renewal);
    let lease_secs = LEASE.as_secs_f64();
    eprintln!(
        "leader killed; standby took over {:.2}s after the kill, {:.2}s after the last renewal (lease {lease_secs}s)",
        acquired.duration_since(killed_at).as_secs_f64(),
        after_expiry.as_secs_f64()
    );
    // Never before the lease expired (that would be two leaders) ...
    ensure!(
        after_expiry.as_secs_f64() >= lease_secs - 0.5,
        "standby took over {after_expiry:?} after the last renewal, before the {LEASE:?} lease expired"
    );
    // ... and within one poll of its expiry.
    ensure!(
        after_expiry.as_secs_f64() <= lease_secs + RETRY.as_secs_f64() + 2.0,
        "takeover took {after_expiry:?} after the last renewal; expected within {LEASE:?} + one {RETRY:?} poll"
    );
    ensure!(
        spec.lease_transitions == Some(transitions_before + 1),
        "leaseTransitions not incremented"
    );
    let port = standby.port;
    eventually(
        Duration::from_secs(5),
        "the new leader's gauge",
        || async move { Ok((leader_gauge(port).await? == "1").then_some(())) },
    )
    .await?;
    ensure!(
        standby.process.terminate(Duration::from_secs(15)).await?,
        "standby exited uncleanly"
    );
    Ok(())
}

pub async fn sigterm_releases_the_lease_for_an_immediate_takeover(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let ns = env.namespace("leader-term").await?;
    let api: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let (mut leader, mut standby) = elect(&env, &ns, &api).await?;

    let started = tokio::time::Instant::now();
    ensure!(
        leader.process.terminate(Duration::from_secs(15)).await?,
        "leader exited uncleanly on SIGTERM; log:\n{}",
        leader.process.log()
    );
    ensure!(
        leader.process.log().contains("released leader lease"),
        "leader did not release: {}",
        leader.process.log()
    );
    let standby_id = standby.id.clone();
    eventually(
        LEASE / 2,
        "the standby to take the released lease",
        || async {
            Ok((holder(&api).await?.as_deref() == Some(standby_id.as_str())).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "leader stopped by SIGTERM; standby led {:.2}s later (lease {}s: release avoided waiting for expiry)",
        started.elapsed().as_secs_f64(),
        LEASE.as_secs()
    );
    ensure!(
        standby.process.terminate(Duration::from_secs(15)).await?,
        "standby exited uncleanly"
    );
    Ok(())
}
