//! Lays a layer's [`Tree`] out as an EROFS metadata image and writes it.
//!
//! The image, in 512-byte blocks:
//!
//! ```text
//! 0      1024        1152          1280
//! | zero | superblock | device slot | inodes (root first) ... | dir and
//! symlink blocks ... | staged file data ... |
//! ```
//!
//! Every inode is extended (64 bytes), 32-byte aligned, nid = offset / 32
//! (`meta_blkaddr` is 0), placed breadth-first from the root so siblings
//! sit together. Regular files are chunk-indexed: tar data on device 1
//! (the layer's tar, given at mount time), staged data on device 0 (this
//! image, after the metadata). Directories and symlinks keep whole blocks
//! after the inodes and their tail inline after the inode when it fits in
//! the inode's block.
//!
//! Layout is computed first (positions depend only on sizes), then the
//! image is written in one sequential pass.

use super::format::{
    self, BLOCK_SIZE, CHUNK_BLKBITS_MAX, CHUNK_INDEX_SIZE, DEVICE_SLOT_SIZE, DataLayout,
    DeviceSlot, EXTENDED_INODE_SIZE, ExtendedInode, INODE_SLOT, INODE_SLOT_BITS, NAME_LEN_MAX,
    NULL_ADDR, SUPER_OFFSET, SUPER_SIZE, SuperBlock,
};
use super::tree::{Data, Entry, Error as TreeError, Inode, NodeId, Placed, ROOT, Tree};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};

/// What [`write_image`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Length of the image file (a multiple of 512).
    pub image_bytes: u64,
    /// Inodes written (those reachable from the root).
    pub inodes: u64,
    /// Where the staging file's bytes start in the image: the length of
    /// the metadata (superblock, inodes, directory and symlink blocks).
    pub staged_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The tree is fine but EROFS (or the kernel reading it) has no way to
    /// say it.
    #[error("EROFS cannot represent {what}")]
    Unrepresentable { what: String },
    /// The tree contradicts itself (a bug of whoever built it).
    #[error("inconsistent layer tree: {what}")]
    Invalid { what: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        Error::Io {
            context: "writing the EROFS image".into(),
            source,
        }
    }
}

fn unrepresentable(what: impl Into<String>) -> Error {
    Error::Unrepresentable { what: what.into() }
}

fn invalid(what: impl Into<String>) -> Error {
    Error::Invalid { what: what.into() }
}

/// Where the inodes start: right after the superblock and the one device
/// slot.
const INODE_AREA: u64 = SUPER_OFFSET + SUPER_SIZE as u64 + DEVICE_SLOT_SIZE as u64;
/// The device table's offset in slots.
const DEVT_SLOTOFF: u16 = ((SUPER_OFFSET + SUPER_SIZE as u64) / DEVICE_SLOT_SIZE as u64) as u16;
/// Device ids of chunk indexes.
const DEVICE_IMAGE: u16 = 0;
const DEVICE_TAR: u16 = 1;
/// Longest symlink target Linux resolves (PATH_MAX less the NUL).
const SYMLINK_MAX: usize = 4095;
const BLOCK: usize = BLOCK_SIZE as usize;

