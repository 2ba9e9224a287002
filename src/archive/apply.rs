//! Writing tar entries into the root: creating each entry relative to its
//! resolved parent directory fd and applying ownership, xattrs, mode and
//! times in that order (chown clears setuid/setgid and file capabilities).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fchmod, futimens, makedev, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat, linkat, symlinkat};
use tracing::{debug, warn};

use super::reader::{Entry, Kind, TarReader, Time};
use super::safe::{
    self, Created, DirRef, RelPath, Tree, Walk, io_err, is_dir, is_whiteout, lstat_at, show,
    split_last,
};
use super::whiteout::{self, Lowers, Named};
use super::{ArchiveError, BUF_SIZE, WhiteoutMode};

/// Applying into an overlay upperdir.
pub(super) struct Overlay {
    pub lowers: Lowers,
    pub opaque_xattr: &'static [u8],
}

/// Where metadata goes: an open fd, or a name in a directory (never
/// following a symlink there).
#[derive(Clone, Copy)]
pub(super) enum At<'a> {
    Fd(BorrowedFd<'a>),
    Name(BorrowedFd<'a>, &'a [u8]),
}

/// Metadata to put on a created (or kept) entry.
pub(super) struct Meta<'a> {
    pub uid: u32,
    pub gid: u32,
    /// `None` for symlinks, whose mode Linux does not keep.
    pub mode: Option<u32>,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
    /// (atime, mtime); `None` for directories, whose times are set at the end.
    pub times: Option<(Time, Time)>,
}

pub(super) struct Applier {
    pub(super) tree: Tree,
    pub(super) overlay: Option<Overlay>,
    pub(super) is_root: bool,
    /// Resolved paths this layer wrote, with all their ancestors: what an
    /// opaque directory or a whiteout in this same layer must keep.
    pub(super) written: HashSet<RelPath>,
    /// Directory times, set after all entries because writing children
    /// changes them.
    pub(super) dir_times: HashMap<RelPath, (Time, Time)>,
    pub(super) buf: Vec<u8>,
    entries: u64,
    /// Directories made only because entries needed them, with no lower to
    /// copy metadata from: a later rebase onto real lowers fixes them up.
    pub(super) implicit: std::collections::BTreeSet<RelPath>,
}

