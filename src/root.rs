//! Where hoist keeps its state, and what a namespace may be called.

use std::path::PathBuf;

/// `/var/lib/hoist` for root; `$XDG_DATA_HOME/hoist` (or
/// `~/.local/share/hoist`) for anyone else, who cannot write there.
pub fn default_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/hoist");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("hoist");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/hoist"),
        None => PathBuf::from("/var/lib/hoist"),
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid namespace {0:?}: use lower case letters, digits, '.' and '-', starting with a letter or digit"
)]
pub struct InvalidNamespace(pub String);

/// Namespaces follow containerd's rule; in particular they never hold `/`,
/// which separates the namespace from the ref in ingest names on disk.
pub fn validate_namespace(ns: &str) -> Result<(), InvalidNamespace> {
    let ok = !ns.is_empty()
        && ns.len() <= 76
        && ns.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(InvalidNamespace(ns.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{root} is in use by the hoist daemon serving {socket}: talk to it (crictl --image-endpoint unix://{socket}) or stop it first"
    )]
    HeldByDaemon { root: String, socket: String },
    #[error("{root} is in use by another hoist process")]
    Busy { root: String },
    #[error("locking {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A lock on a root: the daemon holds it exclusively (with its socket path
/// written inside), commands hold it shared, so a command never writes
/// behind a live daemon's back.
pub struct RootLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl RootLock {
    fn open(root: &std::path::Path) -> Result<(std::fs::File, PathBuf), LockError> {
        let path = root.join("hoist.lock");
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(root).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        Ok((file, path))
    }

    fn lock(root: &std::path::Path, arg: nix::fcntl::FlockArg) -> Result<Self, LockError> {
        let (file, path) = Self::open(root)?;
        match nix::fcntl::Flock::lock(file, arg) {
            Ok(f) => Ok(RootLock { _file: f }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let socket = std::fs::read_to_string(&path).unwrap_or_default();
                let root = root.display().to_string();
                // A daemon that cannot get the lock meets a command (or
                // another daemon); the file may still name a dead daemon.
                let exclusive = matches!(arg, nix::fcntl::FlockArg::LockExclusiveNonblock);
                if socket.trim().is_empty() || exclusive {
                    Err(LockError::Busy { root })
                } else {
                    Err(LockError::HeldByDaemon {
                        root,
                        socket: socket.trim().to_string(),
                    })
                }
            }
            Err((_, errno)) => Err(LockError::Io {
                path: path.display().to_string(),
                source: errno.into(),
            }),
        }
    }

    /// For commands: fails at once while a daemon holds the root.
    pub fn shared(root: &std::path::Path) -> Result<Self, LockError> {
        Self::lock(root, nix::fcntl::FlockArg::LockSharedNonblock)
    }

    /// For the daemon: records its socket for the message commands print.
    pub fn exclusive(root: &std::path::Path, socket: &std::path::Path) -> Result<Self, LockError> {
        let lock = Self::lock(root, nix::fcntl::FlockArg::LockExclusiveNonblock)?;
        let path = root.join("hoist.lock");
        std::fs::write(&path, socket.display().to_string()).map_err(|source| LockError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(lock)
    }
}

/// `1.5 MiB`, `512 B`: sizes as people read them.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["default", "k8s.io", "a-b", "9x"] {
            assert!(validate_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "K8s", "a/b", ".x", "-x", "a b"] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_daemon_lock_turns_commands_away_naming_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = RootLock::exclusive(dir.path(), std::path::Path::new("/run/x.sock")).unwrap();
        let err = RootLock::shared(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/run/x.sock"), "{err}");
        drop(daemon);
        let a = RootLock::shared(dir.path()).unwrap();
        let _b = RootLock::shared(dir.path()).unwrap();
        assert!(RootLock::exclusive(dir.path(), std::path::Path::new("/s")).is_err());
        drop(a);
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