/// Writes the metadata image of `tree` to `out` (from its start, truncating
/// it). `tar_len` is the length of the layer's tar, the image's device 1;
/// `staging` holds the bytes of [`Data::Staged`] files and is appended
/// after the metadata. Nothing is synced.
pub fn write_image(
    tree: &mut Tree,
    tar_len: u64,
    staging: Option<&mut File>,
    out: &mut File,
) -> Result<Layout, Error> {
    let staging_len = match &staging {
        Some(f) => f
            .metadata()
            .map_err(|source| Error::Io {
                context: "reading the staging file's length".into(),
                source,
            })?
            .len(),
        None => 0,
    };
    let tar_blocks = u32::try_from(tar_len.div_ceil(BLOCK_SIZE))
        .map_err(|_| unrepresentable(format!("a tar of {tar_len} bytes (over 2 TiB)")))?;
    let plan = plan(tree, tar_len, staging.is_some(), staging_len)?;
    let uuid = random_uuid()?;

    // The root is placed first, at most a block past the device slot.
    let root_nid = u16::try_from(nid(&placement(tree, ROOT)?))
        .map_err(|_| invalid("the root inode is placed too far"))?;
    let sb = SuperBlock {
        root_nid,
        inos: u64::from(plan.count),
        epoch: plan.epoch,
        blocks: plan.total_blocks,
        meta_blkaddr: 0,
        uuid,
        feature_incompat: format::FEATURE_INCOMPAT_CHUNKED_FILE
            | format::FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices: 1,
        devt_slotoff: DEVT_SLOTOFF,
    };
    let slot = DeviceSlot {
        tag: [0; 64],
        blocks: tar_blocks,
        mapped_blkaddr: 0,
    };

    out.seek(SeekFrom::Start(0))
        .and_then(|_| out.set_len(0))
        .map_err(|source| Error::Io {
            context: "truncating the image".into(),
            source,
        })?;
    let mut w = Out {
        w: BufWriter::with_capacity(1 << 16, out),
        pos: 0,
    };
    let write_err = |source| Error::Io {
        context: "writing the EROFS image".into(),
        source,
    };
    w.pad_to(SUPER_OFFSET).map_err(write_err)?;
    w.put(&sb.encode()).map_err(write_err)?;
    w.put(&slot.encode()).map_err(write_err)?;
    plan.write_inodes(tree, &mut w)?;
    plan.write_blocks(tree, &mut w)?;
    let staged_offset = u64::from(plan.staged_blk) * BLOCK_SIZE;
    w.pad_to(staged_offset).map_err(write_err)?;
    if let Some(staging) = staging {
        w.w.flush().map_err(write_err)?;
        staging
            .seek(SeekFrom::Start(0))
            .map_err(|source| Error::Io {
                context: "rewinding the staging file".into(),
                source,
            })?;
        // Straight file to file (copy_file_range where the kernel can).
        let copied =
            io::copy(&mut staging.take(staging_len), &mut **w.w.get_mut()).map_err(|source| {
                Error::Io {
                    context: "appending the staging file to the image".into(),
                    source,
                }
            })?;
        if copied != staging_len {
            return Err(Error::Io {
                context: "appending the staging file to the image".into(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{copied} of {staging_len} bytes"),
                ),
            });
        }
        w.pos += copied;
    }
    let image_bytes = u64::from(plan.total_blocks) * BLOCK_SIZE;
    w.pad_to(image_bytes).map_err(write_err)?;
    w.w.flush().map_err(write_err)?;
    Ok(Layout {
        image_bytes,
        inodes: u64::from(plan.count),
        staged_offset,
    })
}

/// A sequential writer that knows its offset.
struct Out<'f> {
    w: BufWriter<&'f mut File>,
    pos: u64,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, pos: u64) -> io::Result<()> {
        const ZEROS: [u8; BLOCK] = [0; BLOCK];
        debug_assert!(pos >= self.pos, "writing backwards: {} < {}", pos, self.pos);
        while self.pos < pos {
            let n = (pos - self.pos).min(BLOCK as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }
}

/// How one inode's data is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing after the inode: devices (`i_u` = rdev), FIFOs, sockets,
    /// empty files.
    Bare { i_u: u32 },
    /// Directory or symlink bytes: whole blocks in the data area, then
    /// the tail inline after the inode when `inline`, else in one more
    /// (zero-padded) block.
    Flat { size: u64, inline: bool },
    /// `count` chunk indexes of `BLOCK_SIZE << blkbits` bytes each.
    Chunked { size: u64, blkbits: u8, count: u64 },
}

impl Kind {
    /// Blocks in the data area.
    fn data_blocks(&self) -> u64 {
        match *self {
            Kind::Flat { size, inline } if inline => size / BLOCK_SIZE,
            Kind::Flat { size, .. } => size.div_ceil(BLOCK_SIZE),
            _ => 0,
        }
    }

    /// Bytes written inline after the inode and its xattrs.
    fn inline_bytes(&self) -> u64 {
        match *self {
            Kind::Flat { size, inline } if inline => size % BLOCK_SIZE,
            _ => 0,
        }
    }
}

/// Entries read from a directory at a time.
const BATCH: usize = 1024;

/// The image's figures, once every inode reachable from the root has its
/// place (recorded in the tree).
struct Plan {
    /// Inodes placed.
    count: u32,
    /// The first block after the inodes: directory and symlink blocks.
    data_blk: u64,
    staged_blk: u32,
    total_blocks: u32,
    epoch: u64,
    tar_len: u64,
    has_staging: bool,
    staging_blocks: u64,
}

