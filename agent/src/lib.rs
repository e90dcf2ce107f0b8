//! The reference Fleetwarden device agent: key generation on the device, EST-style enrollment
//! and renewal, check-ins, verified A/B firmware installation; and a simulator that runs many
//! virtual devices in one process.

pub mod backoff;
pub mod client;
pub mod device;
pub mod firmware;
pub mod simulate;
