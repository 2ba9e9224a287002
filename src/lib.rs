//! hoist: a container image service for Kubernetes nodes.
//!
//! The pipeline and module map are described in `DESIGN.md`; each resource
//! (content, metadata, snapshots, remotes) lives in its own module behind a
//! trait with a conformance suite.

pub mod activity;
pub mod any_authority;
pub mod api;
pub mod archive;
pub mod check;
pub mod config;
pub mod containerd;
pub mod content;
pub mod cri;
pub mod descriptor;
pub mod diff;
pub mod digest;
pub mod erofs;
pub mod failpoint;
pub mod filters;
pub mod grpc_unix;
pub mod images;
pub mod metadata;
pub mod metrics;
pub mod mount;
pub mod pull;
pub mod reference;
pub mod remote;
pub mod root;
pub mod snapshot;
pub(crate) mod xattr;

/// An error and its causes, `: `-joined, skipping a cause whose text its
/// parent already quotes (hoist's errors name their source inline): what
/// the command line prints, and the message of the daemon's statuses, so
/// both say the same.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
