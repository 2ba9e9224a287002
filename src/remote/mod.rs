//! Talking to registries: host configuration (`hosts.toml`), credentials and
//! token auth, and a client that resolves references and streams blobs with
//! retries and `Range` resume.
//!
//! The HTTP layer is hoist's own, on `reqwest`: hosts.toml mirrors need
//! per-host base paths, `?ns=` queries, per-host TLS settings and resumable
//! range reads, which `oci-client`'s client does not expose.

pub mod auth;
pub mod client;
pub mod credential_helper;
pub mod hosts;

pub use auth::{CredentialSource, Credentials, Secret};
pub use client::{RangedFetch, RegistryClient, RemoteOptions};
pub use hosts::{HostsConfig, HostsError, RegistryHost};

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Makes ring the process's rustls provider, once, before any HTTP client
/// is built: reqwest is built without a provider of its own (its default,
/// aws-lc-rs, is a large C build) and would panic without one. A provider
/// the process installed earlier stays.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error("{what} not found at {registry}")]
    NotFound { registry: String, what: String },
    #[error("access to {what} denied by {registry}: {message}")]
    Denied {
        registry: String,
        what: String,
        message: String,
    },
    #[error("registry {registry} unavailable: {message}")]
    Unavailable { registry: String, message: String },
    #[error("{what}: no progress for {timeout:?} (pull_progress_timeout)")]
    NoProgress { what: String, timeout: Duration },
    #[error("unexpected answer from {registry} for {what}: {message}")]
    Protocol {
        registry: String,
        what: String,
        message: String,
    },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("registry TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    Content(#[from] crate::content::Error),
}
