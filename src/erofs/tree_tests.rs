//! The tree's two stores answer alike: every call is made on a tree held
//! in memory and on one spilled to disk from its first inode, and their
//! answers compared; a tree that outgrows its budget moves to disk with
//! everything in it.

use super::*;

fn inode(mode: u32) -> Inode {
    Inode {
        uid: 1,
        gid: 2,
        mtime: -5,
        mtime_nsec: 999_999_999,
        ..Inode::empty(mode)
    }
}

/// A tree in memory and its spilled twin, driven together.
struct Twins {
    memory: Tree,
    spilled: Tree,
    _dir: tempfile::TempDir,
}

impl Twins {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill {
            path: dir.path().join("index"),
            budget: 0,
        };
        let spilled = Tree::with_spill(inode(libc::S_IFDIR | 0o755), spill).unwrap();
        assert!(spilled.spilled());
        Twins {
            memory: Tree::new(inode(libc::S_IFDIR | 0o755)),
            spilled,
            _dir: dir,
        }
    }

    fn both<T: PartialEq + std::fmt::Debug>(&mut self, call: impl Fn(&mut Tree) -> T) -> T {
        let a = call(&mut self.memory);
        let b = call(&mut self.spilled);
        assert_eq!(a, b);
        a
    }
}

fn listing(t: &Tree, dir: NodeId, batch: usize) -> Vec<Entry> {
    let mut all = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let got = t.entries(dir, after.as_deref(), batch).unwrap();
        assert!(got.len() <= batch);
        let Some(last) = got.last() else { break };
        after = Some(last.name.clone());
        all.extend(got);
    }
    all
}

#[test]
fn every_kind_of_inode_reads_back_as_written() {
    let mut t = Twins::new();
    let inodes = [
        Inode {
            xattrs: vec![
                (b"user.a".to_vec(), Vec::new()),
                (b"security.capability".to_vec(), vec![0, 1, 255, 0]),
            ],
            size: u64::MAX,
            data: Data::Tar {
                offset: u64::MAX - 511,
            },
            ..inode(libc::S_IFREG | 0o4755)
        },
        Inode {
            data: Data::Symlink(b"../some where".to_vec()),
            ..inode(libc::S_IFLNK | 0o777)
        },
        Inode {
            size: 5 << 20,
            data: Data::Staged {
                chunkbits: 11,
                chunks: vec![Some(0), None, Some(u64::MAX - 1), None, Some(7)],
            },
            ..inode(libc::S_IFREG | 0o600)
        },
        Inode {
            major: u32::MAX,
            minor: 7,
            ..inode(libc::S_IFCHR)
        },
        Inode {
            mtime: i64::MIN,
            uid: u32::MAX,
            gid: u32::MAX,
            ..inode(libc::S_IFIFO | 0o644)
        },
    ];
    for i in inodes {
        let id = t.both(|tree| tree.add(i.clone()).unwrap());
        assert_eq!(t.both(|tree| tree.inode(id).unwrap().into_owned()), i);
    }
    assert_eq!(t.both(|tree| tree.len()), 6);
    t.both(|tree| {
        tree.update(1, |i| i.xattrs.push((b"user.b".to_vec(), b"2".to_vec())))
            .unwrap()
    });
    t.both(|tree| tree.update(1, |i| i.mode |= 0o20).unwrap());
    let got = t.both(|tree| tree.inode(1).unwrap().into_owned());
    assert_eq!((got.xattrs.len(), got.mode & 0o7777), (3, 0o4775));
    assert!(
        t.both(|tree| tree.inode(6).map(|_| ()).map_err(|e| e.to_string()))
            .is_err()
    );
}

#[test]
fn entries_come_in_byte_order_in_bounded_batches() {
    let mut t = Twins::new();
    let d = t.both(|tree| tree.add(inode(libc::S_IFDIR | 0o755)).unwrap());
    t.both(|tree| tree.link(ROOT, b"d", d).unwrap());
    let names: Vec<Vec<u8>> = (0..300u32)
        .map(|k| match k % 4 {
            0 => format!("f{k}").into_bytes(),
            1 => [&[b'-', 0xff][..], &k.to_be_bytes()].concat(),
            2 => [&[0xc3, b'x'][..], &k.to_le_bytes()].concat(),
            _ => format!(".{k}").into_bytes(),
        })
        .collect();
    for (k, name) in names.iter().enumerate() {
        let id = t.both(|tree| tree.add(inode(libc::S_IFREG | 0o644)).unwrap());
        assert_eq!(t.both(|tree| tree.link(d, name, id).unwrap()), None, "{k}");
    }
    let mut want: Vec<Vec<u8>> = names.clone();
    want.sort();
    for batch in [1, 7, 1000] {
        let got = t.both(|tree| listing(tree, d, batch));
        let got_names: Vec<Vec<u8>> = got.iter().map(|e| e.name.clone()).collect();
        assert_eq!(got_names, want, "batch {batch}");
    }
    // A replaced entry says what it replaced; a lookup sees the new one.
    let again = t.both(|tree| tree.add(inode(libc::S_IFREG)).unwrap());
    let old = t.both(|tree| tree.child(d, &names[0]).unwrap());
    assert_eq!(t.both(|tree| tree.link(d, &names[0], again).unwrap()), old);
    assert_eq!(
        t.both(|tree| tree.child(d, &names[0]).unwrap()),
        Some(again)
    );
    assert_eq!(t.both(|tree| tree.child(d, b"missing").unwrap()), None);
    // No entries below a file, and none can be made.
    assert!(t.both(|tree| listing(tree, again, 10)).is_empty());
    let refused = t.both(|tree| tree.link(again, b"x", d).map_err(|e| e.to_string()));
    assert!(refused.is_err());
    let refused = t.both(|tree| tree.link(ROOT, b"x", 1_000).map_err(|e| e.to_string()));
    assert!(refused.is_err());
}

