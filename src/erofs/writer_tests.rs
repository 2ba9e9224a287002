//! The writer's layout functions, its refusals, and images mounted through
//! the kernel (`*_as_root`, skipped where the kernel cannot mount them).

use super::*;
use crate::erofs::mount::{is_mounted, kernel_support, mount_layer, unmount_layer};
use crate::erofs::tree::{Data, Inode, NodeId, ROOT, Spill, Tree};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

fn inode(mode: u32) -> Inode {
    Inode {
        mtime: 1_700_000_000,
        ..Inode::empty(mode)
    }
}

fn dir_inode() -> Inode {
    inode(libc::S_IFDIR | 0o755)
}

/// A tree under construction with its tar-like data file (bytes at
/// 512-aligned offsets, each after a 512-byte stand-in header) and an
/// optional staging file. The tree is built twice, in memory and spilled
/// to disk from its first inode: every image is written from both, and
/// the two must be the same bytes (or the same refusal).
struct Layer {
    tree: RefCell<Tree>,
    spilled: RefCell<Tree>,
    _spill_dir: tempfile::TempDir,
    tar: Vec<u8>,
    staging: Option<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        let spill_dir = tempfile::tempdir().unwrap();
        let spill = Spill {
            path: spill_dir.path().join("index"),
            budget: 0,
        };
        let spilled = Tree::with_spill(dir_inode(), spill).unwrap();
        assert!(spilled.spilled());
        Layer {
            tree: RefCell::new(Tree::new(dir_inode())),
            spilled: RefCell::new(spilled),
            _spill_dir: spill_dir,
            tar: Vec::new(),
            staging: None,
        }
    }

    fn add(&mut self, parent: NodeId, name: impl AsRef<[u8]>, inode: Inode) -> NodeId {
        let id = self.tree.get_mut().add(inode.clone()).unwrap();
        assert_eq!(self.spilled.get_mut().add(inode).unwrap(), id);
        self.link(parent, name, id);
        id
    }

    fn link(&mut self, parent: NodeId, name: impl AsRef<[u8]>, id: NodeId) {
        for t in [self.tree.get_mut(), self.spilled.get_mut()] {
            t.link(parent, name.as_ref(), id)
                .expect("parent is a directory");
        }
    }

    /// Changes inode `id` (in both trees).
    fn edit(&mut self, id: NodeId, change: impl Fn(&mut Inode)) {
        for t in [self.tree.get_mut(), self.spilled.get_mut()] {
            t.update(id, &change).unwrap();
        }
    }

    fn dir(&mut self, parent: NodeId, name: impl AsRef<[u8]>) -> NodeId {
        self.add(parent, name, dir_inode())
    }

    fn put_tar(&mut self, content: &[u8]) -> u64 {
        self.tar.extend_from_slice(&[0u8; 512]);
        let offset = self.tar.len() as u64;
        self.tar.extend_from_slice(content);
        self.tar.resize(self.tar.len().next_multiple_of(512), 0);
        offset
    }

    fn file(&mut self, parent: NodeId, name: impl AsRef<[u8]>, content: &[u8]) -> NodeId {
        let offset = self.put_tar(content);
        let f = Inode {
            size: content.len() as u64,
            data: Data::Tar { offset },
            ..inode(libc::S_IFREG | 0o644)
        };
        self.add(parent, name, f)
    }

    fn symlink(&mut self, parent: NodeId, name: impl AsRef<[u8]>, target: &[u8]) -> NodeId {
        let l = Inode {
            data: Data::Symlink(target.to_vec()),
            ..inode(libc::S_IFLNK | 0o777)
        };
        self.add(parent, name, l)
    }

    /// Writes the image into a temporary directory without mounting it.
    fn write(&self) -> (tempfile::TempDir, Result<Layout, Error>) {
        let dir = tempfile::tempdir().unwrap();
        let r = self.write_in(dir.path(), self.tar.len() as u64, &[]);
        (dir, r)
    }

    fn write_in(
        &self,
        dir: &Path,
        tar_len: u64,
        patches: &[(u64, &[u8])],
    ) -> Result<Layout, Error> {
        let tar = File::create(dir.join("layer.tar")).unwrap();
        tar.write_all_at(&self.tar, 0).unwrap();
        tar.set_len(tar_len.max(self.tar.len() as u64)).unwrap();
        for (at, bytes) in patches {
            tar.write_all_at(bytes, *at).unwrap();
        }
        let mut staging = self.staging.as_ref().map(|bytes| {
            let mut f = tempfile::tempfile_in(dir).unwrap();
            f.write_all(bytes).unwrap();
            f
        });
        let mut out = File::create(dir.join("layer.erofs")).unwrap();
        let layout = write_image(
            &mut self.tree.borrow_mut(),
            tar_len,
            staging.as_mut(),
            &mut out,
        );
        // The spilled tree writes the same image, uuid aside.
        let mut again = tempfile::tempfile_in(dir).unwrap();
        let same = write_image(
            &mut self.spilled.borrow_mut(),
            tar_len,
            staging.as_mut(),
            &mut again,
        );
        match (&layout, &same) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b);
                let uuid = SUPER_OFFSET as usize + 48..SUPER_OFFSET as usize + 64;
                let mut first = std::fs::read(dir.join("layer.erofs")).unwrap();
                let mut second = Vec::new();
                again.seek(SeekFrom::Start(0)).unwrap();
                again.read_to_end(&mut second).unwrap();
                first[uuid.clone()].fill(0);
                second[uuid].fill(0);
                assert!(first == second, "the spilled tree wrote another image");
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("in memory: {layout:?}; spilled: {same:?}"),
        }
        layout
    }

    /// Writes and mounts the image; `None` (having said why) where this
    /// kernel cannot.
    fn mount(&self) -> Option<Mounted> {
        self.mount_with(self.tar.len() as u64, &[])
    }

    /// Like [`Layer::mount`] with the tar file extended to `tar_len`
    /// (sparse) and `patches` written into it.
    fn mount_with(&self, tar_len: u64, patches: &[(u64, &[u8])]) -> Option<Mounted> {
        if let Err(why) = kernel_support() {
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let layout = self.write_in(dir.path(), tar_len, patches).unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        mount_layer(
            &dir.path().join("layer.erofs"),
            &dir.path().join("layer.tar"),
            &mnt,
        )
        .unwrap();
        Some(Mounted {
            _dir: dir,
            mnt,
            layout,
        })
    }
}

