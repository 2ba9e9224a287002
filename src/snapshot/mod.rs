//! Snapshotters, with containerd's semantics: a committed snapshot is an
//! immutable layer named by its chain ID; an active one is a writable tree on
//! top of a committed parent; a view is a read-only one. Records live in
//! SQLite ([`store::Snapshots`]); the trees on disk belong to a [`Backend`]:
//! [`overlay`] stacks directories with overlayfs, [`native`] copies them,
//! [`erofs`] mounts indexed layer tars as overlay's lowers.

pub mod erofs;
pub mod native;
pub mod overlay;
pub mod store;
#[cfg(test)]
pub mod testsuite;
pub mod usage;

use crate::filters::{Adaptor, Filter};
use crate::metadata::Labels;
use crate::mount::Mount;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use store::{SnapshotRoot, Snapshots};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
    #[error("snapshot database: {}", crate::metadata::describe_db_error(.0))]
    Database(#[from] rusqlite::Error),
    #[error(transparent)]
    Mount(#[from] crate::mount::Error),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "View",
            Kind::Active => "Active",
            Kind::Committed => "Committed",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "View" => Some(Kind::View),
            "Active" => Some(Kind::Active),
            "Committed" => Some(Kind::Committed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    /// The key of an active snapshot or view, the name of a committed one.
    pub name: String,
    pub parent: Option<String>,
    pub labels: Labels,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.name.clone()),
            [f] if f == "kind" => Some(self.kind.as_str().to_string()),
            [f] if f == "parent" => self.parent.clone(),
            [f, key] if f == "labels" => self.labels.get(key).cloned(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

pub trait Snapshotter: Send + Sync {
    /// `overlayfs` or `native`: the name in GC labels and lease resources.
    fn name(&self) -> &str;
    fn stat(&self, key: &str) -> Result<Info>;
    fn update(&self, info: Info, fieldpaths: &[&str]) -> Result<Info>;
    fn usage(&self, key: &str) -> Result<Usage>;
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>>;
    fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>>;
    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()>;
    /// Fails with FailedPrecondition while the snapshot has children.
    fn remove(&self, key: &str) -> Result<()>;
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()>;
    /// The directory an applier writes a layer into for an active snapshot,
    /// and the trees of its parents (newest first), if the backend has them.
    fn apply_dirs(&self, key: &str) -> Result<(PathBuf, Vec<PathBuf>)>;
}

/// How a snapshotter keeps trees on disk: under `<root>/<id>/fs`.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Fills a new snapshot directory `dir` (not yet in place) for a snapshot
    /// of `kind` over `parents` (their `fs` dirs, newest first).
    fn create(&self, dir: &Path, parents: &[PathBuf], kind: Kind) -> Result<()>;
    fn mounts(&self, dir: &Path, parents: &[PathBuf], kind: Kind) -> Vec<Mount>;
    /// Whether an applier writing into `fs` must produce overlay whiteouts.
    fn overlay_upper(&self) -> Option<bool> {
        None
    }
    /// Whether a snapshot's tree is independent of its parent's, so that it
    /// can be built first and given its parent at commit.
    fn rebases(&self) -> bool {
        false
    }
    /// Whether an unpack indexes a layer's tar into the snapshot directory
    /// ([`crate::archive::index_layer`]) instead of applying it into `fs`.
    fn indexes_layers(&self) -> bool {
        false
    }
    /// Makes committed snapshot `dir`'s tree readable at `dir/fs` (a
    /// mount a restart took away); called before it is handed out.
    fn ready(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Undoes [`Backend::ready`] before `dir` is removed.
    fn release(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Makes active snapshot `dir` durable as it is committed; returns
    /// what it uses.
    fn seal(&self, dir: &Path) -> Result<Usage> {
        seal_tree(&dir.join("fs"))
    }
}

/// One sync of the filesystem holding `fs` instead of an fsync per file
/// written; then what the tree uses.
pub(crate) fn seal_tree(fs: &Path) -> Result<Usage> {
    let dir = std::fs::File::open(fs).map_err(io_err(format!("opening {}", fs.display())))?;
    nix::unistd::syncfs(&dir).map_err(|e| io_err(format!("syncing {}", fs.display()))(e.into()))?;
    crate::failpoint!("snapshot-commit");
    usage::disk_usage(fs)
}

/// Every backend's name, in the order a root without one prefers them.
pub const NAMES: [&str; 3] = ["erofs", "overlayfs", "native"];

/// A backend's name as `NAMES` spells it (`overlay` is `overlayfs`).
pub fn canonical_name(name: &str) -> Result<&'static str> {
    let name = if name == "overlay" { "overlayfs" } else { name };
    NAMES.into_iter().find(|n| *n == name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "unknown snapshotter {name:?}: use erofs, overlayfs or native"
        ))
    })
}