/// Orders, checks and places every inode reachable from the root.
fn plan(tree: &mut Tree, tar_len: u64, has_staging: bool, staging_len: u64) -> Result<Plan, Error> {
    if !tree.inode(ROOT)?.is_dir() {
        return Err(invalid("the root is not a directory"));
    }
    let mut p = Plan {
        count: 0,
        data_blk: 0,
        staged_blk: 0,
        total_blocks: 0,
        epoch: 0,
        tar_len,
        has_staging,
        staging_blocks: staging_len.div_ceil(BLOCK_SIZE),
    };
    p.count = order(tree)?;

    let mut pos = INODE_AREA;
    let mut data_blocks = 0u64;
    let mut nodes = InOrder::default();
    while let Some((id, mut placed, inode)) = nodes.next(tree, p.count)? {
        if inode.is_dir() {
            placed.size = dir_size(tree, id).map_err(|e| at(tree, id, e))?;
        }
        let (kind, xattr_size) = p.kind(&inode, &placed).map_err(|e| at(tree, id, e))?;
        let head = EXTENDED_INODE_SIZE as u64 + xattr_size as u64;
        let (at, len) = match kind {
            Kind::Flat { size, inline } => {
                let tail = size % BLOCK_SIZE;
                let at = if inline && pos % BLOCK_SIZE + head + tail > BLOCK_SIZE {
                    pos.next_multiple_of(BLOCK_SIZE)
                } else {
                    keep_inode_in_block(pos)
                };
                (at, head + kind.inline_bytes())
            }
            Kind::Chunked { count, .. } => {
                // The kernel finds the indexes at the next 8-byte boundary.
                let len = head.next_multiple_of(CHUNK_INDEX_SIZE as u64)
                    + count * CHUNK_INDEX_SIZE as u64;
                (keep_inode_in_block(pos), len)
            }
            Kind::Bare { .. } => (keep_inode_in_block(pos), head),
        };
        placed.pos = at;
        tree.place(id, placed)?;
        pos = (at + len).next_multiple_of(INODE_SLOT);
        data_blocks += kind.data_blocks();
        if inode.mtime > 0 {
            p.epoch = p.epoch.max(inode.mtime as u64);
        }
    }

    // Whole blocks of directories and symlinks follow the inodes, in inode
    // order; then the staged data.
    let too_big = || unrepresentable("an image over 2 TiB");
    p.data_blk = pos.div_ceil(BLOCK_SIZE);
    let staged_blk = p.data_blk + data_blocks;
    p.staged_blk = u32::try_from(staged_blk).map_err(|_| too_big())?;
    let total = staged_blk + p.staging_blocks;
    // Staged chunk addresses are staged_blk + their block in the staging
    // file, all below `total`; NULL_ADDR must stay free.
    p.total_blocks = u32::try_from(total)
        .ok()
        .filter(|&t| t < NULL_ADDR)
        .ok_or_else(too_big)?;
    Ok(p)
}

/// The 64-byte inode itself never straddles two blocks.
fn keep_inode_in_block(pos: u64) -> u64 {
    if pos % BLOCK_SIZE + EXTENDED_INODE_SIZE as u64 > BLOCK_SIZE {
        pos.next_multiple_of(BLOCK_SIZE)
    } else {
        pos
    }
}

/// Breadth-first from the root: gives each reachable inode its `seq` and
/// link count. Returns how many were placed.
fn order(tree: &mut Tree) -> Result<u32, Error> {
    tree.clear_placements()?;
    let root = Placed {
        seq: 0,
        parent: ROOT,
        nlink: 2,
        ..Placed::default()
    };
    tree.place(ROOT, root)?;
    let mut next: u32 = 1;
    // Directories are listed in the order they were placed: breadth-first.
    let mut nodes = InOrder::default();
    while let Some((dir, mut me, inode)) = nodes.next(tree, next)? {
        if inode.is_dir() {
            me.nlink = place_entries(tree, dir, &mut next)?;
            tree.place(dir, me)?;
        }
    }
    Ok(next)
}

