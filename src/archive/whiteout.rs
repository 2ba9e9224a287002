//! Whiteouts and opaque directories, and reading an overlay upper's lower
//! layers (the merged view below the upper) to copy up what a layer needs.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, mknodat};
use nix::unistd::{Gid, Uid, Whence, fchownat, lseek, symlinkat};
use tracing::debug;

use super::ArchiveError;
use super::apply::{Applier, At, Meta};
use super::reader::{Entry, Time, Xattrs};
use super::safe::{
    self, DirRef, RelPath, Walk, components, file_type, io_err, is_dir, is_whiteout, lstat_at,
};

const PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// AUFS bookkeeping at the top of a layer (`.wh..wh.plnk`, `.wh..wh.aufs`).
const META_PREFIX: &[u8] = b".wh..wh.";

pub(super) fn opaque_xattr(userxattr: bool) -> &'static [u8] {
    if userxattr {
        b"user.overlay.opaque"
    } else {
        b"trusted.overlay.opaque"
    }
}

pub(super) fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Whiteout {
    /// `.wh..wh..opq`: the directory hides everything below it.
    Opaque,
    /// `.wh.<name>`: `<name>` is deleted.
    Remove,
    /// AUFS metadata, not content.
    Skip,
}

/// Whether a cleaned entry path is a whiteout, and which kind.
pub(super) fn classify(path: &[u8], base: &[u8]) -> Option<Whiteout> {
    if base == OPAQUE {
        Some(Whiteout::Opaque)
    } else if path.starts_with(META_PREFIX) {
        Some(Whiteout::Skip)
    } else if base.starts_with(PREFIX) {
        Some(Whiteout::Remove)
    } else {
        None
    }
}

/// What a layer's entry asks for, read from its cleaned path.
pub(super) enum Named<'a> {
    /// Nothing: the root itself, or AUFS metadata (both logged).
    Nothing,
    /// `parent` hides what lowers have below it.
    Opaque { parent: &'a [u8] },
    /// `parent/name` is deleted.
    Remove { parent: &'a [u8], name: &'a [u8] },
    /// `parent/base` is made.
    Entry { parent: &'a [u8], base: &'a [u8] },
}

/// Reads entry `path` (cleaned) as an applier or an index acts on it.
pub(super) fn name_entry<'a>(path: &'a [u8], display: &str) -> Result<Named<'a>, ArchiveError> {
    let Some((parent, base)) = safe::split_last(path) else {
        // containerd ignores entries that name the root itself.
        let entry = display;
        debug!(entry, "skipping entry for the root directory");
        return Ok(Named::Nothing);
    };
    Ok(match classify(path, base) {
        None => Named::Entry { parent, base },
        Some(Whiteout::Skip) => {
            let entry = display;
            debug!(entry, "skipping AUFS metadata");
            Named::Nothing
        }
        Some(Whiteout::Opaque) => Named::Opaque { parent },
        Some(Whiteout::Remove) => {
            let name = &base[PREFIX.len()..];
            if name.is_empty() || name == b"." || name == b".." {
                return Err(ArchiveError::InvalidWhiteout {
                    path: display.to_string(),
                    reason: "names no entry".into(),
                });
            }
            Named::Remove { parent, name }
        }
    })
}

impl Applier {
    /// Deletes `parent/name` as the layer's whiteout says.
    pub(super) fn remove(
        &mut self,
        parent: &[u8],
        name: &[u8],
        e: &Entry,
        display: &str,
    ) -> Result<(), ArchiveError> {
        if self.overlay.is_some() {
            self.overlay_whiteout(parent, name, e, display)
        } else {
            self.plain_whiteout(parent, name, display)
        }
    }

