//! The one place where hoist's errors become gRPC statuses.

use crate::pull::Error as PullError;
use crate::remote::Error as RemoteError;
use tonic::{Code, Status};

pub fn pull_status(e: &PullError) -> Status {
    let msg = e.to_string();
    // Whichever step ran out: freeing space and pulling again finishes it.
    if e.is_out_of_space() {
        return Status::resource_exhausted(msg);
    }
    let code = match e {
        PullError::Reference(_) => Code::InvalidArgument,
        PullError::Remote(r) => match r {
            RemoteError::NotFound { .. } => Code::NotFound,
            RemoteError::Denied { .. } => Code::PermissionDenied,
            RemoteError::Unavailable { .. } => {
                return Status::unavailable(format!("RegistryUnavailable: {msg}"));
            }
            RemoteError::NoProgress { .. } => Code::DeadlineExceeded,
            RemoteError::Hosts(_) | RemoteError::Credentials(_) | RemoteError::Tls(_) => {
                Code::FailedPrecondition
            }
            RemoteError::Protocol { .. } => Code::Unknown,
            RemoteError::Content(c) => return content_status(c),
        },
        PullError::Image(i) => match i {
            crate::images::Error::NoMatchingPlatform { .. } => Code::NotFound,
            _ => Code::FailedPrecondition,
        },
        PullError::Content(c) => return content_status(c),
        // Like a manifest hoist cannot use: the image, not hoist, is at fault.
        PullError::Apply(_) if e.is_invalid_layer() => Code::FailedPrecondition,
        PullError::Metadata(_)
        | PullError::Snapshot(_)
        | PullError::Apply(_)
        | PullError::Internal(_) => Code::Internal,
    };
    Status::new(code, msg)
}

