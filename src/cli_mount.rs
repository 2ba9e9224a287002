//! `hoist mount`, `hoist unmount` and `hoist snapshots ls`.

use anyhow::{Context, Result, bail};
use hoist::filters::Filter;
use hoist::images::stored::platform_image;
use hoist::metadata::Db;
use hoist::metadata::gc::LABEL_ROOT;
use hoist::snapshot::{self, Snapshotter};
use std::path::Path;
use std::sync::Arc;

/// The view behind a `hoist mount` is named after its mount point.
fn view_key(dir: &Path) -> String {
    format!("hoist-mount {}", dir.display())
}

/// What `hoist mount` asks of a view's mounts: unless `allow_suid_dev`,
/// an image's setuid bits and device nodes do nothing through it.
fn view_mounts(
    mut mounts: Vec<hoist::mount::Mount>,
    allow_suid_dev: bool,
) -> Vec<hoist::mount::Mount> {
    if !allow_suid_dev {
        for m in &mut mounts {
            m.options
                .extend(["nosuid".to_string(), "nodev".to_string()]);
        }
    }
    mounts
}

pub fn mount(
    db: &Arc<Db>,
    namespace: &str,
    snapshotter: Option<&str>,
    platform: Option<&str>,
    reference: &str,
    dir: &Path,
    allow_suid_dev: bool,
) -> Result<()> {
    let name = hoist::reference::Reference::parse(reference)?.to_string();
    let image = db
        .image(namespace, &name)
        .with_context(|| format!("image {name}"))?;
    let wanted = platform.map(hoist::images::platform::parse).transpose()?;
    let store = db.content_store(namespace);
    let stored = platform_image(&store, &image.target, wanted.as_ref())?;
    let top = stored
        .chain_ids()
        .last()
        .cloned()
        .with_context(|| format!("{name} has no layers"))?;
    // The snapshotter that holds the top layer, unless one is named.
    let roots = match snapshotter {
        Some(s) => vec![snapshot::open(db, Some(s))?],
        None => snapshot::open_existing(db)?,
    };
    let Some(snapshots) = roots
        .iter()
        .map(|r| r.namespace(namespace))
        .find(|s| s.stat(&top.to_string()).is_ok())
    else {
        bail!("{name} is not unpacked (no snapshot {top}); pull it without --no-unpack");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let key = view_key(&dir);
    // The view must outlive GC runs while it is mounted.
    let labels = [(
        LABEL_ROOT.to_string(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    )]
    .into();
    let mounts = view_mounts(
        snapshots.view(&key, Some(&top.to_string()), labels)?,
        allow_suid_dev,
    );
    if let Err(e) = hoist::mount::mount_all(&mounts, &dir) {
        let _ = snapshots.remove(&key);
        return Err(e.into());
    }
    Ok(())
}

pub fn unmount(db: &Arc<Db>, namespace: &str, dir: &Path) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}", dir.display()))?;
    hoist::mount::unmount_all(&dir)?;
    let key = view_key(&dir);
    let mut removed = false;
    for root in snapshot::open_existing(db)? {
        match root.namespace(namespace).remove(&key) {
            Ok(()) => removed = true,
            Err(snapshot::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !removed {
        eprintln!(
            "{} was not mounted by hoist mount; unmounted only",
            dir.display()
        );
    }
    Ok(())
}

pub fn list_snapshots(db: &Arc<Db>, namespace: &str, snapshotter: Option<&str>) -> Result<()> {
    let roots = match snapshotter {
        Some(s) => vec![snapshot::open(db, Some(s))?],
        None => snapshot::open_existing(db)?,
    };
    println!(
        "{:<80}  {:<71}  {:<9}  SNAPSHOTTER",
        "KEY", "PARENT", "KIND"
    );
    for root in roots {
        let snapshots = root.namespace(namespace);
        snapshots.walk(&Filter::default(), &mut |info| {
            println!(
                "{:<80}  {:<71}  {:<9}  {}",
                info.name,
                info.parent.as_deref().unwrap_or(""),
                info.kind.as_str(),
                root.name()
            );
            Ok(())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::view_mounts;
    use hoist::mount::Mount;

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
}