/// The snapshotter named `name` (`erofs`, `overlayfs` or `native`). With
/// `None`, the one this root was made with; a new root gets erofs where
/// this host supports it, else overlay where it supports that, else native.
pub fn open(
    db: &std::sync::Arc<crate::metadata::Db>,
    name: Option<&str>,
) -> Result<std::sync::Arc<SnapshotRoot>> {
    let name = name.map(canonical_name).transpose()?;
    let snapshots = db.root().join("snapshots");
    // Before the overlay probe, which would make it with the umask's mode.
    private_dir(&snapshots)?;
    let existing = NAMES.into_iter().find(|n| snapshots.join(n).is_dir());
    let backend: Box<dyn Backend> = match name.or(existing) {
        Some("erofs") => {
            // A root that has erofs layers was probed when it got them.
            if existing != Some("erofs") {
                erofs::supported(&snapshots).map_err(|why| {
                    Error::FailedPrecondition(format!(
                        "the erofs snapshotter cannot work here: {why}"
                    ))
                })?;
            }
            Box::new(erofs::Erofs::new())
        }
        Some("overlayfs") => Box::new(overlay::Overlay::new()),
        // "native": `NAMES` has no other.
        Some(_) => Box::new(native::Native),
        None => match erofs::supported(&snapshots) {
            Ok(()) => Box::new(erofs::Erofs::new()),
            Err(why) if overlay::supported(&snapshots) => {
                tracing::info!(reason = %why, "EROFS layers are not available here: using overlayfs");
                Box::new(overlay::Overlay::new())
            }
            Err(_) => Box::new(native::Native),
        },
    };
    SnapshotRoot::new(db.clone(), backend)
}

/// `dir` 0700 (tightened if it exists): the trees under `snapshots/` hold
/// setuid binaries and device nodes, so nobody but hoist may reach one.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    crate::root::private_dir(dir, crate::root::PRIVATE_DIR_MODE)
        .map_err(io_err(format!("creating {}", dir.display())))
}

/// A directory of an image tree: exactly `mode`, whatever the umask, since
/// the layers applied into it may never say otherwise.
pub(crate) fn tree_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
        .map_err(io_err(format!("creating {}", dir.display())))
}

/// Every snapshotter that has snapshots under this root, for GC.
pub fn open_existing(
    db: &std::sync::Arc<crate::metadata::Db>,
) -> Result<Vec<std::sync::Arc<SnapshotRoot>>> {
    let mut out = Vec::new();
    for name in NAMES {
        if db.root().join("snapshots").join(name).is_dir() {
            out.push(open(db, Some(name))?);
        }
    }
    Ok(out)
}

/// Runs garbage collection over content and every snapshotter on disk.
pub fn garbage_collect(
    db: &std::sync::Arc<crate::metadata::Db>,
) -> Result<crate::metadata::gc::GcReport> {
    let roots = open_existing(db)?;
    let collectors: Vec<&dyn crate::metadata::gc::SnapshotCollector> = roots
        .iter()
        .map(|r| &**r as &dyn crate::metadata::gc::SnapshotCollector)
        .collect();
    Ok(db.garbage_collect(&collectors)?)
}

#[cfg(test)]
mod tests {
    use super::open;

    #[test]
    fn names_are_checked_and_overlay_is_overlayfs() {
        assert_eq!(super::canonical_name("overlay").unwrap(), "overlayfs");
        for name in super::NAMES {
            assert_eq!(super::canonical_name(name).unwrap(), name);
        }
        let refused = super::canonical_name("zfs").unwrap_err().to_string();
        assert!(refused.contains("unknown snapshotter \"zfs\""), "{refused}");
    }

    /// The default is for new roots only: one made with another backend
    /// keeps it, whatever this host would choose now.
    #[test]
    fn an_existing_root_keeps_its_snapshotter() {
        for made in ["native", "overlayfs"] {
            let dir = tempfile::tempdir().unwrap();
            let db = crate::metadata::Db::open(dir.path()).unwrap();
            open(&db, Some(made)).unwrap();
            assert_eq!(open(&db, None).unwrap().name(), made);
        }
    }

    #[test]
    fn an_unknown_snapshotter_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::metadata::Db::open(dir.path()).unwrap();
        let err = open(&db, Some("zfs")).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("\"zfs\"") && e.contains("erofs"))
        );
    }
}
