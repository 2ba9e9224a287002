//! What the command line does to a root besides pulling, done alike by
//! `hoist` on a bare root and by the daemon for hoist's API: list, remove,
//! mount, unmount, collect. Every call blocks (SQLite, the filesystem,
//! mounts): async callers run them on blocking threads.

use crate::content::Store;
use crate::descriptor::Descriptor;
use crate::filters::Filter;
use crate::images::{self, Kind};
use crate::metadata::gc::{GcReport, LABEL_ROOT};
use crate::metadata::{ContentStore, Db};
use crate::reference::Reference;
use crate::snapshot::{self, Snapshotter};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error(transparent)]
    Platform(#[from] crate::images::platform::InvalidPlatform),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("{0} has no layers")]
    NoLayers(String),
    #[error("{name} is not unpacked (no snapshot {top}); pull it without --no-unpack")]
    NotUnpacked { name: String, top: String },
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
    #[error(transparent)]
    Stored(#[from] crate::images::stored::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    #[error(transparent)]
    Filter(#[from] crate::filters::FilterError),
    #[error(transparent)]
    Mount(#[from] crate::mount::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// One line of `hoist images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub name: String,
    pub digest: String,
    /// What is stored of it: manifests, configs and the layers present.
    pub size: u64,
    /// The platforms its index lists.
    pub platforms: Vec<String>,
}

pub fn list_images(db: &Arc<Db>, namespace: &str) -> Result<Vec<ImageSummary>> {
    let store = db.content_store(namespace);
    Ok(db
        .list_images(namespace, &Filter::default())?
        .into_iter()
        .map(|image| {
            let (size, platforms) = size_and_platforms(&store, &image.target);
            ImageSummary {
                name: image.name,
                digest: image.target.digest.to_string(),
                size,
                platforms,
            }
        })
        .collect())
}

/// Size of what is stored for the image (manifests, configs, layers present),
/// and the platforms its index lists. What cannot be read counts nothing.
fn size_and_platforms(store: &ContentStore, target: &Descriptor) -> (u64, Vec<String>) {
    let read = |d: &Descriptor| -> Option<Vec<u8>> {
        let mut blob = store.reader_at(&d.digest).ok()?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut blob, &mut out).ok()?;
        Some(out)
    };
    let present = |d: &Descriptor| store.info(&d.digest).map(|i| i.size).unwrap_or(0);
    let manifest_size = |d: &Descriptor| -> u64 {
        let Some(body) = read(d) else { return 0 };
        let Ok(m) = images::parse_manifest(d, &body) else {
            return 0;
        };
        present(d) + present(&m.config) + m.layers.iter().map(present).sum::<u64>()
    };
    match images::kind(target) {
        Ok(Kind::Index) => {
            let Some(body) = read(target) else {
                return (0, Vec::new());
            };
            let Ok(index) = images::parse_index(target, &body) else {
                return (0, Vec::new());
            };
            let mut platforms = Vec::new();
            let mut size = present(target);
            for m in index
                .manifests
                .iter()
                .filter(|m| !images::is_attestation(m))
            {
                if let Some(p) = &m.platform {
                    platforms.push(images::platform_string(p));
                }
                size += manifest_size(m);
            }
            (size, platforms)
        }
        Ok(Kind::Manifest) => (manifest_size(target), Vec::new()),
        _ => (present(target), Vec::new()),
    }
}

/// What `hoist rmi` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// Normalised names removed, in the order asked.
    pub removed: Vec<String>,
    /// Normalised names that were not there.
    pub not_found: Vec<String>,
    /// The collection that followed, when anything was removed.
    pub collected: Option<GcReport>,
}

/// Removes each name it finds, then collects garbage once. A reference
/// that does not parse fails the call before anything is removed.
pub fn remove_images(db: &Arc<Db>, namespace: &str, references: &[String]) -> Result<Removal> {
    let names = references
        .iter()
        .map(|r| Reference::parse(r).map(|r| r.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut removal = Removal::default();
    for name in names {
        match db.delete_image(namespace, &name) {
            Ok(()) => removal.removed.push(name),
            Err(crate::metadata::Error::NotFound(_)) => removal.not_found.push(name),
            Err(e) => return Err(e.into()),
        }
    }
    if !removal.removed.is_empty() {
        removal.collected = Some(collect(db)?);
    }
    Ok(removal)
}

/// Garbage collection over content and every snapshotter on disk.
pub fn collect(db: &Arc<Db>) -> Result<GcReport> {
    Ok(snapshot::garbage_collect(db)?)
}

/// One line of `hoist snapshots ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub key: String,
    /// Empty for a snapshot without one.
    pub parent: String,
    /// `Active`, `Committed` or `View`.
    pub kind: String,
    pub snapshotter: String,
}

/// A namespace's snapshots in every snapshotter the root has, or only in
/// `only`, by snapshotter and then by key, as containerd lists them.
/// Listing makes nothing: a snapshotter the root never used has none
/// (making its directory would make it the root's choice next time).
pub fn list_snapshots(
    db: &Arc<Db>,
    namespace: &str,
    only: Option<&str>,
) -> Result<Vec<SnapshotSummary>> {
    let only = only.map(snapshot::canonical_name).transpose()?;
    let mut out = Vec::new();
    for root in snapshot::open_existing(db)? {
        if only.is_some_and(|name| name != root.name()) {
            continue;
        }
        let mut listed = Vec::new();
        root.namespace(namespace)
            .walk(&Filter::default(), &mut |info| {
                listed.push(SnapshotSummary {
                    key: info.name,
                    parent: info.parent.unwrap_or_default(),
                    kind: info.kind.as_str().to_string(),
                    snapshotter: root.name().to_string(),
                });
                Ok(())
            })?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        out.extend(listed);
    }
    Ok(out)
}

/// One line of `hoist content ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSummary {
    pub digest: String,
    pub size: u64,
    pub created_at: std::time::SystemTime,
    pub labels: crate::content::Labels,
}

/// A namespace's blobs that match any of `filters` (containerd's syntax),
/// by digest, as containerd lists them.
pub fn list_content(db: &Arc<Db>, namespace: &str, filters: &[String]) -> Result<Vec<BlobSummary>> {
    let filter = Filter::parse_all(filters)?;
    let mut out = Vec::new();
    db.content_store(namespace).walk(&filter, &mut |info| {
        out.push(BlobSummary {
            digest: info.digest.to_string(),
            size: info.size,
            created_at: info.created_at,
            labels: info.labels,
        });
        Ok(())
    })?;
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(out)
}

/// What `hoist mount` asks for.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub reference: String,
    /// Made when missing.
    pub dir: PathBuf,
    /// os/arch[/variant]; `None`: this machine's.
    pub platform: Option<String>,
    /// `None`: the one that holds the image's top layer.
    pub snapshotter: Option<String>,
    pub allow_suid_dev: bool,
}

