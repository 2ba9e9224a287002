//! Building a layer's tree in memory from its tar headers, with the same
//! outcome the overlay applier (`apply.rs`) gives on disk: parents resolved
//! inside the layer (through its own symlinks, clamped at the root),
//! missing directories made with the metadata a lower has for them,
//! whiteouts as overlay whiteouts, a later entry replacing an earlier one,
//! hardlinks to lower files copied up. Nothing is created by name, so no
//! name can reach outside the image.

use std::fs::File;
use std::io::{self, BufRead};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::Mode;

use super::ArchiveError;
use super::reader::{Entry, Kind, TarReader, Time};
use super::safe::{self, MAX_PATH, MAX_SYMLINKS, RelPath, components, show, split_last};
use super::whiteout::{self, LowerObj, Lowers, Named};
use crate::erofs::tree::{Data, Inode, NodeId, ROOT, Spill, Tree};

/// Most chunks one staged file is cut into: a bigger file gets bigger
/// chunks, so its index stays small however large (or sparse) it is.
const MAX_CHUNKS: u64 = 1 << 16;
const BLOCK: u64 = 512;

/// What lies below the layer being indexed.
pub(super) enum Below {
    /// Nothing: the layer is the first of its chain.
    Nothing,
    /// Not known yet (a parallel unpack); the tree is rebuilt once it is,
    /// if it depended on it.
    Unknown,
    Lowers(Lowers),
}

/// Bytes copied out of the tar (sparse files) or up from a lower (a
/// hardlink's target): appended to the metadata image by the writer.
pub(super) struct Staging {
    pub file: Option<File>,
    path: std::path::PathBuf,
    blocks: u64,
}

impl Staging {
    pub fn new(path: std::path::PathBuf) -> Self {
        Staging {
            file: None,
            path,
            blocks: 0,
        }
    }

