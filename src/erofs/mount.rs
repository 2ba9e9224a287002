//! Mounting a layer's metadata image with its tar as the image's second
//! device, file-backed (no loop devices), and telling whether this kernel
//! can.

use super::tree::{Data, Inode, Tree};
use super::{format, writer};
use crate::mount::Error;
use nix::mount::MsFlags;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What `statfs` says of an EROFS mount.
const EROFS_MAGIC: i64 = format::SUPER_MAGIC as i64;

/// Mounts `image` read-only on `target`, its chunks of device 1 read from
/// `tar`. Also `nosuid` and `nodev`: the layer mount itself serves no
/// program (an overlay on top decides for its own mount).
pub fn mount_layer(image: &Path, tar: &Path, target: &Path) -> Result<(), Error> {
    // The tar goes into the comma-separated option string.
    let tar_str = tar
        .to_str()
        .filter(|t| !t.contains([',', '\0']))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "tar path {} is not UTF-8 or holds a comma or NUL",
                tar.display()
            ))
        })?;
    for p in [image, target] {
        if p.as_os_str().as_bytes().contains(&0) {
            return Err(Error::Invalid(format!("path {} holds a NUL", p.display())));
        }
    }
    let data = format!("device={tar_str}");
    nix::mount::mount(
        Some(image),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|errno| Error::Mount {
        fstype: "erofs".into(),
        device: format!("{} ({data})", image.display()),
        target: target.to_path_buf(),
        errno,
    })
}

/// Unmounts what [`mount_layer`] mounted (everything stacked on `target`).
pub fn unmount_layer(target: &Path) -> Result<(), Error> {
    crate::mount::unmount_all(target)
}

/// Whether an EROFS filesystem is mounted right at `target` (not merely
/// somewhere above it). A missing `target` is not mounted.
pub fn is_mounted(target: &Path) -> std::io::Result<bool> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let parent = target.parent().unwrap_or(target);
    let parent_dev = std::fs::symlink_metadata(parent)?.dev();
    if meta.dev() == parent_dev && parent != target {
        return Ok(false);
    }
    let fs = nix::sys::statfs::statfs(target).map_err(std::io::Error::from)?;
    Ok(fs.filesystem_type().0 as i64 == EROFS_MAGIC)
}

/// Whether this kernel could mount a layer, without trying: root, EROFS,
/// and its device table and chunked file features. `Err` says what is
/// missing.
pub fn kernel_support() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("mounting EROFS layers needs root".into());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems")
        .map_err(|e| format!("reading /proc/filesystems: {e}"))?;
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("erofs"))
    {
        return Err("the kernel has no erofs filesystem (not in /proc/filesystems)".into());
    }
    for feature in ["device_table", "chunked_file"] {
        let p = Path::new("/sys/fs/erofs/features").join(feature);
        if !p.exists() {
            return Err(format!(
                "the kernel's erofs lacks {feature} ({})",
                p.display()
            ));
        }
    }
    Ok(())
}

/// [`kernel_support`], then [`probe`] in `dir`: a file-backed mount needs
/// its files on a filesystem the kernel can read pages of for it (not
/// tmpfs, say), so the probe runs where the layers will be.
pub fn supported(dir: &Path) -> Result<(), String> {
    kernel_support()?;
    probe(dir).map_err(|e| {
        format!(
            "{e} (the filesystem of {} cannot back a file-backed EROFS mount)",
            dir.display()
        )
    })
}

/// Writes a one-file layer in a fresh directory under `dir`, mounts it and
/// reads the file back: the features list says nothing of file-backed
/// mounts (which need CONFIG_EROFS_FS_BACKED_BY_FILE, Linux 6.12) nor of
/// 512-byte blocks.
pub fn probe(dir: &Path) -> Result<(), String> {
    const CONTENT: &[u8] = b"hoist erofs probe\n";
    let scratch = tempfile::Builder::new()
        .prefix("erofs-probe-")
        .tempdir_in(dir)
        .map_err(|e| format!("creating a probe directory in {}: {e}", dir.display()))?;
    let (tar, image, mnt) = (
        scratch.path().join("layer.tar"),
        scratch.path().join("layer.erofs"),
        scratch.path().join("mnt"),
    );
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let mut data = CONTENT.to_vec();
    data.resize(1024, 0);
    std::fs::File::create(&tar)
        .and_then(|mut f| f.write_all(&data))
        .map_err(|e| io("writing the probe tar", e))?;
    std::fs::create_dir(&mnt).map_err(|e| io("creating the probe mount point", e))?;

    let dir_inode = Inode::empty(libc::S_IFDIR | 0o755);
    let mut tree = Tree::new(dir_inode.clone());
    tree.add(Inode {
        mode: libc::S_IFREG | 0o644,
        size: CONTENT.len() as u64,
        data: Data::Tar { offset: 0 },
        ..dir_inode
    })
    .and_then(|file| tree.link(super::tree::ROOT, b"probe", file))
    .map_err(|e| format!("building the probe image: {e}"))?;
    let mut out = std::fs::File::create(&image).map_err(|e| io("creating the probe image", e))?;
    writer::write_image(&mut tree, data.len() as u64, None, &mut out)
        .map_err(|e| format!("writing the probe image: {e}"))?;
    drop(out);

    mount_layer(&image, &tar, &mnt).map_err(|e| format!("file-backed erofs mount: {e}"))?;
    let mut got = Vec::new();
    let read = std::fs::File::open(mnt.join("probe")).and_then(|mut f| f.read_to_end(&mut got));
    let unmounted = unmount_layer(&mnt);
    read.map_err(|e| io("reading the probe file", e))?;
    unmounted.map_err(|e| format!("unmounting the probe: {e}"))?;
    if got != CONTENT {
        return Err(format!(
            "the probe file reads back as {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_paths_with_commas_or_nul_are_refused() {
        let bad = [
            ("/a/img", "/b/x,y.tar", "/mnt"),
            ("/a/img", "/b/x\0.tar", "/mnt"),
            ("/a/i\0mg", "/b/x.tar", "/mnt"),
        ];
        for (image, tar, target) in bad {
            let r = mount_layer(Path::new(image), Path::new(tar), Path::new(target));
            assert!(matches!(r, Err(Error::Invalid(_))), "{tar:?}: {r:?}");
        }
    }

    #[test]
    fn a_missing_or_plain_directory_is_not_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(&dir.path().join("nothing")).unwrap());
        std::fs::create_dir(dir.path().join("plain")).unwrap();
        assert!(!is_mounted(&dir.path().join("plain")).unwrap());
    }

    #[test]
    fn probe_mounts_on_this_kernel_as_root() {
        if let Err(why) = kernel_support() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        supported(dir.path()).unwrap();
    }

    /// tmpfs cannot back a file-backed mount: the probe says so where the
    /// layers would be, and a new root there falls back to overlayfs.
    #[test]
    fn a_tmpfs_root_cannot_hold_erofs_layers_as_root() {
        if let Err(why) = kernel_support() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tmpfs = dir.path().join("tmpfs");
        std::fs::create_dir(&tmpfs).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &tmpfs,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=16m"),
        )
        .unwrap();
        let probed = supported(&tmpfs);
        let db = crate::metadata::Db::open(&tmpfs.join("root")).unwrap();
        let chosen = crate::snapshot::open(&db, None).map(|r| r.name());
        drop(db);
        crate::mount::unmount_all(&tmpfs).unwrap();
        let why = probed.unwrap_err();
        assert!(
            why.contains("cannot back a file-backed EROFS mount"),
            "{why}"
        );
        assert_eq!(chosen.unwrap(), "overlayfs");
    }
}