/// The view behind a `hoist mount` is named after its mount point.
fn view_key(dir: &Path) -> String {
    format!("hoist-mount {}", dir.display())
}

/// What `hoist mount` asks of a view's mounts: unless `allow_suid_dev`,
/// an image's setuid bits and device nodes do nothing through it.
fn view_mounts(
    mut mounts: Vec<crate::mount::Mount>,
    allow_suid_dev: bool,
) -> Vec<crate::mount::Mount> {
    if !allow_suid_dev {
        for m in &mut mounts {
            m.options
                .extend(["nosuid".to_string(), "nodev".to_string()]);
        }
    }
    mounts
}

/// Mounts a read-only view of the image's top layer at `options.dir`;
/// returns where (the directory, resolved).
pub fn mount(db: &Arc<Db>, namespace: &str, options: &MountOptions) -> Result<PathBuf> {
    let name = Reference::parse(&options.reference)?.to_string();
    let image = match db.image(namespace, &name) {
        Ok(image) => image,
        Err(crate::metadata::Error::NotFound(_)) => return Err(Error::ImageNotFound(name)),
        Err(e) => return Err(e.into()),
    };
    let wanted = options
        .platform
        .as_deref()
        .map(images::platform::parse)
        .transpose()?;
    let store = db.content_store(namespace);
    let stored = images::stored::platform_image(&store, &image.target, wanted.as_ref())?;
    let top = stored
        .chain_ids()
        .last()
        .map(ToString::to_string)
        .ok_or_else(|| Error::NoLayers(name.clone()))?;
    // The snapshotter that holds the top layer, unless one is named.
    let roots = match &options.snapshotter {
        Some(s) => vec![snapshot::open(db, Some(s))?],
        None => snapshot::open_existing(db)?,
    };
    let Some(snapshots) = roots
        .iter()
        .map(|r| r.namespace(namespace))
        .find(|s| s.stat(&top).is_ok())
    else {
        return Err(Error::NotUnpacked { name, top });
    };
    let dir = &options.dir;
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(io(format!("resolving {}", dir.display())))?;
    let key = view_key(&dir);
    // The view must outlive GC runs while it is mounted.
    let labels = [(
        LABEL_ROOT.to_string(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    )]
    .into();
    let mounts = view_mounts(
        snapshots.view(&key, Some(&top), labels)?,
        options.allow_suid_dev,
    );
    if let Err(e) = crate::mount::mount_all(&mounts, &dir) {
        let _ = snapshots.remove(&key);
        return Err(e.into());
    }
    Ok(dir)
}

/// `dir` resolved, as `hoist unmount` names it (it must exist).
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    dir.canonicalize()
        .map_err(io(format!("resolving {}", dir.display())))
}

