//! The overlay backend: `<id>/fs` is a layer's upper directory, `<id>/work`
//! overlayfs's work directory; parents stack as lower directories.

use super::{Backend, Kind, Result, tree_dir};
use crate::mount::Mount;
use std::path::{Path, PathBuf};

pub struct Overlay {
    /// Rootless kernels keep overlay xattrs in `user.*` (`userxattr`).
    userxattr: bool,
}

impl Overlay {
    pub fn new() -> Self {
        Overlay {
            userxattr: needs_userxattr(),
        }
    }
}

impl Default for Overlay {
    fn default() -> Self {
        Self::new()
    }
}

/// Outside the initial user namespace, overlayfs needs `userxattr`.
fn needs_userxattr() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields.as_slice() != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// Whether overlayfs works here: root, the kernel has it, and a test mount
/// with two lower directories under `root` succeeds (the upper filesystem
/// must support what overlayfs needs, which overlayfs itself does not).
pub fn supported(root: &Path) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    let listed = std::fs::read_to_string("/proc/filesystems")
        .map(|f| f.lines().any(|l| l.trim_end().ends_with("overlay")))
        .unwrap_or(false);
    if !listed {
        return false;
    }
    let probe = || -> std::io::Result<bool> {
        std::fs::create_dir_all(root)?;
        let dir = tempfile::Builder::new()
            .prefix("overlay-check-")
            .tempdir_in(root)?;
        for d in ["l1", "l2", "upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(d))?;
        }
        let p = |d: &str| dir.path().join(d).display().to_string();
        let m = Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir={}:{}", p("l2"), p("l1")),
                format!("upperdir={}", p("upper")),
                format!("workdir={}", p("work")),
            ],
        };
        let ok = crate::mount::mount(&m, &dir.path().join("merged")).is_ok();
        if ok {
            let _ = crate::mount::unmount_all(&dir.path().join("merged"));
        }
        Ok(ok)
    };
    probe().unwrap_or(false)
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

fn bind(source: &Path, readonly: bool) -> Mount {
    Mount {
        fstype: "bind".into(),
        source: source.display().to_string(),
        options: vec!["rbind".into(), if readonly { "ro" } else { "rw" }.into()],
    }
}

impl Backend for Overlay {
    fn name(&self) -> &'static str {
        "overlayfs"
    }

    fn create(&self, dir: &Path, _parents: &[PathBuf], kind: Kind) -> Result<()> {
        crate::failpoint!("snapshot-prepare");
        // `fs` is the root of the image's tree, 0755 unless a layer says
        // otherwise; overlayfs alone uses `work`.
        tree_dir(&dir.join("fs"), 0o755)?;
        if kind == Kind::Active {
            tree_dir(&dir.join("work"), 0o711)?;
        }
        Ok(())
    }

    fn mounts(&self, dir: &Path, parents: &[PathBuf], kind: Kind) -> Vec<Mount> {
        let fs = dir.join("fs");
        let mut extra = Vec::new();
        if self.userxattr {
            extra.push("userxattr".to_string());
        }
        match kind {
            Kind::Active if parents.is_empty() => vec![bind(&fs, false)],
            Kind::Active => {
                let mut options = vec![
                    "index=off".to_string(),
                    format!("workdir={}", dir.join("work").display()),
                    format!("upperdir={}", fs.display()),
                    format!("lowerdir={}", join(parents)),
                ];
                options.extend(extra);
                vec![Mount {
                    fstype: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }]
            }
            Kind::View | Kind::Committed => {
                // A view's own (empty) directory adds nothing; a committed
                // snapshot is shown with itself on top.
                let mut lowers = Vec::new();
                if kind == Kind::Committed {
                    lowers.push(fs.clone());
                }
                lowers.extend(parents.iter().cloned());
                match lowers.as_slice() {
                    [] => vec![bind(&fs, true)],
                    [only] => vec![bind(only, true)],
                    _ => {
                        let mut options =
                            vec!["ro".to_string(), format!("lowerdir={}", join(&lowers))];
                        options.extend(extra);
                        vec![Mount {
                            fstype: "overlay".into(),
                            source: "overlay".into(),
                            options,
                        }]
                    }
                }
            }
        }
    }

    fn overlay_upper(&self) -> Option<bool> {
        Some(self.userxattr)
    }

    /// An upper directory holds only its own layer's changes.
    fn rebases(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    fn harness() -> Option<crate::snapshot::testsuite::Harness> {
        let probe = tempfile::tempdir().ok()?;
        if !super::supported(probe.path()) {
            return None;
        }
        crate::snapshot::testsuite::harness(Box::new(super::Overlay::new()))
    }

    mod conformance_as_root {
        use super::harness;
        crate::snapshotter_conformance!(harness);
    }
}
