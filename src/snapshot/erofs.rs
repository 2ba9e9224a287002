//! The EROFS backend: a layer a pull unpacks is indexed, not extracted.
//! `<id>/layer.tar` is its uncompressed tar and `<id>/layer.erofs` the
//! metadata image that maps the tar's files; committed, the pair is mounted
//! read-only (file-backed) on `<id>/fs`, so overlay stacks it as a lower
//! exactly like an overlay backend's directory. Active snapshots and views
//! are overlay's; a snapshot written through its mounts (by containerd)
//! and committed stays a directory.

use super::overlay::Overlay;
use super::usage::disk_usage;
use super::{Backend, Kind, Result, Usage, io_err};
use crate::archive::{LAYER_IMAGE, LAYER_TAR};
use crate::mount::Mount;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct Erofs {
    overlay: Overlay,
}

impl Erofs {
    pub fn new() -> Self {
        Erofs {
            overlay: Overlay::new(),
        }
    }
}

impl Default for Erofs {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether this host can use the backend under `root`: overlayfs works
/// there and the kernel mounts a file-backed EROFS image from files there
/// with a device table and chunked files. `Err` says what is missing.
pub fn supported(root: &Path) -> std::result::Result<(), String> {
    if !super::overlay::supported(root) {
        return Err("overlayfs is not usable here".into());
    }
    crate::erofs::mount::supported(root)
}

/// Whether `dir` holds an indexed layer.
fn indexed(dir: &Path) -> bool {
    dir.join(LAYER_IMAGE).is_file()
}

impl Backend for Erofs {
    fn name(&self) -> &'static str {
        "erofs"
    }

    fn create(&self, dir: &Path, parents: &[PathBuf], kind: Kind) -> Result<()> {
        self.overlay.create(dir, parents, kind)
    }

    fn mounts(&self, dir: &Path, parents: &[PathBuf], kind: Kind) -> Vec<Mount> {
        self.overlay.mounts(dir, parents, kind)
    }

    fn overlay_upper(&self) -> Option<bool> {
        self.overlay.overlay_upper()
    }

    fn rebases(&self) -> bool {
        true
    }

    fn indexes_layers(&self) -> bool {
        true
    }

    /// An indexed layer's image goes on `fs` (after a restart, or after
    /// its commit); a directory layer needs nothing.
    fn ready(&self, dir: &Path) -> Result<()> {
        let fs = dir.join("fs");
        if !indexed(dir)
            || crate::erofs::mount::is_mounted(&fs)
                .map_err(io_err(format!("inspecting {}", fs.display())))?
        {
            return Ok(());
        }
        crate::erofs::mount::mount_layer(&dir.join(LAYER_IMAGE), &dir.join(LAYER_TAR), &fs)?;
        Ok(())
    }

    fn release(&self, dir: &Path) -> Result<()> {
        let fs = dir.join("fs");
        match crate::erofs::mount::is_mounted(&fs) {
            Ok(true) => Ok(crate::mount::unmount_all(&fs)?),
            Ok(false) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("inspecting {}", fs.display()))(e)),
        }
    }

    /// The index already synced its two files; mounting the image is the
    /// kernel's check of it. What it uses is those files.
    fn seal(&self, dir: &Path) -> Result<Usage> {
        if !indexed(dir) {
            return super::seal_tree(&dir.join("fs"));
        }
        self.ready(dir)?;
        crate::failpoint!("snapshot-commit");
        let mut usage = Usage::default();
        for name in [LAYER_TAR, LAYER_IMAGE] {
            let path = dir.join(name);
            let meta =
                std::fs::metadata(&path).map_err(io_err(format!("stat {}", path.display())))?;
            usage.size += meta.blocks() * 512;
            usage.inodes += 1;
        }
        // The empty work and fs directories.
        let work = disk_usage(&dir.join("work"))?;
        usage.size += work.size;
        usage.inodes += work.inodes + 1;
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    fn harness() -> Option<crate::snapshot::testsuite::Harness> {
        let probe = tempfile::tempdir().ok()?;
        if let Err(why) = super::supported(probe.path()) {
            crate::snapshot::testsuite::skip_unless_required("erofs", &why);
            return None;
        }
        crate::snapshot::testsuite::harness(Box::new(super::Erofs::new()))
    }

    mod conformance_as_root {
        use super::harness;
        crate::snapshotter_conformance!(harness);
    }
}