/// Unmounts `dir` and removes the view `mount` made for it; false when
/// there was none (then it was only unmounted).
pub fn unmount(db: &Arc<Db>, namespace: &str, dir: &Path) -> Result<bool> {
    let dir = resolve(dir)?;
    crate::mount::unmount_all(&dir)?;
    let key = view_key(&dir);
    let mut removed = false;
    for root in snapshot::open_existing(db)? {
        match root.namespace(namespace).remove(&key) {
            Ok(()) => removed = true,
            Err(snapshot::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::Mount;

    #[test]
    fn views_are_nosuid_nodev_unless_asked() {
        let m = || {
            vec![Mount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options: vec!["ro".into(), "lowerdir=/a:/b".into()],
            }]
        };
        let opts = |v: Vec<Mount>| v[0].options.clone();
        let hardened = opts(view_mounts(m(), false));
        assert!(hardened.iter().any(|o| o == "nosuid"), "{hardened:?}");
        assert!(hardened.iter().any(|o| o == "nodev"), "{hardened:?}");
        assert_eq!(opts(view_mounts(m(), true)), opts(m()));
    }

    #[test]
    fn removal_takes_what_is_there_and_names_what_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let target = Descriptor::new(
            crate::images::OCI_MANIFEST,
            crate::digest::Digest::of(b"m"),
            1,
        );
        let image = crate::metadata::images::Image::new("docker.io/library/a:1", target);
        db.put_image("default", image).expect("image");
        let asked = ["a:1".to_string(), "b".to_string()];
        let removal = remove_images(&db, "default", &asked).expect("removal");
        assert_eq!(removal.removed, ["docker.io/library/a:1"]);
        assert_eq!(removal.not_found, ["docker.io/library/b:latest"]);
        assert!(removal.collected.is_some());
        // Nothing left to remove: no collection either.
        let removal = remove_images(&db, "default", &asked[..1]).expect("removal");
        assert!(removal.removed.is_empty() && removal.collected.is_none());
        // A bad reference fails before anything goes.
        let image = crate::metadata::images::Image::new(
            "docker.io/library/c:1",
            Descriptor::new(
                crate::images::OCI_MANIFEST,
                crate::digest::Digest::of(b"c"),
                1,
            ),
        );
        db.put_image("default", image).expect("image");
        let bad = ["c:1".to_string(), "UPPER".to_string()];
        assert!(matches!(
            remove_images(&db, "default", &bad),
            Err(Error::Reference(_))
        ));
        assert!(db.image("default", "docker.io/library/c:1").is_ok());
    }
}
