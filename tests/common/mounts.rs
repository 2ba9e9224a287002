//! Mounts a test leaves below its directory (an EROFS root's layers, a
//! crashed command's views), undone before the directory is removed.

use std::path::Path;

/// Lazily unmounts every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes `dir` and what is below it, mounts first.
pub fn remove_tree(dir: &Path) {
    unmount_under(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// A temporary directory whose mounts go with it.
pub struct TempRoot(pub tempfile::TempDir);

impl TempRoot {
    pub fn new() -> Self {
        TempRoot(tempfile::tempdir().expect("a temporary directory"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        unmount_under(self.0.path());
    }
}
