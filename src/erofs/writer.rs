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
use super::tree::{Data, Inode, NodeId, ROOT, Tree};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;

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
const UNPLACED: u32 = u32::MAX;

/// Writes the metadata image of `tree` to `out` (from its start, truncating
/// it). `tar_len` is the length of the layer's tar, the image's device 1;
/// `staging` holds the bytes of [`Data::Staged`] files and is appended
/// after the metadata. Nothing is synced.
pub fn write_image(
    tree: &Tree,
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
    let root_nid = u16::try_from(plan.nodes[0].pos >> INODE_SLOT_BITS)
        .map_err(|_| invalid("the root inode is placed too far"))?;
    let sb = SuperBlock {
        root_nid,
        inos: plan.nodes.len() as u64,
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
    plan.write_inodes(tree, &mut w).map_err(write_err)?;
    plan.write_blocks(tree, &mut w).map_err(write_err)?;
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
        inodes: plan.nodes.len() as u64,
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
    /// Directory or symlink bytes: whole blocks from `startblk`, then the
    /// tail inline after the inode when `inline`, else in one more
    /// (zero-padded) block.
    Flat {
        size: u64,
        inline: bool,
        startblk: u32,
    },
    /// `count` chunk indexes of `BLOCK_SIZE << blkbits` bytes each.
    Chunked { size: u64, blkbits: u8, count: u64 },
}

impl Kind {
    /// Blocks in the data area.
    fn data_blocks(&self) -> u64 {
        match *self {
            Kind::Flat { size, inline, .. } if inline => size / BLOCK_SIZE,
            Kind::Flat { size, .. } => size.div_ceil(BLOCK_SIZE),
            _ => 0,
        }
    }

    /// Bytes written inline after the inode and its xattrs.
    fn inline_bytes(&self) -> u64 {
        match *self {
            Kind::Flat { size, inline, .. } if inline => size % BLOCK_SIZE,
            _ => 0,
        }
    }
}

/// One inode of the image.
struct Node<'t> {
    id: NodeId,
    /// Index in [`Plan::nodes`] of the directory that first names it.
    parent: u32,
    /// That name (empty for the root).
    name: &'t [u8],
    nlink: u32,
    xattr_size: u32,
    kind: Kind,
    pos: u64,
}

struct Plan<'t> {
    /// In image order: breadth-first from the root.
    nodes: Vec<Node<'t>>,
    /// [`NodeId`] → index in `nodes`.
    index: Vec<u32>,
    staged_blk: u32,
    total_blocks: u32,
    epoch: u64,
    tar_len: u64,
}

