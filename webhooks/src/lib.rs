//! Fleetwarden's admission webhooks. `rules` holds what is valid, `defaults` what is filled in,
//! `review` turns AdmissionReview bytes into answers (never panicking), and `server` serves them
//! over TLS from watch caches.

pub mod defaults;
pub mod metrics;
pub mod review;
pub mod rules;
pub mod server;
pub mod tls;
