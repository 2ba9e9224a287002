//! hoist: a container image service for Kubernetes nodes.
//!
//! The pipeline and module map are described in `DESIGN.md`; each resource
//! (content, metadata, snapshots, remotes) lives in its own module behind a
//! trait with a conformance suite.

pub mod any_authority;
pub mod archive;
pub mod config;
pub mod containerd;
pub mod content;
pub mod cri;
pub mod descriptor;
pub mod diff;
pub mod digest;
pub mod filters;
pub mod grpc_unix;
pub mod images;
pub mod metadata;
pub mod mount;
pub mod pull;
pub mod reference;
pub mod remote;
pub mod root;
pub mod snapshot;
pub(crate) mod xattr;