impl Applier {
    pub fn new(root: &std::path::Path, mode: &WhiteoutMode) -> Result<Self, ArchiveError> {
        let tree = Tree::open(root)?;
        let overlay = match mode {
            WhiteoutMode::Plain => None,
            WhiteoutMode::Overlay { userxattr, lowers } => Some(Overlay {
                lowers: Lowers::open(lowers, *userxattr)?,
                opaque_xattr: whiteout::opaque_xattr(*userxattr),
            }),
        };
        Ok(Applier {
            tree,
            overlay,
            is_root: nix::unistd::geteuid().is_root(),
            written: HashSet::new(),
            dir_times: HashMap::new(),
            buf: vec![0; BUF_SIZE],
            entries: 0,
            implicit: std::collections::BTreeSet::new(),
        })
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Gives `dirs` (made implicitly while this layer was applied without
    /// its lowers) the owner, mode, xattrs and times the lowers have for
    /// them, as a sequential apply would have; then sets directory times.
    pub fn adopt_lower_metadata(&mut self, dirs: &[RelPath]) -> Result<(), ArchiveError> {
        let mut dirs = dirs.to_vec();
        dirs.sort_by_key(|p| p.iter().filter(|&&b| b == b'/').count());
        // Below a directory no lower has, none has anything: a chain of
        // implicit directories costs one search of the lowers.
        let mut missing: HashSet<RelPath> = HashSet::new();
        for path in dirs {
            let display = show(&path);
            let Some((parent, name)) = split_last(&path) else {
                continue;
            };
            if missing.contains(parent) {
                missing.insert(path);
                continue;
            }
            let Some(dir) = self
                .tree
                .resolve(parent, Walk::Lookup, &mut Vec::new(), &display)?
            else {
                continue;
            };
            let still_dir = lstat_at(dir.fd.as_fd(), name)
                .map_err(|err| io_err("inspecting", &display, err))?
                .is_some_and(|st| is_dir(&st));
            if dir.path != parent || !still_dir {
                continue;
            }
            let lower = match &self.overlay {
                Some(o) => o
                    .lowers
                    .find(self.tree.root_fd(), &path, false)
                    .map_err(|err| io_err("looking up lower directory", &display, err))?
                    .map(|(_, l)| l)
                    .filter(|l| is_dir(&l.stat)),
                None => None,
            };
            let Some(l) = lower else {
                missing.insert(path);
                continue;
            };
            let (meta_x, times) = whiteout::lower_meta(&l, &display)?;
            let meta = Meta {
                uid: l.stat.st_uid,
                gid: l.stat.st_gid,
                mode: Some(l.stat.st_mode & 0o7777),
                xattrs: &meta_x,
                times: None,
            };
            self.set_meta(At::Name(dir.fd.as_fd(), name), &meta, &display)?;
            self.dir_times.insert(path.clone(), times);
        }
        self.finish()
    }

    pub fn apply<R: BufRead>(
        &mut self,
        e: &Entry,
        tar: &mut TarReader<R>,
    ) -> Result<(), ArchiveError> {
        self.entries += 1;
        let display = e.display();
        let path = safe::clean(&e.name)?;
        safe::check_len(&path, &display)?;
        let (parent, base) = match whiteout::name_entry(&path, &display)? {
            Named::Nothing => return Ok(()),
            Named::Opaque { parent } => return self.opaque(parent, &display),
            Named::Remove { parent, name } => return self.remove(parent, name, e, &display),
            Named::Entry { parent, base } => (parent, base),
        };
        let dir = self.resolve_dir(parent, &display)?;
        let here = safe::join(&dir.path, base);
        // Through a symlink the real path may be longer than the name.
        safe::check_len(&here, &display)?;
        self.mark_written(&here);
        match e.kind {
            Kind::Dir => self.dir(&dir, base, &here, e, &display),
            Kind::File => self.file(&dir, base, e, tar, &display),
            Kind::Symlink => {
                let fd = dir.fd.as_fd();
                self.create(fd, base, &display, "creating symlink", || {
                    symlinkat(safe::os(&e.link), fd, safe::os(base))
                })?;
                self.set_meta(At::Name(fd, base), &entry_meta(e, None), &display)
            }
            Kind::Hardlink => self.hardlink(&dir, base, e, &display),
            Kind::Char | Kind::Block | Kind::Fifo => self.node(&dir, base, e, &display),
        }
    }

    /// Sets the deferred directory times, deepest first.
    pub fn finish(&mut self) -> Result<(), ArchiveError> {
        let mut dirs: Vec<_> = self.dir_times.drain().collect();
        dirs.sort_by_key(|(p, _)| Reverse(p.iter().filter(|&&b| b == b'/').count()));
        for (path, (atime, mtime)) in dirs {
            let Some((parent, name)) = split_last(&path) else {
                continue;
            };
            let display = show(&path);
            let Some(dir) = self
                .tree
                .resolve(parent, Walk::Lookup, &mut Vec::new(), &display)?
            else {
                continue;
            };
            // Skip a directory that a later entry replaced or moved away.
            if dir.path != parent
                || !lstat_at(dir.fd.as_fd(), name)
                    .map_err(|err| io_err("inspecting", &display, err))?
                    .is_some_and(|st| is_dir(&st))
            {
                continue;
            }
            set_times(dir.fd.as_fd(), name, atime, mtime, &display)?;
        }
        Ok(())
    }

    /// Resolves (creating as needed) a directory the layer writes into.
    pub(super) fn resolve_dir(
        &mut self,
        path: &[u8],
        display: &str,
    ) -> Result<DirRef, ArchiveError> {
        let mut created = Vec::new();
        let walk = Walk::Create {
            overlay: self.overlay.is_some(),
        };
        let dir = self.tree.resolve(path, walk, &mut created, display)?;
        // No lower has a child of a directory none of them has: a chain of
        // new directories costs one search of the lowers, not one a level.
        let mut missing: Option<&[u8]> = None;
        for c in &created {
            let below_missing =
                missing.is_some_and(|m| split_last(&c.path).is_some_and(|(p, _)| p == m));
            let found = self.init_created_dir(c, below_missing, display)?;
            missing = (!found).then_some(c.path.as_slice());
        }
        dir.ok_or_else(|| {
            io_err(
                "resolving parent directory",
                display,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }

    /// Metadata for a directory the layer needs but does not list: copied
    /// from the first overlay lower that has it, else 0755 root. Returns
    /// whether a lower had it.
    fn init_created_dir(
        &mut self,
        c: &Created,
        below_missing: bool,
        display: &str,
    ) -> Result<bool, ArchiveError> {
        let Some((parent_path, name)) = split_last(&c.path) else {
            return Ok(false); // the root is never created
        };
        let parent = self.tree.open_real(parent_path, display)?.ok_or_else(|| {
            io_err(
                "reopening a created directory's parent",
                display,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        let lower = match &self.overlay {
            Some(o) if !c.over_whiteout && !below_missing => o
                .lowers
                .find(self.tree.root_fd(), &c.path, false)
                .map_err(|err| io_err("looking up lower directory", display, err))?
                .map(|(_, l)| l)
                .filter(|l| is_dir(&l.stat)),
            _ => None,
        };
        let found = lower.is_some();
        match lower {
            Some(l) => {
                let (meta_x, times) = whiteout::lower_meta(&l, display)?;
                self.set_meta(
                    At::Name(parent.as_fd(), name),
                    &Meta {
                        uid: l.stat.st_uid,
                        gid: l.stat.st_gid,
                        mode: Some(l.stat.st_mode & 0o7777),
                        xattrs: &meta_x,
                        times: None,
                    },
                    display,
                )?;
                self.dir_times.insert(c.path.clone(), times);
            }
            None => {
                let meta = Meta {
                    uid: 0,
                    gid: 0,
                    mode: Some(0o755),
                    xattrs: &[],
                    times: None,
                };
                self.set_meta(At::Name(parent.as_fd(), name), &meta, display)?;
                if !c.over_whiteout {
                    self.implicit.insert(c.path.clone());
                }
            }
        }
        if c.over_whiteout {
            self.set_opaque(parent.as_fd(), Some(name), display)?;
        }
        Ok(found)
    }

    pub(super) fn mark_written(&mut self, path: &[u8]) {
        let mut p = path;
        // Ancestors of a recorded path are always recorded too.
        while !p.is_empty() && self.written.insert(p.to_vec()) {
            p = split_last(p).map_or(&[][..], |(parent, _)| parent);
        }
    }

    /// Removes whatever is at `name`, so a new entry can take its place.
    pub(super) fn replace(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        display: &str,
    ) -> Result<(), ArchiveError> {
        let removed = safe::remove_all_at(dir, name)
            .map_err(|err| io_err("removing existing entry", display, err))?;
        if removed {
            self.tree.invalidate();
        }
        Ok(())
    }

    /// Runs `make` (an exclusive create of `name`); if something is already
    /// there, removes it and tries once more. Creating first saves a
    /// syscall per entry in the common case of a fresh path.
    pub(super) fn create<T>(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        display: &str,
        op: &str,
        mut make: impl FnMut() -> nix::Result<T>,
    ) -> Result<T, ArchiveError> {
        match make() {
            Err(Errno::EEXIST) => {
                self.replace(dir, name, display)?;
                make()
            }
            other => other,
        }
        .map_err(|err| io_err(op, display, err.into()))
    }

    fn dir(
        &mut self,
        dir: &DirRef,
        base: &[u8],
        here: &[u8],
        e: &Entry,
        display: &str,
    ) -> Result<(), ArchiveError> {
        // Listed by the layer: its metadata is the layer's, not a lower's.
        self.implicit.remove(here);
        let fd = dir.fd.as_fd();
        let mkdir = || nix::sys::stat::mkdirat(fd, base, Mode::from_bits_truncate(0o700));
        // An existing directory stays (keeping lower content) and takes the
        // new metadata; anything else is replaced.
        let mut over_whiteout = false;
        match mkdir() {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let existing =
                    lstat_at(fd, base).map_err(|err| io_err("inspecting", display, err))?;
                if !existing.as_ref().is_some_and(is_dir) {
                    over_whiteout =
                        self.overlay.is_some() && existing.as_ref().is_some_and(is_whiteout);
                    self.replace(fd, base, display)?;
                    mkdir().map_err(|err| io_err("creating directory", display, err.into()))?;
                }
            }
            Err(err) => return Err(io_err("creating directory", display, err.into())),
        }
        self.set_meta(At::Name(fd, base), &entry_meta(e, Some(e.mode)), display)?;
        if over_whiteout {
            // Recreated after this layer deleted it: lower content stays hidden.
            self.set_opaque(fd, Some(base), display)?;
        }
        self.dir_times.insert(here.to_vec(), entry_times(e));
        Ok(())
    }

    fn file<R: BufRead>(
        &mut self,
        dir: &DirRef,
        base: &[u8],
        e: &Entry,
        tar: &mut TarReader<R>,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let fd = dir.fd.as_fd();
        let file = self.create(fd, base, display, "creating file", || {
            safe::create_new_file(fd, base)
        })?;
        let mut file = File::from(file);
        let write_err = |err| io_err("writing file", display, err);
        match &e.sparse {
            None => loop {
                let n = tar.read_data(&mut self.buf)?;
                if n == 0 {
                    break;
                }
                file.write_all(&self.buf[..n]).map_err(write_err)?;
            },
            Some(map) => {
                // Seek over the holes so they stay holes on disk.
                for seg in map {
                    file.seek(SeekFrom::Start(seg.offset)).map_err(write_err)?;
                    let mut left = seg.len;
                    while left > 0 {
                        let want = self
                            .buf
                            .len()
                            .min(usize::try_from(left).unwrap_or(usize::MAX));
                        let n = tar.read_data(&mut self.buf[..want])?;
                        file.write_all(&self.buf[..n]).map_err(write_err)?;
                        left -= n as u64;
                    }
                }
                file.set_len(e.size).map_err(write_err)?;
            }
        }
        // Metadata through the open fd: no path lookups.
        self.set_meta(At::Fd(file.as_fd()), &entry_meta(e, Some(e.mode)), display)
    }

    fn node(
        &mut self,
        dir: &DirRef,
        base: &[u8],
        e: &Entry,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let fd = dir.fd.as_fd();
        let (kind, dev) = match e.kind {
            Kind::Char => (SFlag::S_IFCHR, makedev(e.major.into(), e.minor.into())),
            Kind::Block => (SFlag::S_IFBLK, makedev(e.major.into(), e.minor.into())),
            _ => (SFlag::S_IFIFO, 0),
        };
        let mknod = || mknodat(fd, base, kind, Mode::from_bits_truncate(0o600), dev);
        let made = match mknod() {
            Err(Errno::EEXIST) => {
                self.replace(fd, base, display)?;
                mknod()
            }
            other => other,
        };
        match made {
            Ok(()) => {}
            // Unprivileged (e.g. in a user namespace) devices cannot be made;
            // containerd skips them there too.
            Err(Errno::EPERM) if !self.is_root && kind != SFlag::S_IFIFO => {
                let entry = display;
                warn!(entry, "skipping device node: not running as root");
                return Ok(());
            }
            Err(err) => return Err(io_err("creating device node", display, err.into())),
        }
        self.set_meta(At::Name(fd, base), &entry_meta(e, Some(e.mode)), display)
    }

    fn hardlink(
        &mut self,
        dir: &DirRef,
        base: &[u8],
        e: &Entry,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let link_err = |reason: &str| ArchiveError::Hardlink {
            path: display.to_string(),
            target: String::from_utf8_lossy(&e.link).into_owned(),
            reason: reason.to_string(),
        };
        let target = safe::clean(&e.link).map_err(|_| link_err("target climbs above the root"))?;
        if target.len() > safe::MAX_PATH {
            return Err(link_err(
                "target path is longer than a path inside an image may be",
            ));
        }
        let Some((tparent, tname)) = split_last(&target) else {
            return Err(link_err("target is the root directory"));
        };
        let overlay = self.overlay.is_some();
        let tdir = self
            .tree
            .resolve(tparent, Walk::Lookup, &mut Vec::new(), display)?;
        let mut found = None;
        if let Some(td) = tdir {
            let st = lstat_at(td.fd.as_fd(), tname)
                .map_err(|err| io_err("inspecting hardlink target", display, err))?;
            // In an upper, a whiteout means this layer deleted the target.
            if let Some(st) = st.filter(|st| !(overlay && is_whiteout(st))) {
                found = Some((td, st));
            }
        }
        let (tdir, tstat) = match found {
            Some(f) => f,
            // Not in the upper as resolved there: look through the merged
            // view, where the upper's whiteouts and opaque dirs hide lowers.
            None if overlay => {
                let merged = match &self.overlay {
                    Some(o) => o
                        .lowers
                        .find(self.tree.root_fd(), &target, true)
                        .map_err(|err| io_err("looking up hardlink target", display, err))?,
                    None => None,
                };
                match merged {
                    None => return Err(link_err("target does not exist")),
                    Some((_, obj)) if is_dir(&obj.stat) => {
                        return Err(link_err("target is a directory"));
                    }
                    Some((0, obj)) => {
                        let dir = DirRef {
                            fd: Rc::new(obj.parent),
                            path: tparent.to_vec(),
                        };
                        (dir, obj.stat)
                    }
                    Some((_, lower)) => {
                        let td = self.resolve_dir(tparent, display)?;
                        self.copy_up(&td, tname, &lower, display)?;
                        let copied = safe::join(&td.path, tname);
                        self.mark_written(&copied);
                        (td, lower.stat)
                    }
                }
            }
            None => return Err(link_err("target does not exist")),
        };
        if is_dir(&tstat) {
            return Err(link_err("target is a directory"));
        }
        if tdir.path == dir.path && tname == base {
            // A link to itself: the entry is already there.
            return Ok(());
        }
        let fd = dir.fd.as_fd();
        self.create(fd, base, display, "creating hardlink", || {
            linkat(tdir.fd.as_fd(), tname, fd, base, AtFlags::empty())
        })?;
        // containerd applies the link header's metadata to the shared inode.
        let mode = (safe::file_type(&tstat) != SFlag::S_IFLNK).then_some(e.mode);
        self.set_meta(At::Name(fd, base), &entry_meta(e, mode), display)
    }

    /// Owner, then xattrs, then mode, then times: chown clears setuid,
    /// setgid and `security.capability`.
    pub(super) fn set_meta(
        &self,
        at: At<'_>,
        m: &Meta<'_>,
        display: &str,
    ) -> Result<(), ArchiveError> {
        if self.is_root {
            let (uid, gid) = (Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid)));
            match at {
                At::Fd(fd) => fchown(fd, uid, gid),
                At::Name(dir, name) => fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW),
            }
            .map_err(|err| io_err("changing owner", display, err.into()))?;
        }
        if !m.xattrs.is_empty() {
            let path = match at {
                At::Fd(_) => None,
                At::Name(dir, name) => Some(safe::proc_path(dir, Some(name))),
            };
            let set = |key: &[u8], value: &[u8]| match (at, &path) {
                (At::Fd(fd), _) => safe::fsetxattr(fd, key, value),
                (At::Name(dir, name), None) => {
                    safe::lsetxattr(&safe::proc_path(dir, Some(name)), key, value)
                }
                (At::Name(..), Some(p)) => safe::lsetxattr(p, key, value),
            };
            for (key, value) in m.xattrs {
                // Overlay's own attributes would change how the upper is
                // read (opaque, redirect, metacopy); only whiteouts set them.
                if self.overlay.is_some() && whiteout::is_overlay_xattr(key) {
                    let entry = display;
                    debug!(entry, xattr = %String::from_utf8_lossy(key), "dropping overlay xattr");
                    continue;
                }
                if let Err(err) = set(key, value) {
                    let privileged = key.starts_with(b"trusted.") || key.starts_with(b"security.");
                    let denied = matches!(err.raw_os_error(), Some(libc::EPERM | libc::ENOTSUP));
                    if !self.is_root && privileged && denied {
                        let entry = display;
                        warn!(entry, xattr = %String::from_utf8_lossy(key), "skipping xattr: not running as root");
                        continue;
                    }
                    return Err(io_err(
                        &format!("setting xattr {}", String::from_utf8_lossy(key)),
                        display,
                        err,
                    ));
                }
            }
        }
        if let Some(mode) = m.mode {
            match at {
                At::Fd(fd) => fchmod(fd, Mode::from_bits_truncate(mode)).map_err(Into::into),
                At::Name(dir, name) => safe::chmod_at(dir, name, mode),
            }
            .map_err(|err| io_err("changing mode", display, err))?;
        }
        if let Some((atime, mtime)) = m.times {
            match at {
                At::Fd(fd) => futimens(fd, &timespec(atime), &timespec(mtime))
                    .map_err(|err| io_err("setting times", display, err.into()))?,
                At::Name(dir, name) => set_times(dir, name, atime, mtime, display)?,
            }
        }
        Ok(())
    }

    /// Marks a directory opaque in the overlay upper.
    pub(super) fn set_opaque(
        &self,
        dir: BorrowedFd<'_>,
        name: Option<&[u8]>,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let Some(o) = &self.overlay else {
            return Ok(());
        };
        safe::lsetxattr(&safe::proc_path(dir, name), o.opaque_xattr, b"y").map_err(|err| {
            io_err(
                &format!("setting {}", String::from_utf8_lossy(o.opaque_xattr)),
                display,
                err,
            )
        })
    }
}

fn entry_meta(e: &Entry, mode: Option<u32>) -> Meta<'_> {
    Meta {
        uid: e.uid,
        gid: e.gid,
        mode,
        xattrs: &e.xattrs,
        times: (e.kind != Kind::Dir).then(|| entry_times(e)),
    }
}

/// (atime, mtime) as containerd sets them: atime is the later of the two,
/// and times outside what Go's time can hold become the epoch.
fn entry_times(e: &Entry) -> (Time, Time) {
    let bound = |t: Time| {
        if t.sec < 0 || t.sec > i64::MAX / 1_000_000_000 {
            Time::default()
        } else {
            t
        }
    };
    let mtime = bound(e.mtime);
    let atime = e.atime.map(bound).filter(|a| *a > mtime).unwrap_or(mtime);
    (atime, mtime)
}

fn timespec(t: Time) -> TimeSpec {
    TimeSpec::new(t.sec, i64::from(t.nsec))
}

pub(super) fn set_times(
    dir: BorrowedFd<'_>,
    name: &[u8],
    atime: Time,
    mtime: Time,
    display: &str,
) -> Result<(), ArchiveError> {
    nix::sys::stat::utimensat(
        dir,
        name,
        &timespec(atime),
        &timespec(mtime),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|err| io_err("setting times", display, err.into()))
}
