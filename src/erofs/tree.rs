//! The index of one layer: the tree an EROFS metadata image describes.
//! `archive::index_layer` builds it from a tar stream; [`super::writer`]
//! places its inodes (recorded here too) and lays it out on disk. Nothing
//! here touches the layer's files.
//!
//! The tree is held in memory until it holds more than its budget; then,
//! where it was given a [`Spill`] file, it moves there (an SQLite database
//! with a bounded page cache) and stays there, so a layer of any number of
//! entries is indexed in bounded memory. Both stores answer the same calls
//! with the same results (`tree_tests.rs`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::PathBuf;

use super::tree_spill::Spilled;

/// An inode's number in the tree; the root is 0.
pub type NodeId = u32;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// Where a regular file's bytes are (symlink targets and directories are
/// the writer's business: they live in the metadata image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// No bytes: an empty file, a directory, a device, a FIFO.
    None,
    /// A symlink's target.
    Symlink(Vec<u8>),
    /// `size` contiguous bytes of the layer's tar (the image's second
    /// device) starting at this byte offset, a multiple of 512.
    Tar { offset: u64 },
    /// Bytes copied into the staging file (appended to the metadata image
    /// after its metadata): one entry per chunk of `512 << chunkbits`
    /// bytes, the chunk's 512-byte block address in the staging file, or
    /// `None` for a chunk that is wholly a hole.
    Staged {
        chunkbits: u8,
        chunks: Vec<Option<u64>>,
    },
}

/// One inode. Type and permission bits are in `mode` (as `st_mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// The logical size of a regular file; ignored for other types (the
    /// writer knows the size of a symlink's target and of a directory).
    pub size: u64,
    /// Device numbers of a character or block device.
    pub major: u32,
    pub minor: u32,
    /// Full names (`user.x`, `trusted.overlay.opaque`, `security.capability`,
    /// `system.posix_acl_access`...) and values, in the order to store them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub data: Data,
}

impl Inode {
    /// An inode of `mode` and nothing else: owned by root, at the epoch,
    /// without data or xattrs.
    pub fn empty(mode: u32) -> Self {
        Inode {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            major: 0,
            minor: 0,
            xattrs: Vec::new(),
            data: Data::None,
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }

    /// Bytes it holds outside itself, roughly, allocator overhead included.
    fn heap_bytes(&self) -> usize {
        let data = match &self.data {
            Data::Symlink(t) => t.len() + 16,
            Data::Staged { chunks, .. } => chunks.len() * 16 + 16,
            Data::None | Data::Tar { .. } => 0,
        };
        data + self
            .xattrs
            .iter()
            .map(|(n, v)| n.len() + v.len() + 32)
            .sum::<usize>()
    }
}

/// Where the writer put an inode: its place in image order (breadth-first
/// from the root), the directory that first names it, its link count, its
/// byte offset in the image and, for a directory, its size there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Placed {
    pub seq: u32,
    pub parent: NodeId,
    pub nlink: u32,
    pub pos: u64,
    pub size: u64,
}

/// One entry of a directory, with what the writer needs of its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub id: NodeId,
    pub mode: u32,
    pub placed: Option<Placed>,
}

/// Where a tree goes once it holds more than `budget` bytes in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spill {
    /// The database file (created then, removed with the tree).
    pub path: PathBuf,
    pub budget: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer index at {path}: {context}: {source}")]
    Spill {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("layer index: no inode {0}")]
    NoInode(NodeId),
    #[error("layer index: inode {0} is not a directory")]
    NotADirectory(NodeId),
    #[error("layer index: over 2^32 inodes")]
    Full,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A layer's tree: inodes, and for each directory its entries by name
/// (`.` and `..` are implied). A regular file may be named by several
/// entries: a hardlink group is one inode.
pub struct Tree {
    store: Store,
    spill: Option<Spill>,
}

enum Store {
    Memory(Memory),
    Spilled(Spilled),
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("inodes", &self.len())
            .field("spilled", &self.spilled())
            .finish()
    }
}

impl Tree {
    /// A tree holding only its root directory, with `root` as its inode,
    /// in memory however large it grows.
    pub fn new(root: Inode) -> Self {
        Tree {
            store: Store::Memory(Memory::new(root)),
            spill: None,
        }
    }

    /// A tree that moves to `spill.path` once it holds more than
    /// `spill.budget` bytes in memory.
    pub fn with_spill(root: Inode, spill: Spill) -> Result<Self> {
        let mut t = Tree {
            store: Store::Memory(Memory::new(root)),
            spill: Some(spill),
        };
        t.check_budget()?;
        Ok(t)
    }

