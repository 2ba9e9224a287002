//! Mounting the mounts a snapshotter describes, and temporary mounts that
//! always come undone.

use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount {fstype} {device} on {target}: {errno}")]
    Mount {
        fstype: String,
        device: String,
        target: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("unmount {target}: {errno}")]
    Unmount {
        target: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid mount: {0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One mount, as containerd describes it: a type, a source and options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    #[serde(rename = "type")]
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

impl Mount {
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Option strings longer than this do not fit the kernel's one page.
const PAGE: usize = 4096;

/// Splits options into mount flags and the data string the filesystem gets.
fn parse_options(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "private" | "rprivate" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data)
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(format!("{s:?} holds a NUL byte")))
}

/// Mounts `m` on `target`.
pub fn mount(m: &Mount, target: &Path) -> Result<()> {
    let (flags, data) = parse_options(&m.options);
    let err = |errno| Error::Mount {
        fstype: m.fstype.clone(),
        device: m.source.clone(),
        target: target.to_path_buf(),
        errno,
    };
    let data = data.join(",");
    if m.fstype == "overlay" && data.len() >= PAGE {
        return mount_overlay_relative(m, &data, flags, target);
    }
    let fstype = (!flags.contains(MsFlags::MS_BIND)).then_some(m.fstype.as_str());
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(err)?;
    // A bind mount ignores MS_RDONLY, MS_NOSUID, MS_NODEV and MS_NOEXEC
    // until it is remounted.
    let per_mount =
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if flags.contains(MsFlags::MS_BIND) && flags.intersects(per_mount) {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// Lower directory lists longer than a page: the directories share a parent,
/// so a child process changes into it and mounts with short relative paths
/// (the working directory is per process, so the parent is not disturbed).
fn mount_overlay_relative(m: &Mount, data: &str, flags: MsFlags, target: &Path) -> Result<()> {
    let dirs: Vec<&str> = data
        .split(',')
        .flat_map(|o| {
            let value = o.split_once('=').map(|(_, v)| v).unwrap_or("");
            value.split(':')
        })
        .filter(|d| d.starts_with('/'))
        .collect();
    let common = common_parent(&dirs)
        .ok_or_else(|| Error::Invalid("overlay directories share no parent".to_string()))?;
    let prefix = format!("{}/", common.display());
    let short: Vec<String> = data
        .split(',')
        .map(|o| match o.split_once('=') {
            Some((k, v)) if ["lowerdir", "upperdir", "workdir"].contains(&k) => {
                let v: Vec<&str> = v
                    .split(':')
                    .map(|d| d.strip_prefix(&prefix).unwrap_or(d))
                    .collect();
                format!("{k}={}", v.join(":"))
            }
            _ => o.to_string(),
        })
        .collect();
    let short = short.join(",");
    if short.len() >= PAGE {
        return Err(Error::Invalid(format!(
            "overlay options are {} bytes even relative to {}",
            short.len(),
            common.display()
        )));
    }
    let dir = cstring(&common.to_string_lossy())?;
    let source = cstring(&m.source)?;
    let fstype = cstring("overlay")?;
    let data_c = cstring(&short)?;
    let target_c = cstring(&target.to_string_lossy())?;
    // SAFETY: after fork the child only makes async-signal-safe system calls
    // (chdir, mount, _exit) on buffers prepared before the fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => unsafe {
            let failed = libc::chdir(dir.as_ptr()) != 0
                || libc::mount(
                    source.as_ptr(),
                    target_c.as_ptr(),
                    fstype.as_ptr(),
                    flags.bits(),
                    data_c.as_ptr().cast(),
                ) != 0;
            let rc = if failed { *libc::__errno_location() } else { 0 };
            libc::_exit(rc.clamp(0, 255));
        },
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let status = nix::sys::wait::waitpid(child, None).map_err(|errno| Error::Mount {
                fstype: "overlay".into(),
                device: m.source.clone(),
                target: target.to_path_buf(),
                errno,
            })?;
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
                nix::sys::wait::WaitStatus::Exited(_, code) => Err(Error::Mount {
                    fstype: "overlay".into(),
                    device: m.source.clone(),
                    target: target.to_path_buf(),
                    errno: nix::errno::Errno::from_raw(code),
                }),
                other => Err(Error::Invalid(format!("mount helper ended with {other:?}"))),
            }
        }
        Err(errno) => Err(Error::Mount {
            fstype: "overlay".into(),
            device: m.source.clone(),
            target: target.to_path_buf(),
            errno,
        }),
    }
}

