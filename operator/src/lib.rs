//! The Fleetwarden operator: controllers for Device identity, DeviceGroup inventory and
//! segmentation, and UpdateRollout progression, run by whichever replica holds the leader lease.
//! This crate writes only `status` of our kinds and the objects it owns; `spec` belongs to Git.

pub mod config;
pub mod controllers;
pub mod device;
pub mod device_plan;
pub mod group;
pub mod group_plan;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod readiness;
pub mod rollout;
pub mod rollout_plan;
pub mod runner;

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "fleetwarden-operator";