    /// Whether the tree has moved to its spill file.
    pub fn spilled(&self) -> bool {
        matches!(self.store, Store::Spilled(_))
    }

    /// Inodes in the tree, reachable or not.
    pub fn len(&self) -> u32 {
        match &self.store {
            Store::Memory(m) => m.inodes.len() as u32,
            Store::Spilled(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn add(&mut self, inode: Inode) -> Result<NodeId> {
        let id = match &mut self.store {
            Store::Memory(m) => m.add(inode)?,
            Store::Spilled(s) => s.add(&inode)?,
        };
        self.check_budget()?;
        Ok(id)
    }

    pub fn inode(&self, id: NodeId) -> Result<Cow<'_, Inode>> {
        match &self.store {
            Store::Memory(m) => m
                .inodes
                .get(id as usize)
                .map(Cow::Borrowed)
                .ok_or(Error::NoInode(id)),
            Store::Spilled(s) => s.inode(id).map(Cow::Owned),
        }
    }

    /// Changes inode `id` in place.
    pub fn update(&mut self, id: NodeId, change: impl FnOnce(&mut Inode)) -> Result<()> {
        match &mut self.store {
            Store::Memory(m) => {
                let inode = m.inodes.get_mut(id as usize).ok_or(Error::NoInode(id))?;
                let before = inode.heap_bytes();
                change(inode);
                m.held = (m.held + inode.heap_bytes()).saturating_sub(before);
            }
            Store::Spilled(s) => {
                let mut inode = s.inode(id)?;
                change(&mut inode);
                s.put(id, &inode)?;
            }
        }
        self.check_budget()
    }

    /// The entry `name` of directory `dir`.
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Result<Option<NodeId>> {
        match &self.store {
            Store::Memory(m) => Ok(m.dirs.get(&dir).and_then(|d| d.get(name)).copied()),
            Store::Spilled(s) => s.child(dir, name),
        }
    }

    /// Puts `node` at `dir/name`; returns what was there.
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Result<Option<NodeId>> {
        if node >= self.len() {
            return Err(Error::NoInode(node));
        }
        let old = match &mut self.store {
            Store::Memory(m) => m.link(dir, name, node)?,
            Store::Spilled(s) => s.link(dir, name, node)?,
        };
        self.check_budget()?;
        Ok(old)
    }

    /// Up to `limit` entries of directory `dir` whose names come after
    /// `after`, in byte order of their names: a directory of any size is
    /// read in bounded pieces (nothing for one without entries).
    pub fn entries(&self, dir: NodeId, after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        match &self.store {
            Store::Memory(m) => {
                let Some(named) = m.dirs.get(&dir) else {
                    return Ok(Vec::new());
                };
                let from = match after {
                    Some(a) => Bound::Excluded(a),
                    None => Bound::Unbounded,
                };
                named
                    .range::<[u8], _>((from, Bound::Unbounded))
                    .take(limit)
                    .map(|(name, &id)| {
                        let inode = m.inodes.get(id as usize).ok_or(Error::NoInode(id))?;
                        Ok(Entry {
                            name: name.to_vec(),
                            id,
                            mode: inode.mode,
                            placed: m.placed(id),
                        })
                    })
                    .collect()
            }
            Store::Spilled(s) => s.entries(dir, after, limit),
        }
    }

    /// Marks inode `id` (the builder's "written by this layer").
    pub fn mark(&mut self, id: NodeId) -> Result<()> {
        match &mut self.store {
            Store::Memory(m) => {
                let slot = m.marks.get_mut(id as usize).ok_or(Error::NoInode(id))?;
                *slot = true;
                Ok(())
            }
            Store::Spilled(s) => s.mark(id),
        }
    }

    pub fn marked(&self, id: NodeId) -> Result<bool> {
        match &self.store {
            Store::Memory(m) => m.marks.get(id as usize).copied().ok_or(Error::NoInode(id)),
            Store::Spilled(s) => s.marked(id),
        }
    }

    /// Records (or changes) where inode `id` is placed; its `seq` stays
    /// what it was first placed at until [`Tree::clear_placements`].
    pub fn place(&mut self, id: NodeId, placed: Placed) -> Result<()> {
        if id >= self.len() {
            return Err(Error::NoInode(id));
        }
        match &mut self.store {
            Store::Memory(m) => m.place(id, placed),
            Store::Spilled(s) => s.place(id, placed)?,
        }
        self.check_budget()
    }

    pub fn placed(&self, id: NodeId) -> Result<Option<Placed>> {
        match &self.store {
            Store::Memory(m) => Ok(m.placed(id)),
            Store::Spilled(s) => s.placed(id),
        }
    }

    /// Up to `limit` placed inodes from the `from`th on, in image order:
    /// the image is written in bounded pieces.
    pub fn in_order(&self, from: u32, limit: usize) -> Result<Vec<(NodeId, Placed, Inode)>> {
        match &self.store {
            Store::Memory(m) => m
                .order
                .iter()
                .skip(from as usize)
                .take(limit)
                .map(|&id| {
                    let inode = m.inodes.get(id as usize).ok_or(Error::NoInode(id))?;
                    let placed = m.placed(id).ok_or(Error::NoInode(id))?;
                    Ok((id, placed, inode.clone()))
                })
                .collect(),
            Store::Spilled(s) => s.in_order(from, limit),
        }
    }

    /// Forgets every placement (before the tree is placed again).
    pub fn clear_placements(&mut self) -> Result<()> {
        match &mut self.store {
            Store::Memory(m) => {
                m.held = m.held.saturating_sub(m.placed.len() * PLACED_BYTES);
                m.placed = Vec::new();
                m.order = Vec::new();
                Ok(())
            }
            Store::Spilled(s) => s.clear_placements(),
        }
    }

    /// Moves the tree to its spill file once it outgrows its budget.
    fn check_budget(&mut self) -> Result<()> {
        let Store::Memory(m) = &mut self.store else {
            return Ok(());
        };
        let Some(spill) = &self.spill else {
            return Ok(());
        };
        if m.held <= spill.budget {
            return Ok(());
        }
        let moved = Spilled::create(&spill.path, std::mem::take(m))?;
        tracing::debug!(path = %spill.path.display(), inodes = moved.len(), "layer index spilled to disk");
        self.store = Store::Spilled(moved);
        Ok(())
    }
}

/// Bytes a placement costs in memory: its slot and its order entry.
const PLACED_BYTES: usize = std::mem::size_of::<Placed>() + 4;
/// Bytes an inode costs in memory besides its heap: itself, its mark, the
/// slack of a growing vector.
const INODE_BYTES: usize = std::mem::size_of::<Inode>() * 3 / 2 + 1;
/// Bytes a directory entry costs besides its name: the boxed name's
/// header, the id, its share of a B-tree node, allocator overhead.
const ENTRY_BYTES: usize = 56;

/// The tree in memory.
#[derive(Default)]
pub(super) struct Memory {
    pub inodes: Vec<Inode>,
    pub marks: Vec<bool>,
    pub dirs: HashMap<NodeId, BTreeMap<Box<[u8]>, NodeId>>,
    /// By id; `seq == u32::MAX` for an inode not placed.
    pub placed: Vec<Placed>,
    /// Ids by `seq`.
    pub order: Vec<NodeId>,
    /// What it holds, roughly, in bytes.
    held: usize,
}

const UNPLACED: Placed = Placed {
    seq: u32::MAX,
    parent: 0,
    nlink: 0,
    pos: 0,
    size: 0,
};

impl Memory {
    fn new(root: Inode) -> Self {
        let mut m = Memory::default();
        // Cannot fail: the tree is empty.
        let _ = m.add(root);
        m
    }

    fn add(&mut self, inode: Inode) -> Result<NodeId> {
        let id = NodeId::try_from(self.inodes.len())
            .ok()
            .filter(|&id| id < u32::MAX)
            .ok_or(Error::Full)?;
        self.held += INODE_BYTES + inode.heap_bytes();
        if inode.is_dir() {
            self.dirs.insert(id, BTreeMap::new());
            self.held += 64;
        }
        self.inodes.push(inode);
        self.marks.push(false);
        if !self.placed.is_empty() {
            self.placed.push(UNPLACED);
            self.held += PLACED_BYTES;
        }
        Ok(id)
    }

    fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Result<Option<NodeId>> {
        let entries = self.dirs.get_mut(&dir).ok_or(Error::NotADirectory(dir))?;
        let old = entries.insert(name.into(), node);
        if old.is_none() {
            self.held += ENTRY_BYTES + name.len();
        }
        Ok(old)
    }

    fn place(&mut self, id: NodeId, placed: Placed) {
        if self.placed.is_empty() {
            self.placed = vec![UNPLACED; self.inodes.len()];
            self.held += self.inodes.len() * PLACED_BYTES;
        }
        let Some(slot) = self.placed.get_mut(id as usize) else {
            return;
        };
        *slot = placed;
        let seq = placed.seq as usize;
        if self.order.len() <= seq {
            self.order.resize(seq + 1, u32::MAX);
        }
        self.order[seq] = id;
    }

    fn placed(&self, id: NodeId) -> Option<Placed> {
        self.placed
            .get(id as usize)
            .copied()
            .filter(|p| p.seq != u32::MAX)
    }
}

#[cfg(test)]
#[path = "tree_tests.rs"]
mod tests;