/// Orders, checks and places every inode reachable from the root.
fn plan(tree: &Tree, tar_len: u64, has_staging: bool, staging_len: u64) -> Result<Plan<'_>, Error> {
    let root = tree
        .inodes
        .first()
        .ok_or_else(|| invalid("no root inode"))?;
    if !root.is_dir() {
        return Err(invalid("the root is not a directory"));
    }
    if let Some((&id, _)) = tree
        .dirs
        .iter()
        .find(|(id, _)| !tree.inodes.get(**id as usize).is_some_and(Inode::is_dir))
    {
        return Err(invalid(format!("entries listed under non-directory {id}")));
    }
    let mut p = Plan {
        nodes: Vec::with_capacity(tree.inodes.len()),
        index: vec![UNPLACED; tree.inodes.len()],
        staged_blk: 0,
        total_blocks: 0,
        epoch: 0,
        tar_len,
    };
    p.order(tree)?;

    let staging_blocks = staging_len.div_ceil(BLOCK_SIZE);
    let mut pos = INODE_AREA;
    for i in 0..p.nodes.len() {
        let inode = &tree.inodes[p.nodes[i].id as usize];
        let xattr_size = xattr_body_size(inode).map_err(|e| p.at(i, e))?;
        let kind = p
            .kind(tree, i, has_staging, staging_blocks)
            .map_err(|e| p.at(i, e))?;
        let head = EXTENDED_INODE_SIZE as u64 + xattr_size as u64;
        let (kind, at, len) = match kind {
            Kind::Flat { size, .. } => {
                let tail = size % BLOCK_SIZE;
                // Inline only when inode, xattrs and tail share one block:
                // the kernel reads the tail relative to the inode's block.
                let inline = tail > 0 && head + tail <= BLOCK_SIZE;
                let at = if inline && pos % BLOCK_SIZE + head + tail > BLOCK_SIZE {
                    pos.next_multiple_of(BLOCK_SIZE)
                } else {
                    keep_inode_in_block(pos)
                };
                let kind = Kind::Flat {
                    size,
                    inline,
                    startblk: 0,
                };
                (kind, at, head + kind.inline_bytes())
            }
            Kind::Chunked { count, .. } => {
                let at = keep_inode_in_block(pos);
                // The kernel finds the indexes at the next 8-byte boundary.
                let len = head.next_multiple_of(CHUNK_INDEX_SIZE as u64)
                    + count * CHUNK_INDEX_SIZE as u64;
                (kind, at, len)
            }
            Kind::Bare { .. } => (kind, keep_inode_in_block(pos), head),
        };
        let n = &mut p.nodes[i];
        n.xattr_size = xattr_size as u32;
        n.kind = kind;
        n.pos = at;
        pos = (at + len).next_multiple_of(INODE_SLOT);
        if inode.mtime > 0 {
            p.epoch = p.epoch.max(inode.mtime as u64);
        }
    }

    // Whole blocks of directories and symlinks, in inode order.
    let too_big = || unrepresentable("an image over 2 TiB");
    let mut blk = pos.div_ceil(BLOCK_SIZE);
    for n in &mut p.nodes {
        let blocks = n.kind.data_blocks();
        if let Kind::Flat { startblk, .. } = &mut n.kind
            && blocks > 0
        {
            *startblk = u32::try_from(blk).map_err(|_| too_big())?;
            blk += blocks;
        }
    }
    p.staged_blk = u32::try_from(blk).map_err(|_| too_big())?;
    let total = blk + staging_blocks;
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

impl<'t> Plan<'t> {
    /// Breadth-first from the root: assigns each reachable inode its place
    /// in `nodes` and counts links.
    fn order(&mut self, tree: &'t Tree) -> Result<(), Error> {
        self.nodes.push(Node {
            id: ROOT,
            parent: 0,
            name: b"",
            nlink: 2,
            xattr_size: 0,
            kind: Kind::Bare { i_u: 0 },
            pos: 0,
        });
        self.index[ROOT as usize] = 0;
        let mut queue = VecDeque::from([0u32]);
        while let Some(d) = queue.pop_front() {
            let Some(entries) = tree.dirs.get(&self.nodes[d as usize].id) else {
                continue;
            };
            for (name, &child) in entries {
                check_name(name).map_err(|e| self.at_entry(d, name, e))?;
                let inode = tree.inodes.get(child as usize).ok_or_else(|| {
                    self.at_entry(d, name, invalid(format!("names missing inode {child}")))
                })?;
                let placed = self.index[child as usize];
                if placed == UNPLACED {
                    let at = self.nodes.len() as u32;
                    self.index[child as usize] = at;
                    self.nodes.push(Node {
                        id: child,
                        parent: d,
                        name,
                        nlink: if inode.is_dir() { 2 } else { 1 },
                        xattr_size: 0,
                        kind: Kind::Bare { i_u: 0 },
                        pos: 0,
                    });
                    if inode.is_dir() {
                        queue.push_back(at);
                        let parent = &mut self.nodes[d as usize];
                        parent.nlink = parent
                            .nlink
                            .checked_add(1)
                            .ok_or_else(|| unrepresentable("over 2^32 subdirectories"))?;
                    }
                } else if inode.is_dir() {
                    let e = invalid("a directory named twice (or the root named)");
                    return Err(self.at_entry(d, name, e));
                } else {
                    let n = &mut self.nodes[placed as usize];
                    n.nlink = n
                        .nlink
                        .checked_add(1)
                        .ok_or_else(|| unrepresentable("over 2^32 hardlinks"))?;
                }
            }
        }
        Ok(())
    }