pub fn content_status(e: &crate::content::Error) -> Status {
    use crate::content::Error as C;
    let code = match e {
        C::NotFound(_) => Code::NotFound,
        C::AlreadyExists(_) => Code::AlreadyExists,
        C::Locked(_) => Code::Unavailable,
        C::SizeMismatch { .. } | C::DigestMismatch { .. } => Code::DataLoss,
        C::InvalidArgument(_) => Code::InvalidArgument,
        C::Io { .. } | C::Database(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// Snapshot errors with the codes containerd's errdefs give them, which its
/// snapshot clients branch on (AlreadyExists above all: a remote snapshot).
pub fn snapshot_status(e: &crate::snapshot::Error) -> Status {
    use crate::metadata::Error as M;
    use crate::snapshot::Error as S;
    let code = match e {
        S::NotFound(_) | S::Metadata(M::NotFound(_)) => Code::NotFound,
        S::AlreadyExists(_) | S::Metadata(M::AlreadyExists(_)) => Code::AlreadyExists,
        S::FailedPrecondition(_) | S::Metadata(M::FailedPrecondition(_)) => {
            Code::FailedPrecondition
        }
        S::InvalidArgument(_) | S::Metadata(M::InvalidArgument(_)) => Code::InvalidArgument,
        S::Metadata(M::Content(c)) => return content_status(c),
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// A pull's failure as hoist's API reports it: the code CRI gives it, and
/// the whole error chain as the command line prints it on a bare root.
pub fn api_pull_status(e: &PullError) -> Status {
    Status::new(pull_status(e).code(), crate::error_chain(e))
}

/// The command line's operations (`api::ops`), with the error chain the
/// command line prints on a bare root as the message.
pub fn ops_status(e: &crate::api::ops::Error) -> Status {
    use crate::api::ops::Error as O;
    let code = match e {
        O::Reference(_) | O::Platform(_) => Code::InvalidArgument,
        O::ImageNotFound(_) => Code::NotFound,
        O::NoLayers(_) | O::NotUnpacked { .. } => Code::FailedPrecondition,
        O::Metadata(crate::metadata::Error::NotFound(_)) => Code::NotFound,
        O::Metadata(crate::metadata::Error::InvalidArgument(_)) => Code::InvalidArgument,
        O::Stored(crate::images::stored::Error::Content(c)) => content_status(c).code(),
        O::Stored(crate::images::stored::Error::Image(
            crate::images::Error::NoMatchingPlatform { .. },
        )) => Code::NotFound,
        O::Stored(_) => Code::FailedPrecondition,
        O::Snapshot(s) => snapshot_status(s).code(),
        O::Content(c) => content_status(c).code(),
        O::Filter(_) => Code::InvalidArgument,
        O::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        O::Metadata(_) | O::Mount(_) | O::Io { .. } => Code::Internal,
    };
    Status::new(code, crate::error_chain(e))
}

/// Failures of the service's own bookkeeping.
pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

pub fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Recording a pulled image's names: a removal that overlapped the pull
/// aborts it (pulling again records it); anything else is internal.
pub fn record_status(e: &crate::cri::records::Error) -> Status {
    match e {
        crate::cri::records::Error::Removed(_) => Status::aborted(e.to_string()),
        _ => internal(e),
    }
}

/// An id prefix that fits several images: the caller has to give more of it.
pub fn ambiguous(e: &crate::cri::records::Ambiguous) -> Status {
    Status::invalid_argument(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn codes() {
        let remote = |r| pull_status(&PullError::Remote(r));
        let s = remote(RemoteError::NotFound {
            registry: "r".into(),
            what: "manifest x".into(),
        });
        assert_eq!(s.code(), Code::NotFound);
        let s = remote(RemoteError::Unavailable {
            registry: "r".into(),
            message: "refused".into(),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            s.message().starts_with("RegistryUnavailable"),
            "{}",
            s.message()
        );
        let s = remote(RemoteError::Denied {
            registry: "reg.example".into(),
            what: "x".into(),
            message: "401".into(),
        });
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("reg.example"));
        let s = remote(RemoteError::NoProgress {
            what: "blob".into(),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let applying = |source| {
            pull_status(&PullError::Apply(crate::diff::Error::Archive {
                layer: "sha256:l".into(),
                dir: "/root/snapshots/erofs/3".into(),
                source,
            }))
        };
        use crate::archive::ArchiveError as A;
        let s = applying(A::Breakout {
            path: "../x".into(),
            reason: "climbs out".into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("sha256:l") && s.message().contains("../x"));
        let full = |source| A::Io {
            op: "writing".into(),
            path: "big".into(),
            source,
        };
        let s = applying(full(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("/root/snapshots/erofs/3"),
            "{}",
            s.message()
        );
        let s = applying(full(std::io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(s.code(), Code::Internal);
        let s = pull_status(&PullError::Content(crate::content::Error::Io {
            context: "writing ingest x".into(),
            source: std::io::Error::from_raw_os_error(libc::EDQUOT),
        }));
        assert_eq!(s.code(), Code::ResourceExhausted);
        let bad = crate::reference::Reference::parse("UPPER").unwrap_err();
        assert_eq!(
            pull_status(&PullError::Reference(bad)).code(),
            Code::InvalidArgument
        );
        // hoist's API says what the command line says, with CRI's code.
        let s = api_pull_status(&PullError::Remote(RemoteError::Unavailable {
            registry: "r".into(),
            message: "refused".into(),
        }));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            !s.message().starts_with("RegistryUnavailable"),
            "{}",
            s.message()
        );
        use crate::api::ops::Error as O;
        assert_eq!(
            ops_status(&O::ImageNotFound("x".into())).code(),
            Code::NotFound
        );
        let s = ops_status(&O::NotUnpacked {
            name: "x".into(),
            top: "sha256:t".into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("sha256:t"), "{}", s.message());
        let s = ops_status(&O::Io {
            context: "resolving /gone".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(s.code(), Code::NotFound);
        assert!(
            s.message().starts_with("resolving /gone: "),
            "{}",
            s.message()
        );
        let s = ambiguous(&crate::cri::records::Ambiguous {
            prefix: "abcdef012345".into(),
            candidates: vec!["sha256:abcdef0123450".into(), "sha256:abcdef0123451".into()],
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("sha256:abcdef0123450")
                && s.message().contains("sha256:abcdef0123451"),
            "{}",
            s.message()
        );
    }
}