/// Places the entries of directory `dir` not placed yet, from the
/// `next`th on, and counts another link for those that are. Returns the
/// directory's own link count.
fn place_entries(tree: &mut Tree, dir: NodeId, next: &mut u32) -> Result<u32, Error> {
    let mut nlink: u32 = 2;
    // Placements made since the current batch was read (a hardlink named
    // twice in it): the batch says nothing of them.
    let mut fresh: HashMap<NodeId, Placed> = HashMap::new();
    let mut entries = Entries::of(dir);
    while let Some((e, new_batch)) = entries.next(tree)? {
        if new_batch {
            fresh.clear();
        }
        check_name(&e.name).map_err(|err| at_entry(tree, dir, &e.name, err))?;
        let is_dir = e.mode & libc::S_IFMT == libc::S_IFDIR;
        let placed = match fresh.get(&e.id).copied().or(e.placed) {
            None => {
                let placed = Placed {
                    seq: *next,
                    parent: dir,
                    nlink: if is_dir { 2 } else { 1 },
                    pos: 0,
                    size: 0,
                };
                *next = next
                    .checked_add(1)
                    .filter(|&n| n < u32::MAX)
                    .ok_or_else(|| unrepresentable("over 2^32 inodes"))?;
                if is_dir {
                    nlink = nlink
                        .checked_add(1)
                        .ok_or_else(|| unrepresentable("over 2^32 subdirectories"))?;
                }
                placed
            }
            Some(_) if is_dir => {
                let err = invalid("a directory named twice (or the root named)");
                return Err(at_entry(tree, dir, &e.name, err));
            }
            Some(mut p) => {
                p.nlink = p
                    .nlink
                    .checked_add(1)
                    .ok_or_else(|| unrepresentable("over 2^32 hardlinks"))?;
                p
            }
        };
        tree.place(e.id, placed)?;
        fresh.insert(e.id, placed);
    }
    Ok(nlink)
}

/// A directory's entries in byte order of their names, read from the
/// tree in batches.
struct Entries {
    dir: NodeId,
    /// The last name read from the tree, once a batch was.
    after: Option<Vec<u8>>,
    batch: std::vec::IntoIter<Entry>,
}

impl Entries {
    fn of(dir: NodeId) -> Self {
        Entries {
            dir,
            after: None,
            batch: Vec::new().into_iter(),
        }
    }

    /// The next entry, and whether it is the first of a batch just read.
    fn next(&mut self, tree: &Tree) -> Result<Option<(Entry, bool)>, Error> {
        if let Some(e) = self.batch.next() {
            return Ok(Some((e, false)));
        }
        let batch = tree.entries(self.dir, self.after.as_deref(), BATCH)?;
        let Some(last) = batch.last() else {
            return Ok(None);
        };
        self.after = Some(last.name.clone());
        self.batch = batch.into_iter();
        Ok(self.batch.next().map(|e| (e, true)))
    }
}

/// The placed inodes in image order, read from the tree in batches.
#[derive(Default)]
struct InOrder {
    read: u32,
    batch: std::vec::IntoIter<(NodeId, Placed, Inode)>,
}

impl InOrder {
    /// The next placed inode, while fewer than `count` were given.
    fn next(&mut self, tree: &Tree, count: u32) -> Result<Option<(NodeId, Placed, Inode)>, Error> {
        if let Some(node) = self.batch.next() {
            return Ok(Some(node));
        }
        if self.read >= count {
            return Ok(None);
        }
        let batch = tree.in_order(self.read, BATCH)?;
        if batch.is_empty() {
            return Err(invalid(format!("nothing placed {}th", self.read)));
        }
        self.read += batch.len() as u32;
        self.batch = batch.into_iter();
        Ok(self.batch.next())
    }
}

fn placement(tree: &Tree, id: NodeId) -> Result<Placed, Error> {
    tree.placed(id)?
        .ok_or_else(|| invalid(format!("inode {id} is named but not placed")))
}

fn nid(p: &Placed) -> u64 {
    p.pos >> INODE_SLOT_BITS
}

impl Plan {
    /// Checks an inode's type and data and says how to lay it out, with
    /// the size of its xattrs (a directory's size is in its placement).
    fn kind(&self, inode: &Inode, placed: &Placed) -> Result<(Kind, usize), Error> {
        let xattr_size = xattr_body_size(inode)?;
        let kind = self.data_kind(inode, placed)?;
        // Inline only when inode, xattrs and tail share one block: the
        // kernel reads the tail relative to the inode's block.
        let kind = match kind {
            Kind::Flat { size, .. } => {
                let tail = size % BLOCK_SIZE;
                let head = EXTENDED_INODE_SIZE as u64 + xattr_size as u64;
                Kind::Flat {
                    size,
                    inline: tail > 0 && head + tail <= BLOCK_SIZE,
                }
            }
            k => k,
        };
        Ok((kind, xattr_size))
    }