    fn file(&mut self, display: &str) -> Result<&File, ArchiveError> {
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)
                .map_err(|err| io_err("creating the staging file", display, err))?;
            self.file = Some(f);
        }
        self.file.as_ref().ok_or_else(|| {
            io_err(
                "opening the staging file",
                display,
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }
}

/// A failed index leaves no staging file behind (found by fuzz/tar_index).
impl Drop for Staging {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A staged file being filled: chunks are allocated as data reaches them.
struct Stager {
    chunkbits: u8,
    chunks: Vec<Option<u64>>,
}

impl Stager {
    fn new(size: u64) -> Self {
        let mut chunkbits = 0u8;
        while size.div_ceil(BLOCK << chunkbits) > MAX_CHUNKS {
            chunkbits += 1;
        }
        let n = size.div_ceil(BLOCK << chunkbits);
        Stager {
            chunkbits,
            chunks: vec![None; usize::try_from(n).unwrap_or(0)],
        }
    }

    /// Writes `data` at logical offset `pos` of the file.
    fn write(
        &mut self,
        staging: &mut Staging,
        mut pos: u64,
        mut data: &[u8],
        display: &str,
    ) -> Result<(), ArchiveError> {
        let chunk = BLOCK << self.chunkbits;
        while !data.is_empty() {
            let idx = usize::try_from(pos / chunk).unwrap_or(usize::MAX);
            let Some(slot) = self.chunks.get_mut(idx) else {
                return Err(ArchiveError::Malformed {
                    path: display.to_string(),
                    reason: format!("data at offset {pos} lies beyond the file's size"),
                });
            };
            let addr = match *slot {
                Some(a) => a,
                None => {
                    let a = staging.blocks;
                    staging.blocks += chunk / BLOCK;
                    *slot = Some(a);
                    a
                }
            };
            let within = pos % chunk;
            let n = data
                .len()
                .min(usize::try_from(chunk - within).unwrap_or(usize::MAX));
            staging
                .file(display)?
                .write_all_at(&data[..n], addr * BLOCK + within)
                .map_err(|err| io_err("writing the staging file", display, err))?;
            pos += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn finish(self) -> Data {
        Data::Staged {
            chunkbits: self.chunkbits,
            chunks: self.chunks,
        }
    }
}

/// The entry's owner, mode, xattrs and times, as the applier sets them.
struct Meta {
    uid: u32,
    gid: u32,
    /// Permission bits; `None` keeps what is there (symlinks).
    mode: Option<u32>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    mtime: Option<Time>,
}

pub(super) struct Builder {
    /// Inodes written by this layer (or ancestors of what it wrote) are
    /// marked.
    pub tree: Tree,
    below: Below,
    opaque_xattr: &'static [u8],
    /// When the index is made: the time of directories it invents.
    now: Time,
    pub entries: u64,
    /// Whether the tree depends on lowers it was built without (a rebase
    /// then indexes the layer again, whole: no list of what depended on
    /// them is kept, so the index stays bounded).
    pub needs_lowers: bool,
    buf: Vec<u8>,
    /// The last directory resolved: entries come parent first.
    cache: Option<(RelPath, NodeId, RelPath, Vec<NodeId>)>,
    /// The directories last marked written (so, all marked).
    marked: Vec<NodeId>,
}

/// A directory a resolution made.
struct Created {
    node: NodeId,
    path: RelPath,
    over_whiteout: bool,
}

fn io_err(op: &str, display: &str, source: io::Error) -> ArchiveError {
    ArchiveError::Io {
        op: op.to_string(),
        path: display.to_string(),
        source,
    }
}

fn is_whiteout_node(i: &Inode) -> bool {
    i.file_type() == libc::S_IFCHR && i.major == 0 && i.minor == 0
}

/// Times as the applier sets them: outside what Go's time holds, the epoch.
fn bound(t: Time) -> Time {
    if t.sec < 0 || t.sec > i64::MAX / 1_000_000_000 {
        Time::default()
    } else {
        t
    }
}

impl Builder {
    /// A builder whose tree moves to `spill` once it outgrows memory.
    pub fn new(below: Below, userxattr: bool, spill: Spill) -> Result<Self, ArchiveError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| Time {
                sec: i64::try_from(d.as_secs()).unwrap_or(0),
                nsec: d.subsec_nanos(),
            })
            .unwrap_or_default();
        let root = fresh(now, libc::S_IFDIR | 0o755, 0, 0);
        Ok(Builder {
            tree: Tree::with_spill(root, spill)?,
            below,
            opaque_xattr: whiteout::opaque_xattr(userxattr),
            now,
            entries: 0,
            needs_lowers: false,
            buf: vec![0; super::BUF_SIZE],
            cache: None,
            marked: Vec::new(),
        })
    }

    fn add(&mut self, inode: Inode) -> Result<NodeId, ArchiveError> {
        Ok(self.tree.add(inode)?)
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Result<Option<NodeId>, ArchiveError> {
        Ok(self.tree.child(dir, name)?)
    }

    /// Entry `name` of `dir`, with what it is.
    fn look(&self, dir: NodeId, name: &[u8]) -> Result<Option<(NodeId, Is)>, ArchiveError> {
        let Some(c) = self.child(dir, name)? else {
            return Ok(None);
        };
        let i = self.tree.inode(c)?;
        let is = if i.is_dir() {
            Is::Dir
        } else if is_whiteout_node(&i) {
            Is::Whiteout
        } else if let Data::Symlink(t) = &i.data {
            Is::Symlink(t.clone())
        } else {
            Is::Other
        };
        Ok(Some((c, is)))
    }

    fn is_dir(&self, id: NodeId) -> Result<bool, ArchiveError> {
        Ok(self.tree.inode(id)?.is_dir())
    }

    /// Puts `node` at `dir/name`, dropping whatever was there.
    fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Result<(), ArchiveError> {
        if self.tree.link(dir, name, node)?.is_some() {
            // Paths through what was there may now resolve elsewhere.
            self.cache = None;
        }
        Ok(())
    }

    fn new_dir(&mut self) -> Result<NodeId, ArchiveError> {
        let d = self.fresh(libc::S_IFDIR | 0o755, 0, 0);
        self.add(d)
    }

    /// An inode made now, with nothing in it.
    fn fresh(&self, mode: u32, uid: u32, gid: u32) -> Inode {
        fresh(self.now, mode, uid, gid)
    }

    fn set_opaque(&mut self, node: NodeId) -> Result<(), ArchiveError> {
        let name = self.opaque_xattr;
        Ok(self.tree.update(node, |i| set_xattr(i, name, b"y"))?)
    }

    fn is_opaque(&self, node: NodeId) -> Result<bool, ArchiveError> {
        Ok(self
            .tree
            .inode(node)?
            .xattrs
            .iter()
            .any(|(n, v)| n == self.opaque_xattr && v == b"y"))
    }

    fn set_meta(&mut self, node: NodeId, m: Meta) -> Result<(), ArchiveError> {
        Ok(self.tree.update(node, |i| apply_meta(i, m))?)
    }

    /// Adds `inode` with metadata `m`.
    fn add_with(&mut self, mut inode: Inode, m: Meta) -> Result<NodeId, ArchiveError> {
        apply_meta(&mut inode, m);
        self.add(inode)
    }

    /// Resolves directory `path` inside the layer, following its symlinks
    /// (clamped at the root). With `create`, missing directories are made
    /// (and a whiteout on the way becomes a fresh directory); returns the
    /// directory, its real path and the directories on that path.
    fn resolve(
        &mut self,
        path: &[u8],
        create: bool,
        created: &mut Vec<Created>,
        display: &str,
    ) -> Result<Option<(NodeId, RelPath, Vec<NodeId>)>, ArchiveError> {
        if let Some((key, node, real, chain)) = &self.cache
            && key.as_slice() == path
        {
            return Ok(Some((*node, real.clone(), chain.clone())));
        }
        let mut cur = ROOT;
        let mut real: RelPath = Vec::new();
        let mut stack: Vec<(NodeId, usize)> = Vec::new();
        let mut queue: std::collections::VecDeque<Vec<u8>> =
            components(path).map(<[u8]>::to_vec).collect();
        let mut links = 0;
        while let Some(comp) = queue.pop_front() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if let Some((_, start)) = stack.pop() {
                        real.truncate(start.saturating_sub(1));
                        cur = stack.last().map_or(ROOT, |(n, _)| *n);
                    }
                    continue;
                }
                _ => {}
            }
            if real.len() + 1 + comp.len() > MAX_PATH {
                return Err(ArchiveError::Refused {
                    path: display.to_string(),
                    reason: format!(
                        "{} resolves to a path longer than {MAX_PATH} bytes",
                        show(path)
                    ),
                });
            }
            let here = safe::join(&real, &comp);
            let next = match self.look(cur, &comp)? {
                Some((c, Is::Dir)) => c,
                Some((_, Is::Symlink(target))) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(ArchiveError::Malformed {
                            path: display.to_string(),
                            reason: format!(
                                "too many levels of symbolic links resolving {}",
                                show(path)
                            ),
                        });
                    }
                    if target.starts_with(b"/") {
                        (cur, real) = (ROOT, Vec::new());
                        stack.clear();
                    }
                    for c in target.split(|&b| b == b'/').rev() {
                        queue.push_front(c.to_vec());
                    }
                    continue;
                }
                Some((_, Is::Whiteout)) if create => {
                    // The layer deleted this directory and now puts
                    // something below it: a fresh (opaque) directory.
                    let d = self.new_dir()?;
                    self.link(cur, &comp, d)?;
                    created.push(Created {
                        node: d,
                        path: here.clone(),
                        over_whiteout: true,
                    });
                    d
                }
                Some(_) if !create => return Ok(None),
                Some(_) => {
                    return Err(ArchiveError::NotADirectory {
                        path: display.to_string(),
                        component: show(&here),
                    });
                }
                None if create => {
                    let d = self.new_dir()?;
                    self.link(cur, &comp, d)?;
                    created.push(Created {
                        node: d,
                        path: here.clone(),
                        over_whiteout: false,
                    });
                    d
                }
                None => return Ok(None),
            };
            stack.push((next, real.len() + usize::from(!real.is_empty())));
            real = here;
            cur = next;
        }
        let chain: Vec<NodeId> = stack.iter().map(|(n, _)| *n).collect();
        self.cache = Some((path.to_vec(), cur, real.clone(), chain.clone()));
        Ok(Some((cur, real, chain)))
    }

    /// The directories on real path `real` (no symlinks on it).
    fn chain_of(&self, real: &[u8]) -> Result<Vec<NodeId>, ArchiveError> {
        let mut cur = ROOT;
        let mut out = Vec::new();
        for comp in components(real) {
            match self.child(cur, comp)? {
                Some(c) => {
                    out.push(c);
                    cur = c;
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Resolves (creating as needed) a directory the layer writes into,
    /// giving the directories it made their metadata.
    fn resolve_dir(
        &mut self,
        path: &[u8],
        display: &str,
    ) -> Result<(NodeId, RelPath, Vec<NodeId>), ArchiveError> {
        let mut created = Vec::new();
        let found = self.resolve(path, true, &mut created, display)?;
        let mut missing: Option<RelPath> = None;
        for c in created {
            let below_missing = missing
                .as_deref()
                .is_some_and(|m| split_last(&c.path).is_some_and(|(p, _)| p == m));
            let found_lower = self.init_created_dir(&c, below_missing, display)?;
            missing = (!found_lower).then_some(c.path);
        }
        found.ok_or_else(|| {
            io_err(
                "resolving parent directory",
                display,
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// Metadata for a directory the layer needs but does not list: a
    /// lower's, else 0755 root. Returns whether a lower had it.
    fn init_created_dir(
        &mut self,
        c: &Created,
        below_missing: bool,
        display: &str,
    ) -> Result<bool, ArchiveError> {
        let lower = if c.over_whiteout || below_missing {
            None
        } else {
            self.find_lower(&c.path, display)?
                .filter(|l| safe::is_dir(&l.stat))
        };
        let found = lower.is_some();
        match lower {
            Some(l) => {
                let meta = lower_meta(&l, display)?;
                self.set_meta(c.node, meta)?;
            }
            None if !c.over_whiteout && matches!(self.below, Below::Unknown) => {
                self.needs_lowers = true;
            }
            None => {}
        }
        if c.over_whiteout {
            self.set_opaque(c.node)?;
        }
        Ok(found)
    }

    /// What the lowers show at real path `path`, unless this layer hides
    /// them there (an opaque directory on the way).
    fn find_lower(&self, path: &[u8], display: &str) -> Result<Option<LowerObj>, ArchiveError> {
        let Below::Lowers(lowers) = &self.below else {
            return Ok(None);
        };
        if self.is_opaque(ROOT)? {
            return Ok(None);
        }
        for n in self.chain_of(split_last(path).map_or(&[][..], |(p, _)| p))? {
            if self.is_opaque(n)? {
                return Ok(None);
            }
        }
        lowers
            .find_below(path)
            .map(|found| found.map(|(_, obj)| obj))
            .map_err(|err| io_err("looking up lower directory", display, err))
    }

    fn mark_written(&mut self, chain: &[NodeId]) -> Result<(), ArchiveError> {
        for &n in chain {
            // Entries come in directory order: most of a chain was marked
            // by the entry before.
            if !self.marked.contains(&n) {
                self.tree.mark(n)?;
            }
        }
        self.marked.clear();
        self.marked.extend_from_slice(chain);
        Ok(())
    }

    /// Adds entry `e` (whose data starts at byte `data_at` of the tar).
    pub fn apply<R: BufRead>(
        &mut self,
        e: &Entry,
        data_at: u64,
        tar: &mut TarReader<R>,
        staging: &mut Staging,
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
        let (dir, real, mut chain) = self.resolve_dir(parent, &display)?;
        let here = safe::join(&real, base);
        safe::check_len(&here, &display)?;
        let meta = entry_meta(e);
        let node = match e.kind {
            Kind::Dir => {
                let node = match self.look(dir, base)? {
                    Some((c, Is::Dir)) => c,
                    existing => {
                        let d = self.new_dir()?;
                        self.link(dir, base, d)?;
                        if let Some((_, Is::Whiteout)) = existing {
                            // Recreated after this layer deleted it: lower
                            // content stays hidden.
                            self.set_opaque(d)?;
                        }
                        d
                    }
                };
                self.set_meta(node, meta)?;
                node
            }
            Kind::File => {
                let data = if let Some(map) = &e.sparse {
                    let mut stager = Stager::new(e.size);
                    for seg in map {
                        let mut pos = seg.offset;
                        let mut left = seg.len;
                        while left > 0 {
                            let want = self
                                .buf
                                .len()
                                .min(usize::try_from(left).unwrap_or(usize::MAX));
                            let n = tar.read_data(&mut self.buf[..want])?;
                            stager.write(staging, pos, &self.buf[..n], &display)?;
                            pos += n as u64;
                            left -= n as u64;
                        }
                    }
                    stager.finish()
                } else if e.size == 0 {
                    Data::None
                } else {
                    Data::Tar { offset: data_at }
                };
                self.new_node(libc::S_IFREG, e, data, meta)?
            }
            Kind::Symlink => {
                let mut i = self.blank(libc::S_IFLNK | 0o777, e);
                i.data = Data::Symlink(e.link.clone());
                self.add_with(i, meta)?
            }
            Kind::Char => self.new_node(libc::S_IFCHR, e, Data::None, meta)?,
            Kind::Block => self.new_node(libc::S_IFBLK, e, Data::None, meta)?,
            Kind::Fifo => self.new_node(libc::S_IFIFO, e, Data::None, meta)?,
            Kind::Hardlink => return self.hardlink(dir, base, chain, e, staging, &display),
        };
        if e.kind != Kind::Dir {
            self.link(dir, base, node)?;
        }
        chain.push(node);
        self.mark_written(&chain)
    }

    fn blank(&self, mode: u32, e: &Entry) -> Inode {
        Inode {
            major: e.major,
            minor: e.minor,
            ..self.fresh(mode, e.uid, e.gid)
        }
    }

    fn new_node(
        &mut self,
        ty: u32,
        e: &Entry,
        data: Data,
        m: Meta,
    ) -> Result<NodeId, ArchiveError> {
        let mut i = self.blank(ty, e);
        if ty == libc::S_IFREG {
            i.size = e.size;
        }
        if ty != libc::S_IFCHR && ty != libc::S_IFBLK {
            (i.major, i.minor) = (0, 0);
        }
        i.data = data;
        self.add_with(i, m)
    }

    fn opaque(&mut self, parent: &[u8], display: &str) -> Result<(), ArchiveError> {
        let (dir, _, mut chain) = self.resolve_dir(parent, display)?;
        chain.push(dir);
        self.mark_written(&chain)?;
        self.set_opaque(dir)
    }

    fn remove(
        &mut self,
        parent: &[u8],
        name: &[u8],
        e: &Entry,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let (dir, _, _) = self.resolve_dir(parent, display)?;
        if let Some(c) = self.child(dir, name)?
            && self.tree.marked(c)?
        {
            // Written by this layer: hide only the lower directory's content.
            if self.is_dir(c)? {
                self.set_opaque(c)?;
            }
            return Ok(());
        }
        let w = self.fresh(libc::S_IFCHR, e.uid, e.gid);
        let w = self.add(w)?;
        self.link(dir, name, w)
    }

    fn hardlink(
        &mut self,
        dir: NodeId,
        base: &[u8],
        mut chain: Vec<NodeId>,
        e: &Entry,
        staging: &mut Staging,
        display: &str,
    ) -> Result<(), ArchiveError> {
        let link_err = |reason: &str| ArchiveError::Hardlink {
            path: display.to_string(),
            target: String::from_utf8_lossy(&e.link).into_owned(),
            reason: reason.to_string(),
        };
        let target = safe::clean(&e.link).map_err(|_| link_err("target climbs above the root"))?;
        if target.len() > MAX_PATH {
            return Err(link_err(
                "target path is longer than a path inside an image may be",
            ));
        }
        let Some((tparent, tname)) = split_last(&target) else {
            return Err(link_err("target is the root directory"));
        };
        let tdir = self
            .resolve(tparent, false, &mut Vec::new(), display)?
            .map(|(d, _, _)| d);
        let in_layer = match tdir {
            Some(d) => match self.look(d, tname)? {
                Some((_, Is::Whiteout)) | None => None,
                Some((c, _)) => Some((d, c)),
            },
            None => None,
        };
        let (tdir, node) = match in_layer {
            Some(found) => found,
            None => match self.merged_lookup(&target, display)? {
                Merged::Hidden => return Err(link_err("target does not exist")),
                Merged::Layer(d, c) => (d, c),
                Merged::Unknown => {
                    // Linked once the lowers are known (see `needs_lowers`).
                    self.needs_lowers = true;
                    return Ok(());
                }
                Merged::Lower(lower) => {
                    if safe::is_dir(&lower.stat) {
                        return Err(link_err("target is a directory"));
                    }
                    let (td, _, mut tchain) = self.resolve_dir(tparent, display)?;
                    let copied = self.copy_up(&lower, staging, display)?;
                    self.link(td, tname, copied)?;
                    tchain.push(copied);
                    self.mark_written(&tchain)?;
                    (td, copied)
                }
            },
        };
        let ty = self.tree.inode(node)?.file_type();
        if ty == libc::S_IFDIR {
            return Err(link_err("target is a directory"));
        }
        if tdir == dir && tname == base {
            // A link to itself: the entry is already there.
            return Ok(());
        }
        self.link(dir, base, node)?;
        // The link header's metadata goes on the shared inode.
        let mut meta = entry_meta(e);
        if ty == libc::S_IFLNK {
            meta.mode = None;
        }
        self.set_meta(node, meta)?;
        chain.push(node);
        self.mark_written(&chain)
    }

    /// A hardlink target through the merged view, by its path as written
    /// (no symlinks followed): this layer first, where a whiteout, a
    /// non-directory or an opaque directory on the way ends the search.
    fn merged_lookup(&self, target: &[u8], display: &str) -> Result<Merged, ArchiveError> {
        let comps: Vec<&[u8]> = components(target).collect();
        let Some((last, dirs)) = comps.split_last() else {
            return Ok(Merged::Hidden);
        };
        let mut cur = ROOT;
        let mut opaque = self.is_opaque(ROOT)?;
        let mut whole = true;
        for comp in dirs {
            match self.look(cur, comp)? {
                Some((c, Is::Dir)) => {
                    opaque |= self.is_opaque(c)?;
                    cur = c;
                }
                Some(_) => return Ok(Merged::Hidden),
                None if opaque => return Ok(Merged::Hidden),
                None => {
                    whole = false;
                    break;
                }
            }
        }
        if whole {
            match self.look(cur, last)? {
                Some((_, Is::Whiteout)) => return Ok(Merged::Hidden),
                Some((c, _)) => return Ok(Merged::Layer(cur, c)),
                None if opaque => return Ok(Merged::Hidden),
                None => {}
            }
        }
        match &self.below {
            Below::Nothing => Ok(Merged::Hidden),
            Below::Unknown => Ok(Merged::Unknown),
            Below::Lowers(lowers) => match lowers
                .find_below(target)
                .map_err(|err| io_err("looking up hardlink target", display, err))?
            {
                Some((_, obj)) => Ok(Merged::Lower(obj)),
                None => Ok(Merged::Hidden),
            },
        }
    }

    /// A copy of a lower's file, symlink or node, with its metadata.
    fn copy_up(
        &mut self,
        lower: &LowerObj,
        staging: &mut Staging,
        display: &str,
    ) -> Result<NodeId, ArchiveError> {
        let copy_err =
            |err: io::Error| io_err("copying hardlink target up from a lower", display, err);
        let st = &lower.stat;
        let ty = st.st_mode & libc::S_IFMT;
        let mut i = self.fresh(st.st_mode, st.st_uid, st.st_gid);
        if ty == libc::S_IFREG {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            i.size = size;
            let src = openat(
                lower.parent.as_fd(),
                lower.name.as_slice(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|err| copy_err(err.into()))?;
            let src = File::from(src);
            let mut stager = Stager::new(size);
            whiteout::each_data_extent(&src, size, &mut self.buf, copy_err, |off, data| {
                stager.write(staging, off, data, display)
            })?;
            i.data = stager.finish();
        } else if ty == libc::S_IFLNK {
            let target = readlinkat(lower.parent.as_fd(), lower.name.as_slice())
                .map_err(|err| copy_err(err.into()))?;
            use std::os::unix::ffi::OsStrExt;
            i.data = Data::Symlink(target.as_os_str().as_bytes().to_vec());
        } else if ty == libc::S_IFCHR || ty == libc::S_IFBLK {
            let rdev = st.st_rdev;
            (i.major, i.minor) = (libc::major(rdev), libc::minor(rdev));
        }
        let mut meta = lower_meta(lower, display)?;
        if ty == libc::S_IFLNK {
            meta.mode = None;
        }
        self.add_with(i, meta)
    }
}

/// What an entry of the layer is, as a path walk sees it.
enum Is {
    Dir,
    Symlink(Vec<u8>),
    Whiteout,
    Other,
}

fn set_xattr(i: &mut Inode, name: &[u8], value: &[u8]) {
    match i.xattrs.iter_mut().find(|(n, _)| n == name) {
        Some(x) => x.1 = value.to_vec(),
        None => i.xattrs.push((name.to_vec(), value.to_vec())),
    }
}

/// Sets owner, mode, xattrs and mtime as the applier does.
fn apply_meta(i: &mut Inode, m: Meta) {
    for (k, v) in &m.xattrs {
        // Overlay's own attributes would change how the lower is read;
        // only whiteouts set them.
        if whiteout::is_overlay_xattr(k) {
            continue;
        }
        set_xattr(i, k, v);
    }
    i.uid = m.uid;
    i.gid = m.gid;
    if let Some(mode) = m.mode {
        i.mode = (i.mode & libc::S_IFMT) | (mode & 0o7777);
    }
    if let Some(t) = m.mtime {
        i.mtime = t.sec;
        i.mtime_nsec = t.nsec;
    }
}

enum Merged {
    /// Nowhere, or hidden by this layer.
    Hidden,
    /// In this layer: (directory, entry).
    Layer(NodeId, NodeId),
    Lower(LowerObj),
    /// The lowers are not known yet.
    Unknown,
}

fn entry_meta(e: &Entry) -> Meta {
    Meta {
        uid: e.uid,
        gid: e.gid,
        mode: Some(e.mode),
        xattrs: e.xattrs.clone(),
        mtime: Some(bound(e.mtime)),
    }
}

/// A lower object's owner, mode, xattrs (without overlay's) and mtime.
fn lower_meta(l: &LowerObj, display: &str) -> Result<Meta, ArchiveError> {
    let (xattrs, (_, mtime)) = whiteout::lower_meta(l, display)?;
    Ok(Meta {
        uid: l.stat.st_uid,
        gid: l.stat.st_gid,
        mode: Some(l.stat.st_mode & 0o7777),
        xattrs,
        mtime: Some(mtime),
    })
}

/// An inode made at `now`, with nothing in it.
fn fresh(now: Time, mode: u32, uid: u32, gid: u32) -> Inode {
    Inode {
        uid,
        gid,
        mtime: now.sec,
        mtime_nsec: now.nsec,
        ..Inode::empty(mode)
    }
}
