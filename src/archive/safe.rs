//! Path handling confined to the apply root: name cleaning, directory
//! resolution that never follows a symlink out of the root, tree removal
//! relative to directory fds, and the xattr calls nix does not wrap.
//!
//! Nothing here recurses or holds an fd per level of a tree: a layer may
//! make trees deeper than any thread's stack or the fd limit.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::ArchiveError;
pub(super) use crate::xattr::{fsetxattr, lgetxattr, llistxattr, lsetxattr};

/// Linux's own limit on symlinks followed in one lookup.
pub(super) const MAX_SYMLINKS: u32 = 40;

/// The longest path inside the image: `/`, the path and a NUL fit in
/// PATH_MAX, so a container can name every file it gets. It also bounds
/// the depth (2047) and what each entry costs to resolve and record.
pub(super) const MAX_PATH: usize = libc::PATH_MAX as usize - 2;

/// A path relative to the root, as '/'-joined components without `.`, `..`
/// or empty parts; the empty path is the root itself.
pub(super) type RelPath = Vec<u8>;

/// Cleans a tar name into a root-relative path: absolute names are taken
/// relative to the root, `.` and empty parts dropped, `..` applied lexically.
/// A `..` that would climb above the root is a breakout, not clamped, so a
/// hostile layer is refused rather than silently rewritten.
pub(super) fn clean(name: &[u8]) -> Result<RelPath, ArchiveError> {
    let display = || String::from_utf8_lossy(name).into_owned();
    if name.contains(&0) {
        return Err(ArchiveError::Malformed {
            path: display(),
            reason: "name contains a NUL byte".into(),
        });
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(ArchiveError::Breakout {
                        path: display(),
                        reason: "`..` climbs above the root".into(),
                    });
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join(&b'/'))
}

/// Refuses a path inside the image longer than [`MAX_PATH`] (`entry` names
/// the tar entry), before anything is resolved or created for it.
pub(super) fn check_len(path: &[u8], entry: &str) -> Result<(), ArchiveError> {
    if path.len() <= MAX_PATH {
        return Ok(());
    }
    Err(ArchiveError::Refused {
        path: entry.to_string(),
        reason: format!(
            "the path is {} bytes long, more than the {MAX_PATH} a path inside an image may be",
            path.len()
        ),
    })
}

/// Splits a cleaned path into its parent and last component; `None` for the root.
pub(super) fn split_last(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.is_empty() {
        return None;
    }
    Some(match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    })
}