    fn data_kind(&self, inode: &Inode, placed: &Placed) -> Result<Kind, Error> {
        if inode.mode > 0xffff {
            return Err(unrepresentable(format!("mode {:#o}", inode.mode)));
        }
        if inode.mtime_nsec >= 1_000_000_000 {
            return Err(invalid(format!("mtime nanoseconds {}", inode.mtime_nsec)));
        }
        let ft = inode.file_type();
        let wrong_data = || invalid(format!("data {:?} for mode {:#o}", inode.data, inode.mode));
        match (ft, &inode.data) {
            (libc::S_IFDIR, Data::None) => Ok(Kind::Flat {
                size: placed.size,
                inline: false,
            }),
            (libc::S_IFLNK, Data::Symlink(target)) => {
                if target.is_empty() || target.len() > SYMLINK_MAX || target.contains(&0) {
                    return Err(unrepresentable(format!(
                        "a symlink target of {} bytes (empty, over {SYMLINK_MAX} or with NUL)",
                        target.len()
                    )));
                }
                Ok(Kind::Flat {
                    size: target.len() as u64,
                    inline: false,
                })
            }
            (libc::S_IFCHR | libc::S_IFBLK, Data::None) => {
                let rdev = format::encode_rdev(inode.major, inode.minor).ok_or_else(|| {
                    unrepresentable(format!("device {}:{}", inode.major, inode.minor))
                })?;
                Ok(Kind::Bare { i_u: rdev })
            }
            (libc::S_IFIFO | libc::S_IFSOCK, Data::None) => Ok(Kind::Bare { i_u: 0 }),
            (libc::S_IFREG, Data::None) if inode.size == 0 => Ok(Kind::Bare { i_u: 0 }),
            (libc::S_IFREG, Data::Tar { .. } | Data::Staged { .. }) if inode.size == 0 => {
                Ok(Kind::Bare { i_u: 0 })
            }
            (libc::S_IFREG, Data::Tar { offset }) => {
                let end = offset.checked_add(inode.size);
                if offset % BLOCK_SIZE != 0 || end.is_none_or(|end| end > self.tar_len) {
                    return Err(invalid(format!(
                        "{} bytes at tar offset {offset} (tar of {} bytes)",
                        inode.size, self.tar_len
                    )));
                }
                // One chunk for the whole file unless it outgrows the
                // largest chunk (1 TiB).
                let need = inode.size.div_ceil(BLOCK_SIZE).next_power_of_two();
                let blkbits = (need.trailing_zeros() as u8).min(CHUNK_BLKBITS_MAX);
                let count = inode.size.div_ceil(BLOCK_SIZE << blkbits);
                Ok(Kind::Chunked {
                    size: inode.size,
                    blkbits,
                    count,
                })
            }
            (libc::S_IFREG, Data::Staged { chunkbits, chunks }) => {
                if *chunkbits > CHUNK_BLKBITS_MAX {
                    return Err(unrepresentable(format!(
                        "chunks of 512 << {chunkbits} bytes"
                    )));
                }
                let chunk = BLOCK_SIZE << chunkbits;
                let count = inode.size.div_ceil(chunk);
                if chunks.len() as u64 != count {
                    return Err(invalid(format!(
                        "{} chunks for {} bytes in chunks of {chunk}",
                        chunks.len(),
                        inode.size
                    )));
                }
                for (n, addr) in chunks.iter().enumerate() {
                    let Some(addr) = addr else { continue };
                    let len = (inode.size - n as u64 * chunk).min(chunk);
                    let end = addr.checked_add(len.div_ceil(BLOCK_SIZE));
                    if !self.has_staging || end.is_none_or(|end| end > self.staging_blocks) {
                        return Err(invalid(format!(
                            "chunk {n} at staging block {addr} beyond the staging file"
                        )));
                    }
                }
                Ok(Kind::Chunked {
                    size: inode.size,
                    blkbits: *chunkbits,
                    count,
                })
            }
            (
                libc::S_IFREG
                | libc::S_IFDIR
                | libc::S_IFLNK
                | libc::S_IFCHR
                | libc::S_IFBLK
                | libc::S_IFIFO
                | libc::S_IFSOCK,
                _,
            ) => Err(wrong_data()),
            _ => Err(unrepresentable(format!(
                "file type of mode {:#o}",
                inode.mode
            ))),
        }
    }

    /// The inode area: every inode, its xattrs, then its chunk indexes or
    /// inline tail.
    fn write_inodes(&self, tree: &Tree, w: &mut Out<'_>) -> Result<(), Error> {
        let mut blk = self.data_blk;
        let mut nodes = InOrder::default();
        while let Some((id, placed, inode)) = nodes.next(tree, self.count)? {
            blk = self.write_inode(tree, id, &placed, &inode, blk, w)?;
        }
        Ok(())
    }