    /// Checks node `i`'s type and data and says how to lay it out (flat
    /// kinds get their block address later).
    fn kind(
        &self,
        tree: &Tree,
        i: usize,
        has_staging: bool,
        staging_blocks: u64,
    ) -> Result<Kind, Error> {
        let inode = &tree.inodes[self.nodes[i].id as usize];
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
                size: dir_size(&dir_entries(tree, self, i)),
                inline: false,
                startblk: 0,
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
                    startblk: 0,
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
                    if !has_staging || end.is_none_or(|end| end > staging_blocks) {
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

    fn nid(&self, id: NodeId) -> u64 {
        self.nodes[self.index[id as usize] as usize].pos >> INODE_SLOT_BITS
    }

    /// The path of node `i`, for messages.
    fn path(&self, mut i: usize) -> String {
        let mut parts = Vec::new();
        while i != 0 {
            parts.push(self.nodes[i].name);
            i = self.nodes[i].parent as usize;
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

    /// `e` said of node `i`.
    fn at(&self, i: usize, e: Error) -> Error {
        self.at_path(self.path(i), e)
    }

    /// `e` said of entry `name` of directory node `dir`.
    fn at_entry(&self, dir: u32, name: &[u8], e: Error) -> Error {
        let mut path = self.path(dir as usize);
        if !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(&String::from_utf8_lossy(name));
        self.at_path(path, e)
    }

    fn at_path(&self, path: String, e: Error) -> Error {
        match e {
            Error::Unrepresentable { what } => unrepresentable(format!("{what} (at {path})")),
            Error::Invalid { what } => invalid(format!("{what} (at {path})")),
            e => e,
        }
    }

    /// The inode area: every inode, its xattrs, then its chunk indexes or
    /// inline tail.
    fn write_inodes(&self, tree: &Tree, w: &mut Out<'_>) -> io::Result<()> {
        let mut block = [0u8; BLOCK];
        for (i, n) in self.nodes.iter().enumerate() {
            let inode = &tree.inodes[n.id as usize];
            let (layout, i_u, size) = match n.kind {
                Kind::Bare { i_u } => (DataLayout::FlatPlain, i_u, 0),
                Kind::Flat {
                    size,
                    inline,
                    startblk,
                } => {
                    let layout = if inline {
                        DataLayout::FlatInline
                    } else {
                        DataLayout::FlatPlain
                    };
                    (layout, startblk, size)
                }
                Kind::Chunked { size, blkbits, .. } => {
                    (DataLayout::ChunkBased, format::chunk_format(blkbits), size)
                }
            };
            let xattr_icount = format::xattr_icount(n.xattr_size as usize).unwrap_or(0);
            let core = ExtendedInode {
                layout,
                xattr_icount,
                mode: inode.mode as u16,
                size,
                i_u,
                ino: i as u32 + 1,
                uid: inode.uid,
                gid: inode.gid,
                mtime: inode.mtime,
                mtime_nsec: inode.mtime_nsec,
                nlink: n.nlink,
            };
            w.pad_to(n.pos)?;
            w.put(&core.encode())?;
            write_xattrs(inode, w)?;
            match n.kind {
                Kind::Chunked { blkbits, count, .. } => {
                    w.pad_to(w.pos.next_multiple_of(CHUNK_INDEX_SIZE as u64))?;
                    self.write_chunk_indexes(inode, blkbits, count, w)?;
                }
                Kind::Flat { size, inline, .. } if inline => {
                    let tail = (size % BLOCK_SIZE) as usize;
                    match &inode.data {
                        Data::Symlink(target) => w.put(&target[target.len() - tail..])?,
                        _ => {
                            let entries = dir_entries(tree, self, i);
                            let spans = dir_spans(&entries);
                            let last = spans.last().cloned().unwrap_or_default();
                            let used = encode_dir_block(&entries[last], self, tree, &mut block);
                            debug_assert_eq!(used, tail);
                            w.put(&block[..used])?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
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
    fn write_blocks(&self, tree: &Tree, w: &mut Out<'_>) -> io::Result<()> {
        let mut block = [0u8; BLOCK];
        for (i, n) in self.nodes.iter().enumerate() {
            let Kind::Flat { startblk, .. } = n.kind else {
                continue;
            };
            let blocks = n.kind.data_blocks() as usize;
            if blocks == 0 {
                continue;
            }
            w.pad_to(u64::from(startblk) * BLOCK_SIZE)?;
            match &tree.inodes[n.id as usize].data {
                Data::Symlink(target) => {
                    let len = target.len().min(blocks * BLOCK);
                    w.put(&target[..len])?;
                }
                _ => {
                    let entries = dir_entries(tree, self, i);
                    for span in dir_spans(&entries).into_iter().take(blocks) {
                        let used = encode_dir_block(&entries[span], self, tree, &mut block);
                        w.put(&block[..used])?;
                        w.pad_to(w.pos.next_multiple_of(BLOCK_SIZE))?;
                    }
                }
            }
            w.pad_to((u64::from(startblk) + blocks as u64) * BLOCK_SIZE)?;
        }
        Ok(())
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

/// A directory's entries as stored: `.` and `..` among the others, all in
/// byte order (the kernel binary-searches them).
fn dir_entries<'t>(tree: &'t Tree, plan: &Plan, i: usize) -> Vec<(&'t [u8], NodeId)> {
    let id = plan.nodes[i].id;
    let parent = plan.nodes[plan.nodes[i].parent as usize].id;
    let named = tree.dirs.get(&id);
    let mut v: Vec<(&[u8], NodeId)> = Vec::with_capacity(named.map_or(0, |m| m.len()) + 2);
    v.extend(named.into_iter().flatten().map(|(k, &c)| (k.as_slice(), c)));
    for (dot, target) in [(&b".."[..], parent), (&b"."[..], id)] {
        let at = v.partition_point(|(name, _)| *name < dot);
        v.insert(at, (dot, target));
    }
    v
}

/// Splits sorted entries into directory blocks: as many as fit in 512
/// bytes of 12-byte dirents plus names. (Names are at most 255 bytes, so
/// every block takes at least one.)
fn dir_spans(entries: &[(&[u8], NodeId)]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = format::DIRENT_SIZE + name.len();
        if used + need > BLOCK {
            spans.push(start..i);
            start = i;
            used = 0;
        }
        used += need;
    }
    if start < entries.len() {
        spans.push(start..entries.len());
    }
    spans
}

/// A directory's `i_size`: whole blocks, then the bytes of the last one
/// (whose last name ends at `i_size`, not at a NUL).
fn dir_size(entries: &[(&[u8], NodeId)]) -> u64 {
    let spans = dir_spans(entries);
    let Some(last) = spans.last() else {
        return 0;
    };
    let tail: usize = entries[last.clone()]
        .iter()
        .map(|(name, _)| format::DIRENT_SIZE + name.len())
        .sum();
    (spans.len() as u64 - 1) * BLOCK_SIZE + tail as u64
}

/// One directory block: the dirents, then the names back to back; the
/// rest of `block` zeroed. Returns the bytes used.
fn encode_dir_block(
    entries: &[(&[u8], NodeId)],
    plan: &Plan,
    tree: &Tree,
    block: &mut [u8; BLOCK],
) -> usize {
    let mut nameoff = entries.len() * format::DIRENT_SIZE;
    for (k, (name, id)) in entries.iter().enumerate() {
        let ft = format::file_type(tree.inodes[*id as usize].mode).unwrap_or(0);
        let at = k * format::DIRENT_SIZE;
        block[at..at + format::DIRENT_SIZE].copy_from_slice(&format::dirent(
            plan.nid(*id),
            nameoff as u16,
            ft,
        ));
        block[nameoff..nameoff + name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
    block[nameoff..].fill(0);
    nameoff
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