    fn plain_whiteout(
        &mut self,
        parent: &[u8],
        name: &[u8],
        display: &str,
    ) -> Result<(), ArchiveError> {
        let Some(dir) = self
            .tree
            .resolve(parent, Walk::Lookup, &mut Vec::new(), display)?
        else {
            return Ok(()); // nothing below a missing directory to delete
        };
        let here = safe::join(&dir.path, name);
        if self.written.contains(&here) {
            // Whiteouts hide lower layers only: keep what this layer wrote
            // and drop the rest below it.
            return match self.open_dir(dir.fd.as_fd(), name, display)? {
                Some(fd) => self.purge_unwritten(
                    &DirRef {
                        fd: Rc::new(fd),
                        path: here,
                    },
                    display,
                ),
                None => Ok(()),
            };
        }
        self.replace(dir.fd.as_fd(), name, display)
    }

    fn overlay_whiteout(
        &mut self,
        parent: &[u8],
        name: &[u8],
        e: &Entry,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let dir = self.resolve_dir(parent, display)?;
        let fd = dir.fd.as_fd();
        let here = safe::join(&dir.path, name);
        if self.written.contains(&here) {
            // Written by this layer: hide only the lower directory's content.
            if lstat_at(fd, name)
                .map_err(|err| io_err("inspecting", display, err))?
                .is_some_and(|st| is_dir(&st))
            {
                self.set_opaque(fd, Some(name), display)?;
            }
            return Ok(());
        }
        self.create(fd, name, display, "creating overlay whiteout", || {
            mknodat(fd, name, SFlag::S_IFCHR, Mode::empty(), 0)
        })?;
        if self.is_root {
            fchownat(
                fd,
                name,
                Some(Uid::from_raw(e.uid)),
                Some(Gid::from_raw(e.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|err| io_err("changing owner of overlay whiteout", display, err.into()))?;
        }
        Ok(())
    }

    pub(super) fn opaque(&mut self, path: &[u8], display: &str) -> Result<(), ArchiveError> {
        let dir = self.resolve_dir(path, display)?;
        self.mark_written(&dir.path);
        if self.overlay.is_some() {
            return self.set_opaque(dir.fd.as_fd(), None, display);
        }
        // Entries of this layer that come later are written after this, so
        // purging now keeps exactly this layer's content, in any order.
        self.purge_unwritten(&dir, display)
    }

    fn open_dir(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        display: &str,
    ) -> Result<Option<OwnedFd>, ArchiveError> {
        match openat(
            dir,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => Ok(None),
            Err(err) => Err(io_err("opening directory", display, err.into())),
        }
    }

    /// Deletes everything below `dir` that this layer did not write.
    /// Depth first without recursion; a directory still to visit is held
    /// by its real path, not an fd, however many there are.
    fn purge_unwritten(&mut self, dir: &DirRef, display: &str) -> Result<(), ArchiveError> {
        let mut next = Some((Rc::clone(&dir.fd), dir.path.clone()));
        let mut pending: Vec<RelPath> = Vec::new();
        loop {
            let (fd, path) = match next.take() {
                Some(d) => d,
                None => match pending.pop() {
                    Some(path) => match self.tree.open_real(&path, display)? {
                        Some(fd) => (Rc::new(fd), path),
                        None => continue,
                    },
                    None => return Ok(()),
                },
            };
            let names =
                safe::list_dir(&fd).map_err(|err| io_err("listing directory", display, err))?;
            for name in names {
                let child = safe::join(&path, &name);
                if !self.written.contains(&child) {
                    self.replace(fd.as_fd(), &name, display)?;
                } else if lstat_at(fd.as_fd(), &name)
                    .map_err(|err| io_err("inspecting", display, err))?
                    .is_some_and(|st| is_dir(&st))
                {
                    pending.push(child);
                }
            }
        }
    }

    /// Copies a lower object into the upper (for a hardlink to it).
    pub(super) fn copy_up(
        &mut self,
        dir: &DirRef,
        name: &[u8],
        lower: &LowerObj,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let fd = dir.fd.as_fd();
        let st = &lower.stat;
        let ty = file_type(st);
        self.replace(fd, name, display)?;
        let copy_err =
            |err: io::Error| io_err("copying hardlink target up from a lower", display, err);
        if ty == SFlag::S_IFREG {
            let src = openat(
                lower.parent.as_fd(),
                lower.name.as_slice(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|err| copy_err(err.into()))?;
            let dst = safe::create_new_file(fd, name).map_err(|err| copy_err(err.into()))?;
            copy_sparse(
                &File::from(src),
                &File::from(dst),
                st.st_size,
                &mut self.buf,
            )
            .map_err(copy_err)?;
        } else if ty == SFlag::S_IFLNK {
            let target = readlinkat(lower.parent.as_fd(), lower.name.as_slice())
                .map_err(|err| copy_err(err.into()))?;
            symlinkat(target.as_os_str(), fd, name).map_err(|err| copy_err(err.into()))?;
        } else {
            mknodat(fd, name, ty, Mode::from_bits_truncate(0o600), st.st_rdev)
                .map_err(|err| copy_err(err.into()))?;
        }
        let (xattrs, times) = lower_meta(lower, display)?;
        let meta = Meta {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: (ty != SFlag::S_IFLNK).then_some(st.st_mode & 0o7777),
            xattrs: &xattrs,
            times: Some(times),
        };
        self.set_meta(At::Name(fd, name), &meta, display)
    }
}

/// Copies a file keeping its holes.
fn copy_sparse(src: &File, dst: &File, size: i64, buf: &mut [u8]) -> io::Result<()> {
    let size = u64::try_from(size).unwrap_or(0);
    each_data_extent(
        src,
        size,
        buf,
        |e| e,
        |off, data| dst.write_all_at(data, off),
    )?;
    dst.set_len(size)
}

/// Reads the first `size` bytes of `src` extent by extent, skipping its
/// holes, and hands each piece read to `each` with its offset: a lower's
/// file copied up keeps its holes, in a tree or in an index's staging.
pub(super) fn each_data_extent<E>(
    src: &File,
    size: u64,
    buf: &mut [u8],
    read_err: impl Fn(io::Error) -> E,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let at = |o: u64| i64::try_from(o).unwrap_or(i64::MAX);
    let mut pos: u64 = 0;
    while pos < size {
        let data = match lseek(src.as_fd(), at(pos), Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(size),
            Err(Errno::ENXIO) => break, // only a hole is left
            // No SEEK_DATA support: the rest is all data.
            Err(Errno::EINVAL) => pos,
            Err(e) => return Err(read_err(e.into())),
        };
        let end = match lseek(src.as_fd(), at(data), Whence::SeekHole) {
            Ok(h) => u64::try_from(h).unwrap_or(size).min(size),
            Err(Errno::EINVAL) => size,
            Err(e) => return Err(read_err(e.into())),
        };
        let mut off = data;
        while off < end {
            let want = buf
                .len()
                .min(usize::try_from(end - off).unwrap_or(usize::MAX));
            let n = src.read_at(&mut buf[..want], off).map_err(&read_err)?;
            if n == 0 {
                break; // the file shrank under us
            }
            each(off, &buf[..n])?;
            off += n as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(())
}

/// An object found in a layer of the merged view.
pub(super) struct LowerObj {
    pub parent: OwnedFd,
    pub name: Vec<u8>,
    pub stat: FileStat,
}

/// Xattrs (without overlay's own) and (atime, mtime) of a lower object.
pub(super) fn lower_meta(
    lower: &LowerObj,
    display: &str,
) -> Result<(Xattrs, (Time, Time)), ArchiveError> {
    let path = safe::proc_path(lower.parent.as_fd(), Some(&lower.name));
    let read_err = |err| io_err("reading lower xattrs", display, err);
    let mut xattrs = Vec::new();
    let names = match safe::llistxattr(&path) {
        Ok(n) => n,
        Err(err) if err.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(err) => return Err(read_err(err)),
    };
    for n in names {
        if is_overlay_xattr(&n) {
            continue;
        }
        if let Some(v) = safe::lgetxattr(&path, &n).map_err(read_err)? {
            xattrs.push((n, v));
        }
    }
    let st = &lower.stat;
    let t = |sec: i64, nsec: i64| Time {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0),
    };
    Ok((
        xattrs,
        (
            t(st.st_atime, st.st_atime_nsec),
            t(st.st_mtime, st.st_mtime_nsec),
        ),
    ))
}

/// The lower layers of an overlay upper, newest first, for looking up
/// what the merged view shows below the upper.
pub(super) struct Lowers {
    roots: Vec<OwnedFd>,
    opaque_xattr: &'static [u8],
}

impl Lowers {
    pub fn open(paths: &[PathBuf], userxattr: bool) -> Result<Self, ArchiveError> {
        let mut roots = Vec::with_capacity(paths.len());
        for p in paths {
            roots.push(safe::open_root(p).map_err(|source| ArchiveError::Open {
                what: "overlay lower",
                path: p.clone(),
                source,
            })?);
        }
        Ok(Lowers {
            roots,
            opaque_xattr: opaque_xattr(userxattr),
        })
    }

    /// Looks `path` up as overlayfs would in the merged view of `upper`
    /// over the lowers: the newest layer that has it wins; a whiteout, a
    /// non-directory ancestor or an opaque ancestor ends the search.
    /// Symlinks are never followed. Returns the layer (0 is the upper) and
    /// the object. With `upper_final` false the upper's own entry at `path`
    /// is passed over (the caller just created it and wants what is below).
    pub fn find(
        &self,
        upper: BorrowedFd<'_>,
        path: &[u8],
        upper_final: bool,
    ) -> io::Result<Option<(usize, LowerObj)>> {
        self.find_in(Some(upper), path, upper_final)
    }

    /// [`Lowers::find`] below an upper that is not a directory on disk (a
    /// layer being indexed, whose caller has looked at its own tree): the
    /// newest lower is layer 1.
    pub fn find_below(&self, path: &[u8]) -> io::Result<Option<(usize, LowerObj)>> {
        self.find_in(None, path, true)
    }

    fn find_in(
        &self,
        upper: Option<BorrowedFd<'_>>,
        path: &[u8],
        upper_final: bool,
    ) -> io::Result<Option<(usize, LowerObj)>> {
        let comps: Vec<&[u8]> = components(path).collect();
        let Some((last, dirs)) = comps.split_last() else {
            return Ok(None);
        };
        let layers = upper.into_iter().map(|u| (0, u)).chain(
            self.roots
                .iter()
                .enumerate()
                .map(|(i, r)| (i + 1, r.as_fd())),
        );
        'layers: for (layer, root) in layers {
            let mut cur = root.try_clone_to_owned()?;
            let mut opaque = self.is_opaque(cur.as_fd())?;
            for comp in dirs {
                match safe::open_path(cur.as_fd(), comp) {
                    Ok(fd) => {
                        let st = fstat(&fd)?;
                        if !is_dir(&st) {
                            return Ok(None);
                        }
                        opaque |= self.is_opaque(fd.as_fd())?;
                        cur = fd;
                    }
                    Err(Errno::ENOENT) if opaque => return Ok(None),
                    Err(Errno::ENOENT) => continue 'layers,
                    Err(e) => return Err(e.into()),
                }
            }
            let here = if layer == 0 && !upper_final {
                None
            } else {
                lstat_at(cur.as_fd(), last)?
            };
            match here {
                Some(st) if is_whiteout(&st) => return Ok(None),
                Some(stat) => {
                    let obj = LowerObj {
                        parent: cur,
                        name: last.to_vec(),
                        stat,
                    };
                    return Ok(Some((layer, obj)));
                }
                None if opaque => return Ok(None),
                None => continue,
            }
        }
        Ok(None)
    }

    fn is_opaque(&self, dir: BorrowedFd<'_>) -> io::Result<bool> {
        match safe::lgetxattr(&safe::proc_path(dir, None), self.opaque_xattr) {
            Ok(v) => Ok(v.as_deref() == Some(b"y")),
            // Unprivileged callers cannot read trusted.*; treat as not opaque.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