    /// Inode `id`, its xattrs, then its chunk indexes or inline tail;
    /// `blk` is where its blocks go in the data area, if it has any.
    /// Returns where the next inode's go.
    fn write_inode(
        &self,
        tree: &Tree,
        id: NodeId,
        placed: &Placed,
        inode: &Inode,
        mut blk: u64,
        w: &mut Out<'_>,
    ) -> Result<u64, Error> {
        let (kind, xattr_size) = self.kind(inode, placed).map_err(|e| at(tree, id, e))?;
        let (layout, i_u, size) = match kind {
            Kind::Bare { i_u } => (DataLayout::FlatPlain, i_u, 0),
            Kind::Flat { size, inline } => {
                let layout = if inline {
                    DataLayout::FlatInline
                } else {
                    DataLayout::FlatPlain
                };
                // Blocks go to the data area in inode order.
                let blocks = kind.data_blocks();
                let startblk = if blocks > 0 { blk } else { 0 };
                blk += blocks;
                // In range: plan() checked the image fits 32 bits.
                (layout, startblk as u32, size)
            }
            Kind::Chunked { size, blkbits, .. } => {
                (DataLayout::ChunkBased, format::chunk_format(blkbits), size)
            }
        };
        let xattr_icount = format::xattr_icount(xattr_size).unwrap_or(0);
        let core = ExtendedInode {
            layout,
            xattr_icount,
            mode: inode.mode as u16,
            size,
            i_u,
            ino: placed.seq + 1,
            uid: inode.uid,
            gid: inode.gid,
            mtime: inode.mtime,
            mtime_nsec: inode.mtime_nsec,
            nlink: placed.nlink,
        };
        w.pad_to(placed.pos)?;
        w.put(&core.encode())?;
        write_xattrs(inode, w)?;
        match kind {
            Kind::Chunked { blkbits, count, .. } => {
                w.pad_to(w.pos.next_multiple_of(CHUNK_INDEX_SIZE as u64))?;
                self.write_chunk_indexes(inode, blkbits, count, w)?;
            }
            Kind::Flat { size, inline } if inline => {
                let tail = (size % BLOCK_SIZE) as usize;
                match &inode.data {
                    Data::Symlink(target) => w.put(&target[target.len() - tail..])?,
                    _ => {
                        let mut last = Vec::new();
                        dir_blocks(tree, id, placed, true, |b| {
                            last.clear();
                            last.extend_from_slice(b);
                            Ok(())
                        })?;
                        if last.len() != tail {
                            let e = invalid(format!(
                                "a directory tail of {} bytes, {tail} planned",
                                last.len()
                            ));
                            return Err(at(tree, id, e));
                        }
                        w.put(&last)?;
                    }
                }
            }
            _ => {}
        }
        Ok(blk)
    }