#[test]
fn marks_and_placements_are_kept_and_cleared() {
    let mut t = Twins::new();
    let f = t.both(|tree| tree.add(inode(libc::S_IFREG)).unwrap());
    t.both(|tree| tree.link(ROOT, b"f", f).unwrap());
    assert!(!t.both(|tree| tree.marked(f).unwrap()));
    t.both(|tree| tree.mark(f).unwrap());
    assert!(t.both(|tree| tree.marked(f).unwrap()));
    // A mark survives a change of the inode.
    t.both(|tree| tree.update(f, |i| i.uid = 9).unwrap());
    assert!(t.both(|tree| tree.marked(f).unwrap()));
    assert!(!t.both(|tree| tree.marked(ROOT).unwrap()));

    let p = Placed {
        seq: 1,
        parent: ROOT,
        nlink: 3,
        pos: u64::from(u32::MAX) << 5,
        size: u64::MAX,
    };
    t.both(|tree| tree.place(f, p).unwrap());
    assert_eq!(t.both(|tree| tree.placed(f).unwrap()), Some(p));
    assert_eq!(t.both(|tree| tree.placed(ROOT).unwrap()), None);
    let first = |tree: &mut Tree| tree.in_order(1, 1).unwrap().first().map(|n| n.0);
    assert_eq!(t.both(first), Some(f));
    let listed = t.both(|tree| listing(tree, ROOT, 10));
    assert_eq!(listed[0].placed, Some(p));
    assert_eq!(listed[0].mode, libc::S_IFREG);
    t.both(|tree| tree.place(f, Placed { nlink: 4, ..p }).unwrap());
    assert_eq!(
        t.both(|tree| tree.placed(f).unwrap().map(|p| p.nlink)),
        Some(4)
    );
    // Placements made before a later add still read back.
    let g = t.both(|tree| tree.add(inode(libc::S_IFREG)).unwrap());
    assert_eq!(t.both(|tree| tree.placed(g).unwrap()), None);
    t.both(|tree| tree.clear_placements().unwrap());
    assert_eq!(t.both(|tree| tree.placed(f).unwrap()), None);
    assert_eq!(t.both(first), None);
}

#[test]
fn a_tree_over_its_budget_moves_to_disk_whole_and_its_file_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    let spill = Spill {
        path: path.clone(),
        budget: 64 << 10,
    };
    let mut t = Tree::with_spill(inode(libc::S_IFDIR | 0o755), spill).unwrap();
    let mut k = 0u32;
    while !t.spilled() {
        let id = t
            .add(Inode {
                xattrs: vec![(b"user.k".to_vec(), k.to_le_bytes().to_vec())],
                ..inode(libc::S_IFREG | 0o644)
            })
            .unwrap();
        t.link(ROOT, format!("file-{k:06}").as_bytes(), id).unwrap();
        if k.is_multiple_of(10) {
            t.mark(id).unwrap();
        }
        let p = Placed {
            seq: k,
            parent: ROOT,
            nlink: 1,
            pos: u64::from(k) * 32,
            size: 0,
        };
        t.place(id, p).unwrap();
        k += 1;
        assert!(k < 10_000, "never spilled");
    }
    assert!(
        k > 100,
        "spilled after {k} entries: the budget is not counted"
    );
    assert!(path.exists());
    for j in 0..k {
        let id = t
            .child(ROOT, format!("file-{j:06}").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(id, j + 1);
        let i = t.inode(id).unwrap();
        assert_eq!(i.xattrs[0].1, j.to_le_bytes());
        assert_eq!(t.marked(id).unwrap(), j.is_multiple_of(10));
        let p = t.placed(id).unwrap().unwrap();
        assert_eq!((p.seq, p.pos), (j, u64::from(j) * 32));
        assert_eq!(t.in_order(j, 1).unwrap()[0].0, id);
    }
    let batch = t.in_order(k - 3, 10).unwrap();
    assert_eq!(batch.len(), 3);
    assert_eq!(batch[0].0, k - 2);
    assert_eq!(listing(&t, ROOT, 100).len(), k as usize);
    drop(t);
    assert!(!path.exists(), "the spill file outlived its tree");
}

#[test]
fn a_tree_without_a_spill_file_stays_in_memory() {
    let mut t = Tree::new(inode(libc::S_IFDIR | 0o755));
    for k in 0..2_000u32 {
        let id = t.add(inode(libc::S_IFREG)).unwrap();
        t.link(ROOT, &k.to_be_bytes(), id).unwrap();
    }
    assert!(!t.spilled());
    assert_eq!(t.len(), 2_001);
}
