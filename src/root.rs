//! Where hoist keeps its state, who may reach it, the locks on it, and what
//! a namespace may be called.

use nix::fcntl::{Flock, FlockArg};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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

/// The root: others may pass through (a runtime reaching a mount below it)
/// but not list it; everything in it is the owner's alone.
pub const ROOT_MODE: u32 = 0o711;
/// `snapshots/`, each snapshotter's directory, `content/`: image trees and
/// blobs hold setuid binaries, device nodes and private layers.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// `meta.db*` and the lock files.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with exactly `mode` whatever the
/// umask, or, when it exists, takes away the permission bits `mode` lacks.
pub fn private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => set_mode(dir, mode),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !std::fs::metadata(dir)?.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
            tighten(dir, mode)
        }
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading and writing, creating it with exactly `mode`,
/// or taking from an existing file the permission bits `mode` lacks.
pub fn private_file(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    match options.clone().create_new(true).mode(mode).open(path) {
        Ok(file) => {
            // The umask may have taken bits `mode` asked for.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            Ok(file)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            tighten(path, mode)?;
            options.open(path)
        }
        Err(e) => Err(e),
    }
}

/// Takes from an existing `path` the permission bits `allowed` lacks,
/// logging it: roots made by older versions were open to every user.
/// A missing path is left alone.
pub fn tighten(path: &Path, allowed: u32) -> std::io::Result<()> {
    let mode = match std::fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let tight = mode & allowed;
    if tight != mode {
        set_mode(path, tight)?;
        tracing::warn!(
            path = %path.display(),
            from = format!("{mode:04o}"),
            to = format!("{tight:04o}"),
            "tightened permissions in the hoist root"
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates the root 0711, or tightens an existing one: hoist owns it.
pub fn prepare_root(root: &Path) -> std::io::Result<()> {
    private_dir(root, ROOT_MODE)
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

/// A lock on a root, in two files. `hoist.lock`: the daemon holds it
/// exclusively (with its socket path written inside), commands shared, so
/// a command never writes behind a live daemon's back. `gc.lock`: commands
/// hold it shared, and a command that collects garbage exclusively (then
/// `hoist.lock` too), so it never sweeps what another process is writing,
/// and anyone who finds `hoist.lock` taken while holding `gc.lock` knows a
/// daemon has it. The daemon needs no `gc.lock`: it collects in-process.
pub struct RootLock {
    // Fields drop in order: `hoist.lock` goes before `gc.lock`, so whoever
    // next gets `gc.lock` finds `hoist.lock` free unless a daemon has it.
    _root: Flock<std::fs::File>,
    _gc: Option<Flock<std::fs::File>>,
}

impl RootLock {
    fn open(root: &Path, name: &str) -> Result<(std::fs::File, PathBuf), LockError> {
        prepare_root(root).map_err(|source| LockError::Io {
            path: root.display().to_string(),
            source,
        })?;
        let path = root.join(name);
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        // Anyone who could open it could flock it and lock hoist out.
        let file = private_file(&path, PRIVATE_FILE_MODE).map_err(io)?;
        Ok((file, path))
    }

    /// Takes `name` as `arg` says; `None` when another holds it and `arg`
    /// does not wait.
    fn take(
        root: &Path,
        name: &str,
        arg: FlockArg,
    ) -> Result<Option<Flock<std::fs::File>>, LockError> {
        let (file, path) = Self::open(root, name)?;
        match Flock::lock(file, arg) {
            Ok(f) => Ok(Some(f)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(LockError::Io {
                path: path.display().to_string(),
                source: errno.into(),
            }),
        }
    }

    /// `take`, waiting (and saying why) when another holds it.
    fn take_waiting(
        root: &Path,
        name: &str,
        now: FlockArg,
        wait: FlockArg,
        why: &str,
    ) -> Result<Flock<std::fs::File>, LockError> {
        if let Some(f) = Self::take(root, name, now)? {
            return Ok(f);
        }
        tracing::warn!(root = %root.display(), "{why}");
        Self::take(root, name, wait)?.ok_or_else(|| LockError::Busy {
            root: root.display().to_string(),
        })
    }

    /// `hoist.lock` was taken by someone who holds no `gc.lock`: a daemon
    /// (or one starting, before it wrote its socket).
    fn held_by_daemon(root: &Path) -> LockError {
        let socket = std::fs::read_to_string(root.join("hoist.lock")).unwrap_or_default();
        let root = root.display().to_string();
        match socket.trim() {
            "" => LockError::Busy { root },
            socket => LockError::HeldByDaemon {
                root,
                socket: socket.to_string(),
            },
        }
    }

    /// For commands: waits out a garbage collection another command runs,
    /// and fails at once while a daemon holds the root.
    pub fn shared(root: &Path) -> Result<Self, LockError> {
        let gc = Self::take_waiting(
            root,
            "gc.lock",
            FlockArg::LockSharedNonblock,
            FlockArg::LockShared,
            "waiting for another hoist process to finish collecting garbage",
        )?;
        match Self::take(root, "hoist.lock", FlockArg::LockSharedNonblock)? {
            Some(f) => Ok(RootLock {
                _root: f,
                _gc: Some(gc),
            }),
            None => Err(Self::held_by_daemon(root)),
        }
    }

    /// For commands that collect garbage: the root to themselves, waiting
    /// for the other commands to finish; fails at once while a daemon holds
    /// the root (its own GC runs in-process, under its exclusive lock).
    pub fn collector(root: &Path) -> Result<Self, LockError> {
        let gc = Self::take_waiting(
            root,
            "gc.lock",
            FlockArg::LockExclusiveNonblock,
            FlockArg::LockExclusive,
            "waiting for the other hoist commands using this root to finish",
        )?;
        match Self::take(root, "hoist.lock", FlockArg::LockExclusiveNonblock)? {
            Some(f) => Ok(RootLock {
                _root: f,
                _gc: Some(gc),
            }),
            None => Err(Self::held_by_daemon(root)),
        }
    }

    /// For the daemon: records its socket for the message commands print.
    pub fn exclusive(root: &Path, socket: &Path) -> Result<Self, LockError> {
        let Some(lock) = Self::take(root, "hoist.lock", FlockArg::LockExclusiveNonblock)? else {
            // Commands, a collecting command, or another daemon; the file
            // may still name a dead daemon, so it is not read.
            return Err(LockError::Busy {
                root: root.display().to_string(),
            });
        };
        let path = root.join("hoist.lock");
        std::fs::write(&path, socket.display().to_string()).map_err(|source| LockError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(RootLock {
            _root: lock,
            _gc: None,
        })
    }
}

/// The socket of the daemon that holds `root`, if one does. A root without
/// a lock file has none, and is not made.
pub fn daemon_socket(root: &Path) -> Result<Option<PathBuf>, LockError> {
    if !root.join("hoist.lock").exists() {
        return Ok(None);
    }
    match RootLock::shared(root) {
        Ok(_) => Ok(None),
        Err(LockError::HeldByDaemon { socket, .. }) => Ok(Some(PathBuf::from(socket))),
        Err(e) => Err(e),
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
        assert_eq!(
            daemon_socket(dir.path()).unwrap(),
            Some(PathBuf::from("/run/x.sock"))
        );
        drop(daemon);
        assert_eq!(daemon_socket(dir.path()).unwrap(), None);
        let fresh = dir.path().join("never-made");
        assert_eq!(daemon_socket(&fresh).unwrap(), None);
        assert!(!fresh.exists(), "asking makes no root");
        let a = RootLock::shared(dir.path()).unwrap();
        let _b = RootLock::shared(dir.path()).unwrap();
        assert!(RootLock::exclusive(dir.path(), std::path::Path::new("/s")).is_err());
        drop(a);
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn roots_are_made_private_and_old_open_ones_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b/root");
        prepare_root(&fresh).unwrap();
        assert_eq!(mode(&fresh), ROOT_MODE);
        let old = dir.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o4777)).unwrap();
        prepare_root(&old).unwrap();
        assert_eq!(mode(&old), 0o711);
        // Tighter than asked stays as it is.
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o700)).unwrap();
        private_dir(&old, ROOT_MODE).unwrap();
        assert_eq!(mode(&old), 0o700);
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        private_file(&file, PRIVATE_FILE_MODE).unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "x",
            "not truncated"
        );
        // A file where a directory belongs is an error, not a root.
        assert!(private_dir(&file, PRIVATE_DIR_MODE).is_err());
        RootLock::shared(&fresh).unwrap();
        assert_eq!(mode(&fresh.join("hoist.lock")), 0o600);
        assert_eq!(mode(&fresh.join("gc.lock")), 0o600);
    }

    /// Runs `f` on a thread; `Some` with its result if it ends within `wait`.
    fn within<T: Send + 'static>(
        wait: std::time::Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> (std::sync::mpsc::Receiver<T>, Option<T>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        let got = rx.recv_timeout(wait).ok();
        (rx, got)
    }

    #[test]
    fn a_collector_waits_for_commands_and_they_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let short = std::time::Duration::from_millis(300);
        let long = std::time::Duration::from_secs(10);
        let command = RootLock::shared(&root).unwrap();
        let r = root.clone();
        let (rx, got) = within(short, move || RootLock::collector(&r).map(drop).is_ok());
        assert!(got.is_none(), "GC must wait while a command holds the root");
        drop(command);
        assert_eq!(rx.recv_timeout(long).ok(), Some(true));

        let gc = RootLock::collector(&root).unwrap();
        let r = root.clone();
        let (rx, got) = within(short, move || RootLock::shared(&r).map(drop).is_ok());
        assert!(got.is_none(), "a command must wait while GC runs");
        drop(gc);
        assert_eq!(rx.recv_timeout(long).ok(), Some(true));
    }

    #[test]
    fn a_collector_turns_away_from_a_daemon_naming_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = RootLock::exclusive(dir.path(), Path::new("/run/d.sock")).unwrap();
        let err = RootLock::collector(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/run/d.sock"), "{err}");
        drop(daemon);
        let gc = RootLock::collector(dir.path()).unwrap();
        // A daemon does not start behind a collecting command's back.
        assert!(RootLock::exclusive(dir.path(), Path::new("/s")).is_err());
        drop(gc);
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