pub(super) fn join(parent: &[u8], name: &[u8]) -> RelPath {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

pub(super) fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

pub(super) fn show(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

pub(super) fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

pub(super) fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// An overlay whiteout: a character device with device number 0:0.
pub(super) fn is_whiteout(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFCHR && st.st_rdev == 0
}

/// `fstatat` without following a final symlink; `None` when nothing is there.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<FileStat>> {
    match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn open_path(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Creates `name` in `dir` as a new regular file (0600 until its metadata
/// is set), failing if anything is there, never following a symlink.
pub(super) fn create_new_file(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
}

/// Whether openat2(2) is missing (Linux before 5.6).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `path` below `dir` as an O_PATH directory fd if every component
/// is a real directory: no symlinks, nothing above `dir`. One syscall
/// with openat2(2), else one per component.
pub(super) fn open_beneath(dir: BorrowedFd<'_>, path: &[u8]) -> nix::Result<OwnedFd> {
    let name: &[u8] = if path.is_empty() { b"." } else { path };
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        match openat2(dir, name, how) {
            Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            other => return other,
        }
    }
    let mut cur = dir
        .try_clone_to_owned()
        .map_err(|e| e.raw_os_error().map_or(Errno::EMFILE, Errno::from_raw))?;
    for comp in components(path) {
        if comp == b"." || comp == b".." {
            return Err(Errno::EXDEV);
        }
        cur = openat(
            cur.as_fd(),
            comp,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(cur)
}

/// Opens a root directory (the apply root or an overlay lower) as an O_PATH fd.
pub(super) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// A directory inside the root: an O_PATH fd and where it really is.
pub(super) struct DirRef {
    /// Shared with the resolution cache, so a cache hit costs no dup(2).
    pub fd: Rc<OwnedFd>,
    /// The resolved path (symlinks followed, inside the root).
    pub path: RelPath,
}

/// A directory that resolution had to create because the layer needs it.
/// Named by its real path, not an fd: a chain of them may be thousands long.
pub(super) struct Created {
    pub path: RelPath,
    /// It replaced an overlay whiteout, so it must become opaque.
    pub over_whiteout: bool,
}

/// How to resolve a directory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// Report a missing or non-directory component as `None`.
    Lookup,
    /// Create missing components (and, in an overlay upper, replace
    /// whiteouts with directories).
    Create { overlay: bool },
}

/// The apply root, with a one-entry cache of the last resolved directory
/// because tar entries come grouped by directory.
pub(super) struct Tree {
    root: OwnedFd,
    cache: Option<(RelPath, Rc<OwnedFd>, RelPath)>,
}

impl Tree {
    pub fn open(root: &Path) -> Result<Self, ArchiveError> {
        let fd = open_root(root).map_err(|source| ArchiveError::Open {
            what: "apply root",
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Tree {
            root: fd,
            cache: None,
        })
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Drops the cached resolution; called on every removal, the only way
    /// an already resolved path can come to resolve differently.
    pub fn invalidate(&mut self) {
        self.cache = None;
    }

    /// Resolves `path` (a cleaned, root-relative directory path) the way
    /// `openat2(RESOLVE_IN_ROOT)` would: symlinks are followed but absolute
    /// targets and `..` are taken inside the root. `entry` names the tar
    /// entry in errors. A directory whose real path is longer than
    /// [`MAX_PATH`] (through symlinks) is refused.
    pub fn resolve(
        &mut self,
        path: &[u8],
        walk: Walk,
        created: &mut Vec<Created>,
        entry: &str,
    ) -> Result<Option<DirRef>, ArchiveError> {
        if let Some(d) = self.below_cache(path) {
            return Ok(Some(d));
        }
        let found = match self.fast(path) {
            Some(fd) => Some(DirRef {
                fd: Rc::new(fd),
                path: path.to_vec(),
            }),
            None => self.walk(path, walk, created, entry)?,
        };
        if let Some(d) = &found {
            self.cache = Some((path.to_vec(), Rc::clone(&d.fd), d.path.clone()));
        }
        Ok(found)
    }

    /// The cached directory, or a real directory below it: a tree is listed
    /// parent first, so the next entry's parent is usually one level below
    /// the last one resolved, and one lookup finds it however deep it is.
    fn below_cache(&mut self, path: &[u8]) -> Option<DirRef> {
        let (key, fd, real) = self.cache.as_ref()?;
        if key.as_slice() == path {
            return Some(DirRef {
                fd: Rc::clone(fd),
                path: real.clone(),
            });
        }
        if key.is_empty() {
            return None; // the root: `fast` is the same lookup
        }
        let rest = path.strip_prefix(key.as_slice())?.strip_prefix(b"/")?;
        if real.len() + 1 + rest.len() > MAX_PATH {
            return None; // the walk refuses it
        }
        let below = open_beneath(fd.as_fd(), rest).ok()?;
        let d = DirRef {
            fd: Rc::new(below),
            path: join(real, rest),
        };
        self.cache = Some((path.to_vec(), Rc::clone(&d.fd), d.path.clone()));
        Some(d)
    }

    /// The common case in one syscall: a path of real directories with no
    /// symlinks in it. Anything else (or an old kernel) takes the walk.
    fn fast(&self, path: &[u8]) -> Option<OwnedFd> {
        if NO_OPENAT2.load(Ordering::Relaxed) {
            return None;
        }
        open_beneath(self.root.as_fd(), path).ok()
    }

    /// Opens a directory by the real path a resolution gave (no symlinks
    /// on it); `None` if it is no longer a directory there.
    pub fn open_real(&self, path: &[u8], entry: &str) -> Result<Option<OwnedFd>, ArchiveError> {
        match open_beneath(self.root.as_fd(), path) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => Ok(None),
            Err(e) => Err(io_err("opening directory", entry, e.into())),
        }
    }

    /// Component by component, holding only the current directory's fd and
    /// its real path (`..` reopens the parent by that path).
    fn walk(
        &mut self,
        path: &[u8],
        walk: Walk,
        created: &mut Vec<Created>,
        entry: &str,
    ) -> Result<Option<DirRef>, ArchiveError> {
        // `None` is the root.
        let mut cur: Option<OwnedFd> = None;
        let mut real: RelPath = Vec::new();
        // Where each component of `real` starts, to step back up.
        let mut starts: Vec<usize> = Vec::new();
        let mut queue: VecDeque<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
        let mut links = 0;
        while let Some(comp) = queue.pop_front() {
            match comp.as_slice() {
                b"" | b"." => continue,
                // Lexical, and clamped at the root like RESOLVE_IN_ROOT.
                b".." => {
                    if let Some(start) = starts.pop() {
                        real.truncate(start.saturating_sub(1));
                        cur = if real.is_empty() {
                            None
                        } else {
                            Some(
                                self.open_real(&real, entry)?
                                    .ok_or_else(|| moved(entry, &real))?,
                            )
                        };
                    }
                    continue;
                }
                _ => {}
            }
            if real.len() + 1 + comp.len() > MAX_PATH {
                return Err(ArchiveError::Refused {
                    path: entry.to_string(),
                    reason: format!(
                        "{} resolves to a path longer than {MAX_PATH} bytes",
                        show(path)
                    ),
                });
            }
            let dir = cur.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
            let next = match open_path(dir, &comp) {
                Ok(fd) => {
                    let st = fstat(&fd).map_err(|e| io_err("inspecting", entry, e.into()))?;
                    let ty = file_type(&st);
                    if ty == SFlag::S_IFDIR {
                        fd
                    } else if ty == SFlag::S_IFLNK {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(ArchiveError::Malformed {
                                path: entry.to_string(),
                                reason: format!(
                                    "too many levels of symbolic links resolving {}",
                                    show(path)
                                ),
                            });
                        }
                        let target = readlinkat(dir, comp.as_slice())
                            .map_err(|e| io_err("reading symlink", entry, e.into()))?;
                        let target = target.as_bytes();
                        if target.starts_with(b"/") {
                            (cur, real) = (None, Vec::new());
                            starts.clear();
                        }
                        for c in target.split(|&b| b == b'/').rev() {
                            queue.push_front(c.to_vec());
                        }
                        continue;
                    } else if matches!(walk, Walk::Create { overlay: true }) && is_whiteout(&st) {
                        // The layer deleted this directory and now puts
                        // something below it: a fresh (opaque) directory.
                        unlinkat(dir, comp.as_slice(), UnlinkatFlags::NoRemoveDir)
                            .map_err(|e| io_err("removing whiteout", entry, e.into()))?;
                        self.cache = None;
                        let fd = make_dir(dir, &comp, entry)?;
                        created.push(Created {
                            path: join(&real, &comp),
                            over_whiteout: true,
                        });
                        fd
                    } else if walk == Walk::Lookup {
                        // Nothing is below a non-directory.
                        return Ok(None);
                    } else {
                        return Err(ArchiveError::NotADirectory {
                            path: entry.to_string(),
                            component: show(&join(&real, &comp)),
                        });
                    }
                }
                Err(Errno::ENOENT) if walk != Walk::Lookup => {
                    let fd = make_dir(dir, &comp, entry)?;
                    created.push(Created {
                        path: join(&real, &comp),
                        over_whiteout: false,
                    });
                    fd
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => return Err(io_err("opening directory", entry, e.into())),
            };
            if !real.is_empty() {
                real.push(b'/');
            }
            starts.push(real.len());
            real.extend_from_slice(&comp);
            cur = Some(next);
        }
        let fd = match cur {
            Some(fd) => fd,
            None => dup(self.root.as_fd(), entry)?,
        };
        Ok(Some(DirRef {
            fd: Rc::new(fd),
            path: real,
        }))
    }
}

/// A directory on the resolved path went away mid-walk (only this applier
/// writes the tree, so it never should).
fn moved(entry: &str, real: &[u8]) -> ArchiveError {
    io_err(
        "reopening directory",
        entry,
        io::Error::other(format!("{} is no longer a directory", show(real))),
    )
}

fn make_dir(parent: BorrowedFd<'_>, name: &[u8], entry: &str) -> Result<OwnedFd, ArchiveError> {
    match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io_err("creating parent directory", entry, e.into())),
    }
    openat(
        parent,
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening created directory", entry, e.into()))
}

pub(super) fn dup(fd: BorrowedFd<'_>, entry: &str) -> Result<OwnedFd, ArchiveError> {
    fd.try_clone_to_owned()
        .map_err(|e| io_err("duplicating fd", entry, e))
}

pub(super) fn io_err(op: &str, path: &str, source: io::Error) -> ArchiveError {
    ArchiveError::Io {
        op: op.to_string(),
        path: path.to_string(),
        source,
    }
}

/// Removes `name` in `dir`, with everything below it if it is a directory,
/// never following symlinks. Returns whether anything was there.
pub(super) fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(true),
        Err(Errno::ENOENT) => return Ok(false),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    remove_tree_at(dir, name)?;
    Ok(true)
}

/// A directory being emptied: its name in its parent, its identity (to
/// check `..` leads back to it) and the subdirectories still to empty.
struct Level {
    name: Vec<u8>,
    id: (u64, u64),
    subdirs: Vec<Vec<u8>>,
}

/// Removes the directory `name` in `top` and everything below it, depth
/// first without recursion, holding one directory fd at a time: going
/// down opens a child, coming back up opens `..` and checks it is the
/// directory it came from.
fn remove_tree_at(top: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let mut cur = match open_dir(top, name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut levels = vec![Level {
        name: name.to_vec(),
        id: dir_id(&cur)?,
        subdirs: unlink_files(&cur)?,
    }];
    while let Some(level) = levels.last_mut() {
        if let Some(sub) = level.subdirs.pop() {
            match open_dir(cur.as_fd(), &sub) {
                Ok(child) => {
                    levels.push(Level {
                        name: sub,
                        id: dir_id(&child)?,
                        subdirs: unlink_files(&child)?,
                    });
                    cur = child;
                }
                Err(Errno::ENOENT) => {}
                // Replaced by a non-directory since it was listed.
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    match unlinkat(cur.as_fd(), sub.as_slice(), UnlinkatFlags::NoRemoveDir) {
                        Ok(()) | Err(Errno::ENOENT) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        // `cur` is empty: step up and remove it.
        let done = std::mem::take(&mut level.name);
        levels.pop();
        let parent = match levels.last() {
            Some(parent) => {
                let up = open_dir(cur.as_fd(), b"..")?;
                if dir_id(&up)? != parent.id {
                    return Err(io::Error::other(
                        "a directory moved while its tree was being removed",
                    ));
                }
                cur = up;
                cur.as_fd()
            }
            None => top,
        };
        match unlinkat(parent, done.as_slice(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn dir_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Unlinks everything in `dir` but its subdirectories, which it returns.
fn unlink_files(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut subdirs = Vec::new();
    for name in list_dir(dir)? {
        match unlinkat(dir.as_fd(), name.as_slice(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) => subdirs.push(name),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(subdirs)
}

/// The names in a directory, from any fd to it (O_PATH included).
pub(super) fn list_dir(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    // Through the fd's /proc link: the directory is already resolved, and
    // nix's `dir` feature is not enabled in this project.
    let path = proc_path(dir.as_fd(), None);
    let mut names = Vec::new();
    for ent in std::fs::read_dir(os(path.as_bytes()))? {
        names.push(ent?.file_name().into_vec());
    }
    Ok(names)
}

/// `/proc/self/fd/<dir>/<name>`: a path for the l*xattr calls that reaches
/// `name` through an fd already resolved inside the root, without following
/// `name` itself if it is a symlink. Without a name it is `<dir>/.`, the
/// directory itself (the bare magic link would be the link, for l* calls).
pub(super) fn proc_path(dir: BorrowedFd<'_>, name: Option<&[u8]>) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.unwrap_or(b"."));
    // Components were checked for NUL bytes when the name was cleaned.
    CString::new(p).unwrap_or_default()
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// fchmodat2(2)'s number, the same on every architecture (it postdates
/// the syscall table unification); the libc crate lacks it on some.
const SYS_FCHMODAT2: libc::c_long = 452;
static NO_FCHMODAT2: AtomicBool = AtomicBool::new(false);

/// `chmod` of `name` in `dir` without following a symlink there: one
/// fchmodat2(2) call on Linux 6.6+, else glibc's O_PATH emulation.
pub(super) fn chmod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    if !NO_FCHMODAT2.load(Ordering::Relaxed) {
        let c = cstr(name)?;
        // SAFETY: the fd is live and the path is NUL-terminated.
        let rc = unsafe {
            libc::syscall(
                SYS_FCHMODAT2,
                dir.as_raw_fd(),
                c.as_ptr(),
                mode as libc::c_uint,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
        NO_FCHMODAT2.store(true, Ordering::Relaxed);
    }
    nix::sys::stat::fchmodat(
        dir,
        name,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

pub(super) fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_normalises_names() {
        let ok = [
            ("a/b/c", "a/b/c"),
            ("./a//b/./c/", "a/b/c"),
            ("/abs/path", "abs/path"),
            ("a/../b", "b"),
            ("a/b/../../c", "c"),
            ("./", ""),
            ("/", ""),
            ("a/..", ""),
        ];
        for (input, want) in ok {
            assert_eq!(
                clean(input.as_bytes()).ok(),
                Some(want.as_bytes().to_vec()),
                "{input}"
            );
        }
    }

    #[test]
    fn clean_refuses_climbing_out() {
        for bad in ["..", "../x", "a/../../x", "/../x", "./../../etc/passwd"] {
            let err = clean(bad.as_bytes()).err();
            assert!(
                matches!(err, Some(ArchiveError::Breakout { ref path, .. }) if path == bad),
                "{bad}: {err:?}"
            );
        }
        assert!(matches!(
            clean(b"a\0b"),
            Err(ArchiveError::Malformed { .. })
        ));
    }

    #[test]
    fn split_and_join() {
        assert_eq!(split_last(b""), None);
        assert_eq!(split_last(b"a"), Some((&b""[..], &b"a"[..])));
        assert_eq!(split_last(b"a/b/c"), Some((&b"a/b"[..], &b"c"[..])));
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a/b", b"x"), b"a/b/x");
    }
}