fn common_parent(dirs: &[&str]) -> Option<PathBuf> {
    let first = Path::new(dirs.first()?);
    let mut common: PathBuf = first.parent()?.to_path_buf();
    while !dirs.iter().all(|d| Path::new(d).starts_with(&common)) {
        common = common.parent()?.to_path_buf();
    }
    (common != Path::new("/")).then_some(common)
}

/// Mounts every mount in order on `target` (later ones stack on top).
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for m in mounts {
        mount(m, target)?;
    }
    Ok(())
}

/// Unmounts everything stacked on `target`.
pub fn unmount_all(target: &Path) -> Result<()> {
    // A process that forked while another thread had a file open below the
    // mount holds it until it execs: busy is retried for a while, as
    // containerd does (50 times, 50 ms apart).
    let mut busy = 0;
    loop {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if busy < 50 => {
                busy += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(errno) => {
                return Err(Error::Unmount {
                    target: target.to_path_buf(),
                    errno,
                });
            }
        }
    }
}

/// A mount on a fresh directory under `parent`, unmounted and its (empty)
/// mount point removed on drop. The mount point is only ever `rmdir`ed, never
/// removed recursively, so a failed unmount cannot delete the tree under it.
pub struct TempMount {
    dir: PathBuf,
    mounted: bool,
}

impl TempMount {
    pub fn new(parent: &Path, mounts: &[Mount]) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            context: format!("creating {}", parent.display()),
            source,
        })?;
        let dir = tempfile::Builder::new()
            .prefix("mount-")
            .tempdir_in(parent)
            .map_err(|source| Error::Io {
                context: format!("creating a mount point in {}", parent.display()),
                source,
            })?
            .keep();
        let mut tm = TempMount {
            dir,
            mounted: false,
        };
        mount_all(mounts, &tm.dir)?;
        tm.mounted = true;
        Ok(tm)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = unmount_all(&self.dir)
        {
            tracing::error!(error = %e, "leaving a temporary mount in place");
            return;
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a mount point");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = parse_options(&["ro".into(), "rbind".into(), "lowerdir=/a:/b".into()]);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(data, ["lowerdir=/a:/b"]);
    }

    /// The per-mount options of the mount on `target`, from mountinfo.
    fn mount_options(target: &Path) -> Option<Vec<String>> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let target = target.display().to_string();
        info.lines()
            .rfind(|l| l.split(' ').nth(4) == Some(target.as_str()))
            .and_then(|l| l.split(' ').nth(5))
            .map(|o| o.split(',').map(str::to_string).collect())
    }

    #[test]
    fn bind_mounts_get_nosuid_and_nodev_as_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        for (options, readonly) in [
            (["rw", "nosuid", "nodev"], false),
            (["ro", "nosuid", "nodev"], true),
        ] {
            let mut opts: Vec<String> = vec!["rbind".into()];
            opts.extend(options.iter().map(|o| o.to_string()));
            let m = Mount {
                fstype: "bind".into(),
                source: src.display().to_string(),
                options: opts,
            };
            mount(&m, &dst).unwrap();
            let got = mount_options(&dst);
            unmount_all(&dst).unwrap();
            let got = got.unwrap_or_default();
            for want in ["nosuid", "nodev"] {
                assert!(got.iter().any(|o| o == want), "{want} missing: {got:?}");
            }
            assert_eq!(got.iter().any(|o| o == "ro"), readonly, "{got:?}");
        }
    }

    #[test]
    fn common_parent_of_snapshot_dirs() {
        let dirs = [
            "/var/lib/hoist/snapshots/overlayfs/1/fs",
            "/var/lib/hoist/snapshots/overlayfs/22/fs",
        ];
        assert_eq!(
            common_parent(&dirs),
            Some(PathBuf::from("/var/lib/hoist/snapshots/overlayfs"))
        );
        assert_eq!(common_parent(&["/a/fs", "/b/fs"]), None);
    }
}