    fn write_chunk_indexes(
        &self,
        inode: &Inode,
        blkbits: u8,
        count: u64,
        w: &mut Out<'_>,
    ) -> io::Result<()> {
        match &inode.data {
            Data::Tar { offset } => {
                let first = offset / BLOCK_SIZE;
                for c in 0..count {
                    // In range: plan() checked the file ends inside the
                    // tar, whose blocks fit 32 bits.
                    let blk = (first + (c << blkbits)) as u32;
                    w.put(&format::chunk_index(DEVICE_TAR, blk))?;
                }
            }
            Data::Staged { chunks, .. } => {
                for addr in chunks {
                    let blk = match addr {
                        // In range: plan() checked it ends inside the
                        // staging file, and the whole image fits 32 bits.
                        Some(a) => self.staged_blk + *a as u32,
                        None => NULL_ADDR,
                    };
                    w.put(&format::chunk_index(DEVICE_IMAGE, blk))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The data area: whole blocks of directories and symlinks.
    fn write_blocks(&self, tree: &Tree, w: &mut Out<'_>) -> Result<(), Error> {
        let mut blk = self.data_blk;
        let mut nodes = InOrder::default();
        while let Some((id, placed, inode)) = nodes.next(tree, self.count)? {
            let (kind, _) = self.kind(&inode, &placed).map_err(|e| at(tree, id, e))?;
            let blocks = kind.data_blocks();
            if blocks == 0 {
                continue;
            }
            let start = blk * BLOCK_SIZE;
            blk += blocks;
            w.pad_to(start)?;
            match &inode.data {
                Data::Symlink(target) => {
                    let len = target.len().min(blocks as usize * BLOCK);
                    w.put(&target[..len])?;
                }
                _ => {
                    let mut left = blocks;
                    dir_blocks(tree, id, &placed, true, |b| {
                        if left > 0 {
                            left -= 1;
                            w.put(b)?;
                            w.pad_to(w.pos.next_multiple_of(BLOCK_SIZE))?;
                        }
                        Ok(())
                    })?;
                }
            }
            w.pad_to(blk * BLOCK_SIZE)?;
        }
        Ok(())
    }
}

/// A directory's `i_size`: whole blocks, then the bytes of the last one
/// (whose last name ends at `i_size`, not at a NUL).
fn dir_size(tree: &Tree, id: NodeId) -> Result<u64, Error> {
    let (mut blocks, mut last) = (0u64, 0u64);
    dir_blocks(tree, id, &Placed::default(), false, |b| {
        blocks += 1;
        last = b.len() as u64;
        Ok(())
    })?;
    Ok(blocks.saturating_sub(1) * BLOCK_SIZE + last)
}

/// Directory `id`'s blocks in order, each as the bytes it uses (the rest
/// of a block is zeros): `.` and `..` among the entries, all in byte order
/// (the kernel binary-searches them), as many dirents as fit in 512 bytes
/// of 12-byte dirents plus names. `placed` is the directory's own
/// placement; without `resolve`, nids are left 0 (only sizes are wanted).
fn dir_blocks(
    tree: &Tree,
    id: NodeId,
    placed: &Placed,
    resolve: bool,
    mut emit: impl FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let (dot, dotdot) = if resolve {
        (nid(placed), nid(&placement(tree, placed.parent)?))
    } else {
        (0, 0)
    };
    let dir_ft = format::file_type(libc::S_IFDIR).unwrap_or(0);
    let mut dots = [(&b"."[..], dot), (&b".."[..], dotdot)]
        .into_iter()
        .peekable();
    let mut block = DirBlock::default();
    let mut entries = Entries::of(id);
    while let Some((e, _)) = entries.next(tree)? {
        while let Some((name, nid)) = dots.next_if(|(n, _)| *n < e.name.as_slice()) {
            block.push(name, nid, dir_ft, &mut emit)?;
        }
        let child = match (resolve, &e.placed) {
            (false, _) => 0,
            (true, Some(p)) => nid(p),
            (true, None) => {
                let err = invalid(format!("inode {} is named but not placed", e.id));
                return Err(at_entry(tree, id, &e.name, err));
            }
        };
        let ft = format::file_type(e.mode).unwrap_or(0);
        block.push(&e.name, child, ft, &mut emit)?;
    }
    for (name, nid) in dots {
        block.push(name, nid, dir_ft, &mut emit)?;
    }
    block.flush(&mut emit)
}

/// One directory block being filled.
struct DirBlock {
    dirents: Vec<(u64, u8, std::ops::Range<usize>)>,
    names: Vec<u8>,
    buf: [u8; BLOCK],
}

impl Default for DirBlock {
    fn default() -> Self {
        DirBlock {
            dirents: Vec::new(),
            names: Vec::new(),
            buf: [0; BLOCK],
        }
    }
}

impl DirBlock {
    fn used(&self) -> usize {
        self.dirents.len() * format::DIRENT_SIZE + self.names.len()
    }

    fn push(
        &mut self,
        name: &[u8],
        nid: u64,
        ft: u8,
        emit: &mut impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        // Names are at most 255 bytes, so a block always takes one.
        if self.used() + format::DIRENT_SIZE + name.len() > BLOCK {
            self.flush(emit)?;
        }
        let start = self.names.len();
        self.names.extend_from_slice(name);
        self.dirents.push((nid, ft, start..self.names.len()));
        Ok(())
    }

    /// Encodes the block (dirents, then the names back to back) and hands
    /// it on.
    fn flush(&mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), Error>) -> Result<(), Error> {
        if self.dirents.is_empty() {
            return Ok(());
        }
        let base = self.dirents.len() * format::DIRENT_SIZE;
        for (k, (nid, ft, range)) in self.dirents.iter().enumerate() {
            let at = k * format::DIRENT_SIZE;
            let nameoff = (base + range.start) as u16;
            self.buf[at..at + format::DIRENT_SIZE]
                .copy_from_slice(&format::dirent(*nid, nameoff, *ft));
        }
        let used = base + self.names.len();
        self.buf[base..used].copy_from_slice(&self.names);
        self.dirents.clear();
        self.names.clear();
        emit(&self.buf[..used])
    }
}

/// The path of placed inode `id`, for messages.
fn path(tree: &Tree, mut id: NodeId) -> String {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    while id != ROOT {
        let Ok(Some(p)) = tree.placed(id) else {
            parts.push(format!("<inode {id}>").into_bytes());
            break;
        };
        parts.push(name_in(tree, p.parent, id).unwrap_or_else(|| b"?".to_vec()));
        id = p.parent;
    }
    let mut path = String::new();
    for part in parts.iter().rev() {
        path.push('/');
        path.push_str(&String::from_utf8_lossy(part));
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// A name directory `dir` gives inode `id`.
fn name_in(tree: &Tree, dir: NodeId, id: NodeId) -> Option<Vec<u8>> {
    let mut entries = Entries::of(dir);
    while let Some((e, _)) = entries.next(tree).ok()? {
        if e.id == id {
            return Some(e.name);
        }
    }
    None
}

/// `e` said of inode `id`.
fn at(tree: &Tree, id: NodeId, e: Error) -> Error {
    at_path(path(tree, id), e)
}

/// `e` said of entry `name` of directory `dir`.
fn at_entry(tree: &Tree, dir: NodeId, name: &[u8], e: Error) -> Error {
    let mut path = path(tree, dir);
    if !path.ends_with('/') {
        path.push('/');
    }
    path.push_str(&String::from_utf8_lossy(name));
    at_path(path, e)
}

fn at_path(path: String, e: Error) -> Error {
    match e {
        Error::Unrepresentable { what } => unrepresentable(format!("{what} (at {path})")),
        Error::Invalid { what } => invalid(format!("{what} (at {path})")),
        e => e,
    }
}

/// `/`, NUL, `.`, `..`, empty and over-long names have no place in a
/// directory.
fn check_name(name: &[u8]) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > NAME_LEN_MAX
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return Err(unrepresentable(format!(
            "the name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

/// Bytes of the inline xattr body of `inode` (0 without xattrs), checking
/// every name has an index and every size fits its field.
fn xattr_body_size(inode: &Inode) -> Result<usize, Error> {
    if inode.xattrs.is_empty() {
        return Ok(0);
    }
    let mut size = format::XATTR_IBODY_HEADER_SIZE;
    for (name, value) in &inode.xattrs {
        let shown = String::from_utf8_lossy(name);
        let (_, rest) = format::xattr_name_index(name)
            .ok_or_else(|| unrepresentable(format!("the xattr name {shown:?}")))?;
        if rest.len() > NAME_LEN_MAX {
            return Err(unrepresentable(format!(
                "the xattr name {shown:?} (too long)"
            )));
        }
        if value.len() > format::XATTR_VALUE_MAX {
            return Err(unrepresentable(format!(
                "the {}-byte value of xattr {shown:?}",
                value.len()
            )));
        }
        size += format::xattr_entry_size(rest.len(), value.len());
    }
    format::xattr_icount(size)
        .ok_or_else(|| unrepresentable(format!("{size} bytes of xattrs on one inode")))?;
    let mut names: Vec<&[u8]> = inode.xattrs.iter().map(|(n, _)| n.as_slice()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(format!(
            "xattr {:?} set twice",
            String::from_utf8_lossy(w[0])
        )));
    }
    Ok(size)
}

/// The inline xattr body, sizes as [`xattr_body_size`] checked them.
fn write_xattrs(inode: &Inode, w: &mut Out<'_>) -> io::Result<()> {
    if inode.xattrs.is_empty() {
        return Ok(());
    }
    w.put(&format::xattr_ibody_header())?;
    for (name, value) in &inode.xattrs {
        let Some((index, rest)) = format::xattr_name_index(name) else {
            continue;
        };
        w.put(&format::xattr_entry_header(
            rest.len() as u8,
            index,
            value.len() as u16,
        ))?;
        w.put(rest)?;
        w.put(value)?;
        w.pad_to(w.pos.next_multiple_of(4))?;
    }
    Ok(())
}

/// A random (version 4) volume uuid: overlayfs tells lower filesystems
/// apart by it, and two layers may well have identical metadata.
fn random_uuid() -> Result<[u8; 16], Error> {
    let mut u = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|source| Error::Io {
            context: "reading /dev/urandom".into(),
            source,
        })?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