struct Mounted {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    layout: Layout,
}

impl Mounted {
    fn path(&self, rel: impl AsRef<[u8]>) -> PathBuf {
        self.mnt.join(OsStr::from_bytes(rel.as_ref()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = unmount_layer(&self.mnt) {
            eprintln!("unmounting {}: {e}", self.mnt.display());
        }
    }
}

/// Every entry of a directory as the kernel lists it, `.` and `..`
/// included: name, inode number, d_type.
fn raw_entries(dir: &Path) -> Vec<(Vec<u8>, u64, u8)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut out = Vec::new();
    // SAFETY: a valid C string; the stream is read to its end and closed,
    // each entry's name copied before the next readdir.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null(), "opendir {}", dir.display());
        loop {
            let e = libc::readdir64(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            out.push((name.to_bytes().to_vec(), (*e).d_ino, (*e).d_type));
        }
        libc::closedir(d);
    }
    out
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Varied bytes, so misplaced reads show.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

// ---- pure layout -------------------------------------------------------

/// The root's directory blocks, as the bytes each uses (nids left 0).
fn root_blocks(l: &Layer) -> Vec<Vec<u8>> {
    let mut blocks = Vec::new();
    let me = Placed {
        parent: ROOT,
        ..Placed::default()
    };
    for tree in [&l.tree, &l.spilled] {
        let mut got = Vec::new();
        dir_blocks(&tree.borrow(), ROOT, &me, false, |b| {
            got.push(b.to_vec());
            Ok(())
        })
        .unwrap();
        if !blocks.is_empty() {
            assert_eq!(got, blocks, "the spilled tree lists another directory");
        }
        blocks = got;
    }
    blocks
}

/// The names of a directory block, in order.
fn block_names(b: &[u8]) -> Vec<Vec<u8>> {
    let off = |k: usize| u16::from_le_bytes([b[k * 12 + 8], b[k * 12 + 9]]) as usize;
    let count = off(0) / 12;
    (0..count)
        .map(|k| {
            let end = if k + 1 < count { off(k + 1) } else { b.len() };
            b[off(k)..end].to_vec()
        })
        .collect()
}

#[test]
fn dir_blocks_pack_as_many_entries_as_fit() {
    // 12-byte dirents: `.` (13 bytes) and `..` (14) with 37 one-byte
    // names fill 508 bytes; the 38th starts a block.
    let mut l = Layer::new();
    for c in (b'A'..=b'Z').chain(b'a'..=b'l') {
        l.file(ROOT, [c], b"");
    }
    let lens: Vec<usize> = root_blocks(&l).iter().map(Vec::len).collect();
    assert_eq!(lens, vec![508, 13]);

    // 255-byte names: one per block after `.` and `..` share the first.
    let mut l = Layer::new();
    l.file(ROOT, vec![b'x'; 255], b"");
    l.file(ROOT, vec![b'y'; 255], b"");
    let lens: Vec<usize> = root_blocks(&l).iter().map(Vec::len).collect();
    assert_eq!(lens, vec![294, 267]);

    // Exactly a block: no tail (the name is longer than a real one may
    // be, to fill it).
    let mut l = Layer::new();
    l.file(ROOT, "a", b"");
    l.file(ROOT, vec![b'y'; 512 - 13 - 14 - 13 - 12], b"");
    let lens: Vec<usize> = root_blocks(&l).iter().map(Vec::len).collect();
    assert_eq!(lens, vec![512]);
}

#[test]
fn dot_entries_sort_among_the_others() {
    let mut l = Layer::new();
    for name in ["a", "-", "!", ".a", "..b", "\u{7f}", "+"] {
        l.file(ROOT, name, b"");
    }
    let blocks = root_blocks(&l);
    assert_eq!(blocks.len(), 1);
    let names = block_names(&blocks[0]);
    let want: Vec<&[u8]> = vec![b"!", b"+", b"-", b".", b"..", b"..b", b".a", b"a", b"\x7f"];
    assert_eq!(names, want);
}

#[test]
fn xattr_body_sizes_follow_the_kernel_formula() {
    let mut f = inode(libc::S_IFREG | 0o644);
    assert_eq!(xattr_body_size(&f).unwrap(), 0);
    f.xattrs.push((b"user.a".to_vec(), b"b".to_vec()));
    // Header 12, entry 4 + 1 + 1 padded to 8.
    assert_eq!(xattr_body_size(&f).unwrap(), 20);
    f.xattrs
        .push((b"system.posix_acl_access".to_vec(), vec![0; 28]));
    assert_eq!(xattr_body_size(&f).unwrap(), 20 + 32);
    f.xattrs
        .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
    assert_eq!(xattr_body_size(&f).unwrap(), 52 + 20);
}

#[test]
fn inodes_and_inline_tails_never_straddle_blocks() {
    let mut l = Layer::new();
    let d = l.dir(ROOT, "links");
    for len in 1..=700usize {
        let id = l.symlink(
            d,
            format!("{len:04}"),
            &pattern(len, 1).iter().map(|b| b | 1).collect::<Vec<_>>(),
        );
        if len % 3 == 0 {
            l.edit(id, |i| {
                i.xattrs.push((b"trusted.k".to_vec(), vec![7; len % 40]))
            });
        }
    }
    for k in 0..60usize {
        let sub = l.dir(ROOT, format!("d{k}"));
        for j in 0..k {
            l.file(sub, format!("{j}-{}", "n".repeat((k * 7 + j) % 50)), b"");
        }
    }
    let mut tree = l.tree.borrow_mut();
    let p = plan(&mut tree, l.tar.len() as u64, false, 0).unwrap();
    // The root comes first (at most padded to the next block), so its nid
    // fits the superblock's 16 bits.
    let nodes = tree.in_order(0, usize::MAX).unwrap();
    assert_eq!(nodes.len(), p.count as usize);
    assert_eq!(nodes[0].0, ROOT);
    let root = tree.placed(ROOT).unwrap().unwrap();
    assert!(root.pos <= 1536, "root at {}", root.pos);
    let mut end = 0;
    for (_, placed, inode) in &nodes {
        let pos = placed.pos;
        let (kind, xattr_size) = p.kind(inode, placed).unwrap();
        assert!(pos >= end, "overlap at {pos}");
        assert_eq!(pos % 32, 0);
        let head = 64 + xattr_size as u64;
        assert!(pos % 512 + 64 <= 512, "inode across blocks at {pos}");
        let tail = kind.inline_bytes();
        if tail > 0 {
            assert!(
                pos % 512 + head + tail <= 512,
                "tail across blocks at {pos}"
            );
        }
        end = pos + head + tail;
    }
}

#[test]
fn the_image_is_the_same_but_for_its_uuid() {
    let mut l = Layer::new();
    let d = l.dir(ROOT, "etc");
    l.file(d, "passwd", b"root:x:0:0::/root:/bin/sh\n");
    l.symlink(ROOT, "bin", b"usr/bin");
    let (a, la) = l.write();
    let (b, lb) = l.write();
    assert_eq!(la.unwrap(), lb.unwrap());
    let (mut a, mut b) = (
        read(&a.path().join("layer.erofs")),
        read(&b.path().join("layer.erofs")),
    );
    assert_ne!(a[1024 + 48..1024 + 64], b[1024 + 48..1024 + 64]);
    a[1024 + 48..1024 + 64].fill(0);
    b[1024 + 48..1024 + 64].fill(0);
    assert!(a == b);
    assert_eq!(a.len() % 512, 0);
}

#[test]
fn staged_data_follows_the_metadata_at_a_block() {
    let mut l = Layer::new();
    l.staging = Some(vec![9; 1000]);
    let f = Inode {
        size: 1000,
        data: Data::Staged {
            chunkbits: 1,
            chunks: vec![Some(0)],
        },
        ..inode(libc::S_IFREG | 0o600)
    };
    l.add(ROOT, "s", f);
    let (dir, layout) = l.write();
    let layout = layout.unwrap();
    assert_eq!(layout.staged_offset % 512, 0);
    assert_eq!(layout.image_bytes, layout.staged_offset + 1024);
    let image = read(&dir.path().join("layer.erofs"));
    let at = layout.staged_offset as usize;
    assert_eq!(&image[at..at + 1000], &[9; 1000][..]);
    assert_eq!(layout.inodes, 2);
}

// ---- refusals ----------------------------------------------------------

fn refusal(l: &Layer) -> Error {
    match l.write().1 {
        Ok(_) => panic!("written"),
        Err(e) => e,
    }
}

#[test]
fn unknown_xattr_prefixes_are_named() {
    let mut l = Layer::new();
    let d = l.dir(ROOT, "d");
    let f = l.file(d, "f", b"x");
    l.edit(f, |i| i.xattrs.push((b"foo.bar".to_vec(), b"1".to_vec())));
    let e = refusal(&l);
    assert!(matches!(e, Error::Unrepresentable { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("foo.bar") && text.contains("/d/f"), "{text}");
}

#[test]
fn oversized_fields_are_unrepresentable() {
    let cases: &[fn(&mut Layer)] = &[
        |l| {
            let f = l.file(ROOT, "f", b"");
            l.edit(f, |i| {
                i.xattrs.push((b"user.big".to_vec(), vec![0; 65_536]))
            });
        },
        |l| {
            let f = l.file(ROOT, "f", b"");
            let name = [b"user.".to_vec(), vec![b'n'; 256]].concat();
            l.edit(f, |i| i.xattrs.push((name.clone(), Vec::new())));
        },
        |l| {
            l.file(ROOT, "a/b", b"");
        },
        |l| {
            l.file(ROOT, vec![b'n'; 256], b"");
        },
        |l| {
            l.file(ROOT, "..", b"");
        },
        |l| {
            l.symlink(ROOT, "l", &[b'a'; 4096]);
        },
        |l| {
            let dev = Inode {
                major: 4096,
                ..inode(libc::S_IFCHR | 0o600)
            };
            l.add(ROOT, "c", dev);
        },
        |l| {
            l.add(ROOT, "m", inode(0o170000 | 0o644));
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut l = Layer::new();
        case(&mut l);
        let e = refusal(&l);
        assert!(matches!(e, Error::Unrepresentable { .. }), "case {i}: {e}");
    }
}

#[test]
fn inconsistent_trees_are_invalid() {
    let cases: &[fn(&mut Layer)] = &[
        // A directory named twice.
        |l| {
            let d = l.dir(ROOT, "d");
            l.link(ROOT, "again", d);
        },
        // The root named.
        |l| l.link(ROOT, "root", ROOT),
        // Tar data past the tar's end.
        |l| {
            let f = Inode {
                size: 10_000,
                data: Data::Tar { offset: 512 },
                ..inode(libc::S_IFREG | 0o644)
            };
            l.add(ROOT, "f", f);
        },
        // An unaligned tar offset.
        |l| {
            l.tar = vec![0; 4096];
            let f = Inode {
                size: 10,
                data: Data::Tar { offset: 100 },
                ..inode(libc::S_IFREG | 0o644)
            };
            l.add(ROOT, "f", f);
        },
        // Chunks that do not cover the size.
        |l| {
            l.staging = Some(vec![0; 4096]);
            let f = Inode {
                size: 5000,
                data: Data::Staged {
                    chunkbits: 0,
                    chunks: vec![Some(0)],
                },
                ..inode(libc::S_IFREG | 0o644)
            };
            l.add(ROOT, "f", f);
        },
        // Staged data without a staging file.
        |l| {
            let f = Inode {
                size: 10,
                data: Data::Staged {
                    chunkbits: 0,
                    chunks: vec![Some(0)],
                },
                ..inode(libc::S_IFREG | 0o644)
            };
            l.add(ROOT, "f", f);
        },
        // Bytes for an empty-data file.
        |l| {
            let f = Inode {
                size: 10,
                ..inode(libc::S_IFREG | 0o644)
            };
            l.add(ROOT, "f", f);
        },
        // A symlink without a target.
        |l| {
            l.add(ROOT, "l", inode(libc::S_IFLNK | 0o777));
        },
        // The same xattr twice.
        |l| {
            let f = l.file(ROOT, "f", b"");
            let x = (b"user.a".to_vec(), b"1".to_vec());
            l.edit(f, |i| i.xattrs = vec![x.clone(), x.clone()]);
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut l = Layer::new();
        case(&mut l);
        let e = refusal(&l);
        assert!(matches!(e, Error::Invalid { .. }), "case {i}: {e}");
    }
}

// ---- through the kernel ------------------------------------------------

#[test]
fn modes_owners_and_times_as_root() {
    let mut l = Layer::new();
    l.edit(0, |i| i.mtime = 1_234_567_890);
    l.edit(0, |i| i.mtime_nsec = 42);
    let cases: [(&str, u32, u32, u32, i64, u32); 6] = [
        (
            "setuid",
            libc::S_IFREG | 0o4755,
            0,
            0,
            1_700_000_000,
            123_456_789,
        ),
        ("setgid", libc::S_IFREG | 0o2711, 70_000, 80_000, 0, 1),
        (
            "sticky",
            libc::S_IFDIR | 0o1777,
            4_000_000_000,
            65_536,
            -1,
            999_999_999,
        ),
        ("old", libc::S_IFREG | 0o400, 65_535, 1, -2_000_000_000, 500),
        ("future", libc::S_IFREG, 1, 2, 33_000_000_000, 0),
        ("gdir", libc::S_IFDIR | 0o2750, 3, 4, 86_400, 7),
    ];
    for (name, mode, uid, gid, mtime, nsec) in cases {
        let i = Inode {
            uid,
            gid,
            mtime,
            mtime_nsec: nsec,
            ..inode(mode)
        };
        l.add(ROOT, name, i);
    }
    let Some(m) = l.mount() else { return };
    let root = std::fs::metadata(&m.mnt).unwrap();
    assert_eq!((root.mtime(), root.mtime_nsec()), (1_234_567_890, 42));
    for (name, mode, uid, gid, mtime, nsec) in cases {
        let md = std::fs::symlink_metadata(m.path(name)).unwrap();
        assert_eq!(md.mode(), mode, "{name}");
        assert_eq!((md.uid(), md.gid()), (uid, gid), "{name}");
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (mtime, i64::from(nsec)),
            "{name}"
        );
    }
}

#[test]
fn is_mounted_tells_the_mount_point_as_root() {
    let mut l = Layer::new();
    l.dir(ROOT, "sub");
    let Some(m) = l.mount() else { return };
    assert!(is_mounted(&m.mnt).unwrap());
    assert!(!is_mounted(&m.path("sub")).unwrap());
    assert!(!is_mounted(m.mnt.parent().unwrap()).unwrap());
    let mnt = m.mnt.clone();
    drop(m);
    assert!(!is_mounted(&mnt).unwrap());
}

#[test]
fn file_contents_as_root() {
    let mut l = Layer::new();
    let d = l.dir(ROOT, "data");
    let mut want = Vec::new();
    for (i, len) in [
        1usize, 100, 511, 512, 513, 4095, 4096, 4097, 65_536, 1_048_579,
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = pattern(len, i as u8);
        let name = format!("f{len}");
        l.file(d, &name, &bytes);
        want.push((name, bytes));
    }
    l.file(d, "empty-tar", b"");
    l.add(d, "empty", inode(libc::S_IFREG | 0o644));

    // Staged: 4 KiB chunks, some of them holes.
    let (a, b, c) = (pattern(4096, 7), pattern(4096, 8), pattern(100, 9));
    let mut staging = vec![0u8; 17 * 512];
    staging[..4096].copy_from_slice(&a);
    staging[4096..8192].copy_from_slice(&b);
    staging[8192..8292].copy_from_slice(&c);
    let sparse = Inode {
        size: 5 * 4096 + 100,
        data: Data::Staged {
            chunkbits: 3,
            chunks: vec![Some(0), None, Some(8), None, None, Some(16)],
        },
        ..inode(libc::S_IFREG | 0o644)
    };
    l.add(d, "sparse", sparse);
    // A hole of 8 GiB before 4 KiB of data (chunks of 512 MiB).
    staging.resize(24 * 512, 0);
    let tail = pattern(4096, 10);
    staging.extend_from_slice(&tail);
    let mut chunks = vec![None; 16];
    chunks.push(Some(24));
    let huge = Inode {
        size: (16u64 << 29) + 4096,
        data: Data::Staged {
            chunkbits: 20,
            chunks,
        },
        ..inode(libc::S_IFREG | 0o644)
    };
    l.add(d, "huge-hole", huge);
    l.staging = Some(staging);

    let Some(m) = l.mount() else { return };
    for (name, bytes) in &want {
        let got = read(&m.path(format!("data/{name}")));
        assert!(got == *bytes, "{name}: {} bytes read", got.len());
    }
    assert!(read(&m.path("data/empty")).is_empty());
    assert!(read(&m.path("data/empty-tar")).is_empty());

    let mut sparse_want = a.clone();
    sparse_want.extend_from_slice(&[0; 4096]);
    sparse_want.extend_from_slice(&b);
    sparse_want.extend_from_slice(&[0; 8192]);
    sparse_want.extend_from_slice(&c);
    assert!(read(&m.path("data/sparse")) == sparse_want);

    let f = File::open(m.path("data/huge-hole")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (16u64 << 29) + 4096);
    let mut buf = vec![1u8; 1 << 20];
    for at in [0u64, 4 << 30, (16u64 << 29) - (1 << 20)] {
        f.read_exact_at(&mut buf, at).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "non-zero hole at {at}");
    }
    let mut end = vec![0u8; 4096];
    f.read_exact_at(&mut end, 16u64 << 29).unwrap();
    assert!(end == tail);
    let data_at = nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekData).unwrap();
    assert_eq!(data_at, 16i64 << 29);
    assert!(m.layout.staged_offset > 0);
}

/// A tar member of `size` bytes in a sparse tar, with marks written at
/// `marks` (offsets in the file) and read back through the mount.
fn big_tar_member(size: u64, marks: &[u64]) {
    let mut l = Layer::new();
    l.tar = vec![0; 512];
    let big = Inode {
        size,
        data: Data::Tar { offset: 512 },
        ..inode(libc::S_IFREG | 0o644)
    };
    l.add(ROOT, "big", big);
    let tar_len = (512 + size).next_multiple_of(512) + 1024;
    let marks: Vec<(u64, Vec<u8>)> = marks
        .iter()
        .enumerate()
        .map(|(i, &at)| (at, pattern(512.min((size - at) as usize), i as u8)))
        .collect();
    let patches: Vec<(u64, &[u8])> = marks.iter().map(|(at, b)| (512 + at, &b[..])).collect();
    let Some(m) = l.mount_with(tar_len, &patches) else {
        return;
    };
    let f = File::open(m.path("big")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    for (at, want) in &marks {
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, *at).unwrap();
        assert!(got == *want, "at {at}");
    }
    let mut past = [0u8; 16];
    assert_eq!(f.read_at(&mut past, size).unwrap(), 0);
}

#[test]
fn tar_file_over_4_gib_as_root() {
    let size = (4u64 << 30) + 1000;
    big_tar_member(size, &[0, (4 << 30) - 256, size - 512]);
}

/// Past the largest chunk (1 TiB): two chunks, read across their border.
#[test]
fn tar_file_over_1_tib_as_root() {
    let size = (1u64 << 40) + 4096;
    big_tar_member(size, &[0, (1 << 40) - 256, size - 100]);
}

#[test]
fn symlinks_as_root() {
    let mut l = Layer::new();
    let d = l.dir(ROOT, "l");
    let mut want = Vec::new();
    let target = |len: usize| -> Vec<u8> {
        let mut t = format!("/{len}/").into_bytes();
        t.extend(pattern(len, 5).iter().map(|b| b'a' + b % 26));
        t.truncate(len);
        t
    };
    for len in (1..=700).chain([1023, 1024, 1025, 2048, 4094, 4095]) {
        let t = target(len);
        let id = l.symlink(d, format!("{len:04}"), &t);
        if len % 5 == 0 {
            // Xattrs push the tail towards the block's end.
            l.edit(id, |i| {
                i.xattrs
                    .push((b"trusted.pad".to_vec(), vec![b'p'; len % 97]))
            });
        }
        want.push((format!("{len:04}"), t, len % 5 == 0));
    }
    l.symlink(ROOT, "short", b"l/0001");
    let fat = l.symlink(ROOT, "fat", b"l/0002");
    l.edit(fat, |i| {
        i.xattrs.push((b"trusted.fat".to_vec(), vec![b'f'; 1000]))
    });
    let Some(m) = l.mount() else { return };
    for (name, t, has_xattr) in &want {
        let p = m.path(format!("l/{name}"));
        let got = std::fs::read_link(&p).unwrap();
        assert_eq!(got.as_os_str().as_bytes(), &t[..], "{name}");
        assert_eq!(std::fs::symlink_metadata(&p).unwrap().len(), t.len() as u64);
        if *has_xattr {
            let v = xattr::get(&p, "trusted.pad").unwrap().unwrap();
            assert_eq!(v.len(), t.len() % 97, "{name}");
        }
    }
    assert_eq!(
        std::fs::read_link(m.path("short")).unwrap(),
        Path::new("l/0001")
    );
    assert_eq!(
        std::fs::read_link(m.path("fat")).unwrap(),
        Path::new("l/0002")
    );
    assert_eq!(
        xattr::get(m.path("fat"), "trusted.fat").unwrap(),
        Some(vec![b'f'; 1000])
    );
}

#[test]
fn hardlinks_share_an_inode_as_root() {
    let mut l = Layer::new();
    let (a, b) = (l.dir(ROOT, "a"), l.dir(ROOT, "b"));
    let f = l.file(a, "f", b"shared bytes");
    l.link(b, "g", f);
    l.link(ROOT, "h", f);
    let two = l.file(ROOT, "two", b"2");
    l.link(a, "two", two);
    let dev = Inode {
        major: 1,
        minor: 3,
        ..inode(libc::S_IFCHR | 0o666)
    };
    let null = l.add(a, "null", dev);
    l.link(b, "null", null);
    let Some(m) = l.mount() else { return };
    let md: Vec<_> = ["a/f", "b/g", "h"]
        .iter()
        .map(|p| std::fs::metadata(m.path(p)).unwrap())
        .collect();
    assert!(md.iter().all(|x| x.ino() == md[0].ino() && x.nlink() == 3));
    assert_eq!(read(&m.path("b/g")), b"shared bytes");
    let (t1, t2) = (
        std::fs::metadata(m.path("two")).unwrap(),
        std::fs::metadata(m.path("a/two")).unwrap(),
    );
    assert_eq!((t1.ino(), t1.nlink()), (t2.ino(), 2));
    assert_ne!(t1.ino(), md[0].ino());
    let (n1, n2) = (
        std::fs::symlink_metadata(m.path("a/null")).unwrap(),
        std::fs::symlink_metadata(m.path("b/null")).unwrap(),
    );
    assert_eq!((n1.ino(), n1.nlink()), (n2.ino(), 2));
}

#[test]
fn special_files_as_root() {
    let mut l = Layer::new();
    let devs: [(&str, u32, u32, u32); 5] = [
        ("null", libc::S_IFCHR | 0o666, 1, 3),
        ("big-char", libc::S_IFCHR | 0o600, 259, 300_000),
        ("max-char", libc::S_IFCHR | 0o600, 0xfff, 0xf_ffff),
        ("sda1", libc::S_IFBLK | 0o660, 8, 1),
        ("whiteout", libc::S_IFCHR, 0, 0),
    ];
    for (name, mode, major, minor) in devs {
        let i = Inode {
            major,
            minor,
            ..inode(mode)
        };
        l.add(ROOT, name, i);
    }
    l.add(ROOT, "fifo", inode(libc::S_IFIFO | 0o644));
    l.add(ROOT, "sock", inode(libc::S_IFSOCK | 0o755));
    let Some(m) = l.mount() else { return };
    for (name, mode, major, minor) in devs {
        let md = std::fs::symlink_metadata(m.path(name)).unwrap();
        assert_eq!(md.mode(), mode, "{name}");
        let rdev = md.rdev();
        assert_eq!(
            (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
            (u64::from(major), u64::from(minor)),
            "{name}"
        );
    }
    let fifo = std::fs::symlink_metadata(m.path("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.rdev(), 0);
    let sock = std::fs::symlink_metadata(m.path("sock")).unwrap();
    assert!(sock.file_type().is_socket());
    let types: Vec<(Vec<u8>, u8)> = raw_entries(&m.mnt)
        .into_iter()
        .map(|(n, _, t)| (n, t))
        .collect();
    for (name, t) in [
        ("null", libc::DT_CHR),
        ("sda1", libc::DT_BLK),
        ("fifo", libc::DT_FIFO),
        ("sock", libc::DT_SOCK),
        (".", libc::DT_DIR),
    ] {
        assert!(types.contains(&(name.as_bytes().to_vec(), t)), "{name}");
    }
}

#[test]
fn xattrs_as_root() {
    // A v2 file capability (cap_net_bind_service+ep, inheritable with
    // bits 1 and 3): binary with 0x0a and 0x00 bytes.
    let cap: Vec<u8> = vec![
        0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
    let mut acl = vec![2, 0, 0, 0];
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let big = pattern(65_535, 11);
    let xattrs: Vec<(String, Vec<u8>)> = vec![
        ("user.plain".into(), b"value".to_vec()),
        ("user.empty".into(), Vec::new()),
        ("user.binary".into(), vec![0, 10, 0, 255, 10]),
        ("trusted.overlay.opaque".into(), b"y".to_vec()),
        ("security.capability".into(), cap),
        ("system.posix_acl_access".into(), acl.clone()),
        ("user.big".into(), big),
        (format!("user.{}", "n".repeat(200)), b"long name".to_vec()),
    ];
    let mut l = Layer::new();
    let f = l.file(ROOT, "f", b"file with xattrs");
    l.edit(f, |i| {
        i.xattrs = xattrs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.clone()))
            .collect()
    });
    let d = l.dir(ROOT, "d");
    l.edit(d, |i| {
        i.xattrs = vec![
            (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
            (b"system.posix_acl_default".to_vec(), acl.clone()),
        ]
    });
    let s = l.symlink(ROOT, "s", b"f");
    l.edit(s, |i| {
        i.xattrs = vec![(b"trusted.t".to_vec(), b"on a link".to_vec())]
    });
    l.file(ROOT, "none", b"");
    let Some(m) = l.mount() else { return };

    let p = m.path("f");
    for (name, value) in &xattrs {
        let got = xattr::get(&p, name).unwrap();
        assert_eq!(got.as_deref(), Some(&value[..]), "{name}");
    }
    let listed: BTreeSet<String> = xattr::list(&p)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = xattrs.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed, want);
    assert_eq!(read(&p), b"file with xattrs");
    assert_eq!(xattr::get(&p, "user.absent").unwrap(), None);

    let d = m.path("d");
    assert_eq!(
        xattr::get(&d, "trusted.overlay.opaque").unwrap().as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr::get(&d, "system.posix_acl_default").unwrap(),
        Some(acl)
    );
    assert_eq!(
        xattr::get(m.path("s"), "trusted.t").unwrap().as_deref(),
        Some(&b"on a link"[..])
    );
    assert_eq!(xattr::list(m.path("none")).unwrap().count(), 0);
}

#[test]
fn large_directory_as_root() {
    let mut l = Layer::new();
    let d = l.dir(ROOT, "big");
    let fill = [b'a', b'!', 0x01, 0xff, b' ', b'-', 0xc3, b'.', b'Z'];
    let mut names: Vec<Vec<u8>> = (0..5000usize)
        .map(|i| {
            let mut n = format!("{i}_").into_bytes();
            let len = 1 + (i * 37) % 255;
            n.resize(len.max(n.len()), fill[i % fill.len()]);
            n
        })
        .collect();
    for special in [
        &b"!"[..],
        b"-",
        b"\x01",
        b"+plus",
        b",",
        b"\x7f",
        b"\xff\xfe",
        b"...",
        b".a",
        b"a..",
    ] {
        names.push(special.to_vec());
    }
    names.push(vec![b'z'; 255]);
    names.push(vec![0xfe; 255]);
    for (i, name) in names.iter().enumerate() {
        let i = i as u32;
        let node = match i % 10 {
            0 => Inode {
                uid: i,
                ..dir_inode()
            },
            1 => Inode {
                uid: i,
                data: Data::Symlink(name.clone()),
                ..inode(libc::S_IFLNK | 0o777)
            },
            _ => Inode {
                uid: i,
                ..inode(libc::S_IFREG | 0o644)
            },
        };
        l.add(d, name, node);
    }
    let Some(m) = l.mount() else { return };
    let big = m.path("big");
    let listed: BTreeSet<Vec<u8>> = std::fs::read_dir(&big)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    let want: BTreeSet<Vec<u8>> = names.iter().cloned().collect();
    assert_eq!(listed.len(), want.len());
    assert!(listed == want);
    for (i, name) in names.iter().enumerate() {
        let md = std::fs::symlink_metadata(big.join(OsStr::from_bytes(name)))
            .unwrap_or_else(|e| panic!("lookup {:?}: {e}", String::from_utf8_lossy(name)));
        assert_eq!(md.uid(), i as u32, "{:?}", String::from_utf8_lossy(name));
        let is = match i % 10 {
            0 => md.is_dir(),
            1 => md.file_type().is_symlink(),
            _ => md.is_file(),
        };
        assert!(is, "{:?}", String::from_utf8_lossy(name));
    }
    for absent in ["5000_", "0", "zz", "-x", "....", ".b"] {
        assert!(
            std::fs::symlink_metadata(big.join(absent)).is_err(),
            "{absent}"
        );
    }
    let subdirs = names.len().div_ceil(10) as u64;
    assert_eq!(std::fs::metadata(&big).unwrap().nlink(), 2 + subdirs);
}

#[test]
fn directories_of_every_size_as_root() {
    let mut l = Layer::new();
    let mut want = Vec::new();
    for k in 0..90usize {
        let d = l.dir(ROOT, format!("d{k:02}"));
        if k % 4 == 1 {
            l.edit(d, |i| {
                i.xattrs.push((b"user.k".to_vec(), vec![b'k'; k * 3]))
            });
        }
        if k % 10 == 3 {
            // Inode and xattrs alone fill a block: no inline tail.
            l.edit(d, |i| {
                i.xattrs.push((b"user.big".to_vec(), vec![b'b'; 700]))
            });
        }
        let names: Vec<String> = (0..k)
            .map(|j| format!("{j}{}", "n".repeat((k * 7 + j * 13) % 60)))
            .collect();
        for n in &names {
            l.add(d, n, inode(libc::S_IFREG | 0o644));
        }
        want.push((format!("d{k:02}"), names));
    }
    let Some(m) = l.mount() else { return };
    let root_ino = std::fs::metadata(&m.mnt).unwrap().ino();
    for (d, names) in &want {
        let p = m.path(d);
        let ino = std::fs::metadata(&p).unwrap().ino();
        let raw = raw_entries(&p);
        let mut listed: Vec<Vec<u8>> = raw.iter().map(|(n, _, _)| n.clone()).collect();
        listed.sort();
        let mut expect: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
        expect.push(b".".to_vec());
        expect.push(b"..".to_vec());
        expect.sort();
        assert_eq!(listed, expect, "{d}");
        for (n, i, _) in &raw {
            match &n[..] {
                b"." => assert_eq!(*i, ino, "{d}/."),
                b".." => assert_eq!(*i, root_ino, "{d}/.."),
                _ => {
                    let md = std::fs::symlink_metadata(p.join(OsStr::from_bytes(n))).unwrap();
                    assert_eq!(md.ino(), *i, "{d}/{}", String::from_utf8_lossy(n));
                }
            }
        }
    }
}

#[test]
fn deep_nesting_and_directory_links_as_root() {
    let mut l = Layer::new();
    let mut d = ROOT;
    for _ in 0..300 {
        d = l.dir(d, "d");
    }
    l.file(d, "bottom", b"deep");
    let wide = l.dir(ROOT, "wide");
    for k in 0..3 {
        l.dir(wide, format!("s{k}"));
    }
    l.file(wide, "f", b"");
    let Some(m) = l.mount() else { return };
    let deep: PathBuf = std::iter::repeat_n("d", 300).collect();
    assert_eq!(read(&m.mnt.join(&deep).join("bottom")), b"deep");
    assert_eq!(std::fs::metadata(&m.mnt).unwrap().nlink(), 2 + 2);
    assert_eq!(std::fs::metadata(m.path("wide")).unwrap().nlink(), 2 + 3);
    assert_eq!(std::fs::metadata(m.path("d/d")).unwrap().nlink(), 3);
    assert_eq!(std::fs::metadata(m.mnt.join(&deep)).unwrap().nlink(), 2);
    // `..` entries name the parent.
    let mut parent = std::fs::metadata(&m.mnt).unwrap().ino();
    let mut p = m.mnt.clone();
    for _ in 0..300 {
        p.push("d");
        let dotdot = raw_entries(&p)
            .into_iter()
            .find(|(n, _, _)| n == b"..")
            .unwrap();
        assert_eq!(dotdot.1, parent);
        parent = std::fs::metadata(&p).unwrap().ino();
    }
}

#[test]
fn many_entries_as_root() {
    let mut l = Layer::new();
    let mut total = 0;
    for d in 0..100 {
        let dir = l.dir(ROOT, format!("dir{d:03}"));
        for f in 0..1000 {
            if f % 250 == 0 {
                l.file(dir, format!("file{f:04}"), format!("{d}/{f}").as_bytes());
            } else {
                l.add(dir, format!("file{f:04}"), inode(libc::S_IFREG | 0o644));
            }
            total += 1;
        }
    }
    let started = std::time::Instant::now();
    let Some(m) = l.mount() else { return };
    eprintln!(
        "{} inodes, {} bytes of image, written and mounted in {:?}",
        m.layout.inodes,
        m.layout.image_bytes,
        started.elapsed()
    );
    assert_eq!(m.layout.inodes, 1 + 100 + total);
    let mut seen = 0;
    for d in std::fs::read_dir(&m.mnt).unwrap() {
        seen += std::fs::read_dir(d.unwrap().path()).unwrap().count() as u64;
    }
    assert_eq!(seen, total);
    assert_eq!(read(&m.path("dir042/file0750")), b"42/750");
}

/// Unmounts on drop (declared after what it stacks on, so it goes first).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = crate::mount::unmount_all(&self.0) {
            eprintln!("unmounting {}: {e}", self.0.display());
        }
    }
}

#[test]
fn overlay_hides_whiteouts_and_opaque_directories_as_root() {
    let mut lower = Layer::new();
    let a = lower.dir(ROOT, "a");
    lower.file(a, "file1", b"one");
    lower.file(a, "file2", b"two");
    let b = lower.dir(ROOT, "b");
    lower.file(b, "x", b"x");
    lower.file(ROOT, "c", b"c");
    lower.file(ROOT, "keep", b"keep");

    let whiteout = || inode(libc::S_IFCHR);
    let mut upper = Layer::new();
    let a = upper.dir(ROOT, "a");
    upper.add(a, "file1", whiteout());
    upper.file(a, "new3", b"three");
    let b = upper.dir(ROOT, "b");
    upper.edit(b, |i| {
        i.xattrs
            .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()))
    });
    upper.file(b, "y", b"y");
    upper.add(ROOT, "c", whiteout());

    let Some(low) = lower.mount() else { return };
    let Some(up) = upper.mount() else { return };
    let merged = tempfile::tempdir().unwrap();
    let options = format!("lowerdir={}:{}", up.mnt.display(), low.mnt.display());
    nix::mount::mount(
        Some("overlay"),
        merged.path(),
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .unwrap();
    let _unmount = Unmount(merged.path().to_path_buf());

    let names = |rel: &str| -> BTreeSet<String> {
        std::fs::read_dir(merged.path().join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };
    assert_eq!(names(""), set(&["a", "b", "keep"]));
    assert_eq!(names("a"), set(&["file2", "new3"]));
    assert_eq!(names("b"), set(&["y"]));
    assert!(!merged.path().join("a/file1").exists());
    assert!(!merged.path().join("b/x").exists());
    assert!(!merged.path().join("c").exists());
    assert_eq!(read(&merged.path().join("a/file2")), b"two");
    assert_eq!(read(&merged.path().join("a/new3")), b"three");
    assert_eq!(read(&merged.path().join("keep")), b"keep");
}
