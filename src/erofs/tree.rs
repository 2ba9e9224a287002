//! The in-memory index of one layer: the tree an EROFS metadata image
//! describes. [`super::index`] builds it from a tar stream; [`super::writer`]
//! lays it out on disk. Nothing here touches the filesystem.

use std::collections::BTreeMap;

/// An inode's position in [`Tree::inodes`]; the root is 0.
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
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
}

/// A layer's tree: inodes, and for each directory its entries by name
/// (`.` and `..` are implied). A regular file may be named by several
/// entries: a hardlink group is one inode.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub inodes: Vec<Inode>,
    /// Entries of each directory inode, sorted by name as EROFS stores them.
    pub dirs: BTreeMap<NodeId, BTreeMap<Vec<u8>, NodeId>>,
}

impl Tree {
    /// A tree holding only its root directory, with `root` as its inode.
    pub fn new(root: Inode) -> Self {
        let mut t = Tree::default();
        t.inodes.push(root);
        t.dirs.insert(ROOT, BTreeMap::new());
        t
    }

    pub fn add(&mut self, inode: Inode) -> NodeId {
        let id = self.inodes.len() as NodeId;
        if inode.is_dir() {
            self.dirs.insert(id, BTreeMap::new());
        }
        self.inodes.push(inode);
        id
    }
}
