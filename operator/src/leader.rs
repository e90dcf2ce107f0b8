//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one runs the controllers.
//!
//! The algorithm is client-go's: a candidate takes the lease when it is free or when the record
//! it observes has not changed for a whole lease duration *by its own clock* (so clock skew
//! between replicas does not matter); writes use the Lease's resourceVersion, so two candidates
//! can never both win. A leader that cannot renew within `renew_deadline` (shorter than the lease
//! duration) steps down before anyone else may take over. On shutdown the leader releases the
//! lease so a standby takes over at its next poll instead of after expiry.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica (pod name).
    pub identity: String,
    /// How long a lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down. Must be below `lease_duration`.
    pub renew_deadline: Duration,
    /// How often a standby looks at the lease, and how soon a leader retries a failed renewal.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Checks the timing relations the algorithm's safety depends on.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period * 2 > self.renew_deadline {
            return Err(format!(
                "retry period ({:?}) must be at most half the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        if self.lease_duration < Duration::from_secs(1) {
            return Err("lease duration must be at least 1s".into());
        }
        Ok(())
    }

    /// A leader renews this often (three renewals per lease duration).
    fn renew_interval(&self) -> Duration {
        (self.lease_duration / 3).max(self.retry_period)
    }
}

/// The lease fields that identify one holder's record; any change restarts the expiry clock.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    lease_duration_seconds: Option<i32>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            lease_duration_seconds: spec.and_then(|s| s.lease_duration_seconds),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Free or expired: take it.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds a live lease.
    Standby,
}

/// Decides what to do with a lease whose record (holder, lease duration) was first observed in
/// its current form at `observed_at` on our monotonic clock.
pub fn decide(
    holder: Option<&str>,
    lease_duration: Duration,
    observed_at: Instant,
    me: &str,
    now: Instant,
) -> Decision {
    match holder {
        None | Some("") => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        Some(_) if now >= observed_at + lease_duration => Decision::Acquire,
        Some(_) => Decision::Standby,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lease {namespace}/{name}: request timed out")]
    Timeout { namespace: String, name: String },
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    observed: Option<(Record, Instant)>,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
        }
    }

    fn api_err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    /// One attempt. `Ok(true)` when we hold the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now_wall = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.api_err(e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    labels: Some(
                        [(
                            crds::MANAGED_BY_LABEL.0.to_string(),
                            crds::MANAGED_BY_LABEL.1.to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now_wall.clone()),
                    renew_time: Some(now_wall),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.api_err(e)),
            };
        };

        let record = Record::of(&lease);
        let now = Instant::now();
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.observed = Some((record.clone(), now));
                now
            }
        };
        let their_duration = record
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.lease_duration);
        let decision = decide(
            record.holder.as_deref(),
            their_duration,
            observed_at,
            &self.cfg.identity,
            now,
        );
        if decision == Decision::Standby {
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if decision == Decision::Acquire {
            if record.holder.is_some() {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.acquire_time = Some(now_wall.clone());
        }
        spec.holder_identity = Some(self.cfg.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(now_wall);
        // `replace` carries the resourceVersion we read: if anyone wrote in between, we lose.
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observed = Some((Record::of(&written), Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.api_err(e)),
        }
    }

    /// Gives the lease up if we hold it, so a standby can take over at once.
    async fn release(&mut self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.api_err(e))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
            .map_err(|e| self.api_err(e))?;
        Ok(())
    }

    /// Campaigns until `shutdown`, publishing leadership on `leading`. Reports whether the API
    /// server answered through `on_api`, for readiness.
    pub async fn run(
        mut self,
        leading: watch::Sender<bool>,
        on_api: impl Fn(bool),
        shutdown: CancellationToken,
    ) {
        let mut last_renewed: Option<Instant> = None;
        loop {
            let attempt =
                tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew())
                    .await
                    .unwrap_or_else(|_| {
                        Err(LeaderError::Timeout {
                            namespace: self.cfg.namespace.clone(),
                            name: self.cfg.lease_name.clone(),
                        })
                    });
            let was_leader = *leading.borrow();
            let is_leader = match attempt {
                Ok(held) => {
                    on_api(true);
                    if held {
                        last_renewed = Some(Instant::now());
                    }
                    held
                }
                Err(e) => {
                    on_api(false);
                    let deadline_passed =
                        last_renewed.is_none_or(|t| t.elapsed() >= self.cfg.renew_deadline);
                    tracing::warn!(error = %e, leader = was_leader, "leader election attempt failed");
                    was_leader && !deadline_passed
                }
            };
            if is_leader != was_leader {
                if is_leader {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.lease_name, "became leader");
                } else {
                    tracing::warn!(identity = %self.cfg.identity, lease = %self.cfg.lease_name, "lost leadership");
                }
                let _ = leading.send(is_leader);
            }
            let pause =
                if is_leader && last_renewed.is_some_and(|t| t.elapsed() < self.cfg.retry_period) {
                    self.cfg.renew_interval()
                } else {
                    self.cfg.retry_period
                };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            match tokio::time::timeout(self.cfg.renew_deadline, self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %self.cfg.lease_name, "released leader lease"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not release the leader lease; it will expire")
                }
                Err(_) => tracing::warn!("releasing the leader lease timed out; it will expire"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_lease_is_taken() {
        let t = Instant::now();
        assert_eq!(decide(None, LEASE, t, "me", t), Decision::Acquire);
        assert_eq!(decide(Some(""), LEASE, t, "me", t), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        let t = Instant::now();
        assert_eq!(decide(Some("me"), LEASE, t, "me", t), Decision::Renew);
    }

    #[test]
    fn a_live_lease_of_another_replica_is_respected_until_it_expires_by_our_clock() {
        let seen = Instant::now();
        assert_eq!(
            decide(
                Some("other"),
                LEASE,
                seen,
                "me",
                seen + LEASE - Duration::from_millis(1)
            ),
            Decision::Standby
        );
        assert_eq!(
            decide(Some("other"), LEASE, seen, "me", seen + LEASE),
            Decision::Acquire
        );
    }

    fn cfg(lease: u64, deadline: u64, retry: u64) -> LeaderConfig {
        LeaderConfig {
            lease_name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(deadline),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn unsafe_timings_are_rejected_with_the_relation_to_fix() {
        assert!(cfg(15, 10, 2).validate().is_ok());
        assert!(
            cfg(10, 10, 2)
                .validate()
                .unwrap_err()
                .contains("shorter than the lease duration")
        );
        assert!(
            cfg(15, 10, 6)
                .validate()
                .unwrap_err()
                .contains("half the renew deadline")
        );
    }

    #[test]
    fn a_leader_renews_three_times_per_lease() {
        assert_eq!(cfg(15, 10, 2).renew_interval(), Duration::from_secs(5));
        assert_eq!(cfg(3, 2, 1).renew_interval(), Duration::from_secs(1));
    }
}
