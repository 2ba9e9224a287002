//! The native backend: every snapshot is a full copy of its parent's tree
//! (reflinked where the filesystem can), for hosts without overlayfs.

use super::{Backend, Kind, Result, io_err};
use crate::mount::Mount;
use nix::sys::stat::{Mode, SFlag, mknod};
use nix::sys::time::TimeSpec;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub struct Native;

impl Backend for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn create(&self, dir: &Path, parents: &[PathBuf], _kind: Kind) -> Result<()> {
        crate::failpoint!("snapshot-prepare");
        let fs_dir = dir.join("fs");
        match parents.first() {
            Some(parent) => copy_tree(parent, &fs_dir),
            // The root of the image's tree, 0755 unless a layer says otherwise.
            None => super::tree_dir(&fs_dir, 0o755),
        }
    }

    fn mounts(&self, dir: &Path, _parents: &[PathBuf], kind: Kind) -> Vec<Mount> {
        let readonly = kind != Kind::Active;
        vec![Mount {
            fstype: "bind".into(),
            source: dir.join("fs").display().to_string(),
            options: vec!["rbind".into(), if readonly { "ro" } else { "rw" }.into()],
        }]
    }
}

/// Copies `src` to `dst` keeping types, owners, modes, xattrs, times,
/// devices and hardlink groups. Depth first with an explicit stack, so a
/// deep tree costs heap, not a thread's stack.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    /// Enter: copy the entry (for a directory, make it and queue its
    /// children and its Leave). Leave: the directory's children are done;
    /// its metadata goes on last, so a read-only one could still be filled.
    enum Step {
        Enter(PathBuf, PathBuf),
        Leave(PathBuf, PathBuf, fs::Metadata),
    }
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, fs::Metadata)> = Vec::new();
    let mut steps = vec![Step::Enter(src.to_path_buf(), dst.to_path_buf())];
    while let Some(step) = steps.pop() {
        match step {
            Step::Enter(src, dst) => {
                if let Some(meta) = copy_entry(&src, &dst, &mut links)? {
                    let listing =
                        fs::read_dir(&src).map_err(io_err(format!("listing {}", src.display())))?;
                    let mut children = Vec::new();
                    for entry in listing {
                        let entry = entry.map_err(io_err(format!("listing {}", src.display())))?;
                        children.push(Step::Enter(entry.path(), dst.join(entry.file_name())));
                    }
                    steps.push(Step::Leave(src, dst, meta));
                    steps.extend(children);
                }
            }
            Step::Leave(src, dst, meta) => {
                finish(&src, &dst, &meta)?;
                dirs.push((dst, meta));
            }
        }
    }
    // Directory times last, once nothing more is written in them.
    for (path, meta) in dirs.iter().rev() {
        set_times(path, meta)?;
    }
    Ok(())
}

/// Copies one entry; for a directory, only makes it and returns its
/// metadata for the caller to copy its children and then finish it.
fn copy_entry(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<Option<fs::Metadata>> {
    let meta = fs::symlink_metadata(src).map_err(io_err(format!("stat {}", src.display())))?;
    let ft = meta.file_type();
    let ctx = |what: &str| format!("{what} {}", dst.display());
    if ft.is_dir() {
        fs::create_dir(dst).map_err(io_err(ctx("creating")))?;
        return Ok(Some(meta));
    }
    if meta.nlink() > 1 && !ft.is_symlink() {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            fs::hard_link(first, dst).map_err(io_err(ctx("linking")))?;
            return Ok(None);
        }
        links.insert((meta.dev(), meta.ino()), dst.to_path_buf());
    }
    if ft.is_symlink() {
        let target =
            fs::read_link(src).map_err(io_err(format!("reading link {}", src.display())))?;
        std::os::unix::fs::symlink(&target, dst).map_err(io_err(ctx("creating symlink")))?;
    } else if ft.is_file() {
        copy_file(src, dst)?;
    } else {
        let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
        mknod(
            dst,
            kind,
            Mode::from_bits_truncate(meta.mode() & 0o7777),
            meta.rdev(),
        )
        .map_err(|e| io_err(ctx("mknod"))(e.into()))?;
    }
    finish(src, dst, &meta)?;
    set_times(dst, &meta)?;
    Ok(None)
}

/// A reflink when the filesystem has them, else a plain copy.
fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let from = fs::File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let to = fs::File::create(dst).map_err(io_err(format!("creating {}", dst.display())))?;
    // SAFETY: FICLONE takes the source descriptor as its argument.
    let cloned = unsafe {
        use std::os::fd::AsRawFd;
        libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) == 0
    };
    if !cloned {
        let mut from = from;
        let mut to = to;
        std::io::copy(&mut from, &mut to).map_err(io_err(format!("copying {}", src.display())))?;
    }
    Ok(())
}

/// Owner, then mode (chown clears setuid), then xattrs.
fn finish(src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<()> {
    let ctx = |what: &str| format!("{what} {}", dst.display());
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err(ctx("chown")))?;
    }
    if !meta.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err(ctx("chmod")))?;
    }
    copy_xattrs(src, dst)
}

fn copy_xattrs(src: &Path, dst: &Path) -> Result<()> {
    let context = || format!("copying xattrs of {} to {}", src.display(), dst.display());
    crate::xattr::path_cstr(src)
        .and_then(|s| crate::xattr::copy_all(&s, &crate::xattr::path_cstr(dst)?))
        .map_err(|e| io_err(context())(e))
}

fn set_times(path: &Path, meta: &fs::Metadata) -> Result<()> {
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(format!("setting times on {}", path.display()))(e.into()))
}

#[cfg(test)]
mod tests {
    fn harness() -> Option<crate::snapshot::testsuite::Harness> {
        crate::snapshot::testsuite::harness(Box::new(super::Native))
    }

    mod conformance {
        use super::harness;
        crate::snapshotter_conformance!(harness);
    }

    #[test]
    fn copy_keeps_links_modes_and_owners() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), "data").unwrap();
        std::fs::hard_link(src.join("d/f"), src.join("link")).unwrap();
        std::os::unix::fs::symlink("d/f", src.join("sym")).unwrap();
        std::fs::set_permissions(src.join("d/f"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        let path = |p: &std::path::Path| crate::xattr::path_cstr(p).unwrap();
        // Binary values survive; a filesystem without user xattrs skips that part.
        let with_xattr =
            crate::xattr::lsetxattr(&path(&src.join("d/f")), b"user.hoist", b"\0\x01v").is_ok();
        super::copy_tree(&src, &dir.path().join("dst")).unwrap();
        let dst = dir.path().join("dst");
        let f = std::fs::metadata(dst.join("d/f")).unwrap();
        assert_eq!(f.mode() & 0o7777, 0o4755);
        assert_eq!(f.ino(), std::fs::metadata(dst.join("link")).unwrap().ino());
        assert_eq!(
            std::fs::read_link(dst.join("sym")).unwrap().to_str(),
            Some("d/f")
        );
        assert_eq!(
            std::fs::metadata(src.join("d")).unwrap().mtime(),
            std::fs::metadata(dst.join("d")).unwrap().mtime()
        );
        if with_xattr {
            let got = crate::xattr::lgetxattr(&path(&dst.join("d/f")), b"user.hoist").unwrap();
            assert_eq!(got.as_deref(), Some(&b"\0\x01v"[..]));
        }
    }
}
