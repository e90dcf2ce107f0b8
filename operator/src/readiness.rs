//! The operator's readiness: it can reach the API server and, when leading, its controllers have
//! started. A standby replica is ready: it is healthy and able to take over. Served on
//! `/readyz` by `plumbing::health`.

use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness facts, set by the loops that know them.
#[derive(Default, Debug)]
pub struct Readiness {
    api_reachable: AtomicBool,
    leader: AtomicBool,
    controllers_started: AtomicBool,
}

impl Readiness {
    pub fn set_api_reachable(&self, v: bool) {
        self.api_reachable.store(v, Ordering::Relaxed);
    }

    pub fn set_leader(&self, v: bool) {
        self.leader.store(v, Ordering::Relaxed);
    }

    pub fn set_controllers_started(&self, v: bool) {
        self.controllers_started.store(v, Ordering::Relaxed);
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.api_reachable.load(Ordering::Relaxed) {
            return Err("the Kubernetes API server has not answered yet");
        }
        if self.leader.load(Ordering::Relaxed) && !self.controllers_started.load(Ordering::Relaxed)
        {
            return Err("leading, controllers starting");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_replica_is_ready_once_the_api_answers() {
        let r = Readiness::default();
        assert!(r.check().is_err());
        r.set_api_reachable(true);
        assert_eq!(r.check(), Ok(()));
    }

    #[test]
    fn a_leader_is_ready_only_after_its_controllers_start() {
        let r = Readiness::default();
        r.set_api_reachable(true);
        r.set_leader(true);
        assert_eq!(r.check(), Err("leading, controllers starting"));
        r.set_controllers_started(true);
        assert_eq!(r.check(), Ok(()));
    }
}
