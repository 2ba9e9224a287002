//! Modes do not follow the umask: a root made under any umask has its exact
//! modes, and an image tree has exactly the modes its layers give (0755 for
//! what no layer describes). The umask belongs to the whole process, so
//! this test binary holds this one test alone.

use hoist::descriptor::Descriptor;
use hoist::digest::Digest;
use hoist::metadata::Db;
use hoist::snapshot::Snapshotter;
use nix::sys::stat::Mode;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// (path, type, mode) entries, in order.
fn layer(entries: &[(&str, tar::EntryType, u32)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, kind, m) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*m);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(*kind);
        if kind.is_character_special() {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        let data: &[u8] = if kind.is_file() { b"data" } else { b"" };
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, path, data).unwrap();
    }
    tar.into_inner().unwrap()
}

fn apply(snapshots: &hoist::snapshot::Snapshots, key: &str, parent: Option<&str>, tar: &[u8]) {
    snapshots.prepare(key, parent, Default::default()).unwrap();
    let desc = Descriptor::new(hoist::images::OCI_LAYER, Digest::of(tar), tar.len() as u64);
    hoist::diff::apply(tar, &desc, snapshots, key).unwrap();
}

fn check(umask: u32, snapshotter: &str) {
    use tar::EntryType as T;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let db = Db::open(&root).unwrap();
    let snapshots = hoist::snapshot::open(&db, Some(snapshotter))
        .unwrap()
        .namespace("default");
    let what = format!("{snapshotter}, umask {umask:03o}");
    for (p, want) in [
        ("", 0o711),
        ("content", 0o700),
        ("snapshots", 0o700),
        ("meta.db", 0o600),
    ] {
        assert_eq!(mode(&root.join(p)), want, "{p} ({what})");
    }
    assert_eq!(mode(&root.join("snapshots").join(snapshotter)), 0o700);

    let mut entries = vec![
        ("open", T::Regular, 0o666),
        ("private", T::Regular, 0o600),
        ("suid", T::Regular, 0o4755),
        ("sgid-dir", T::Directory, 0o2775),
        ("sticky", T::Directory, 0o1777),
        ("closed", T::Directory, 0o750),
        ("closed/inner", T::Regular, 0o640),
        // No entries for its parents: they are made 0755.
        ("made/for/this", T::Regular, 0o644),
        ("fifo", T::Fifo, 0o622),
    ];
    if nix::unistd::geteuid().is_root() {
        entries.push(("null", T::Char, 0o666));
    }
    apply(&snapshots, "k1", None, &layer(&entries));
    let (fs, _) = snapshots.apply_dirs("k1").unwrap();
    // No layer describes the root of the tree.
    assert_eq!(mode(&fs), 0o755, "the tree's root ({what})");
    for (path, _, m) in &entries {
        assert_eq!(mode(&fs.join(path)), *m, "{path} ({what})");
    }
    for implicit in ["made", "made/for"] {
        assert_eq!(mode(&fs.join(implicit)), 0o755, "{implicit} ({what})");
    }
    snapshots.commit("base", "k1", Default::default()).unwrap();

    // A layer on top: its own tree's root (an overlay upper, or the copy of
    // the parent) and what it adds keep their modes too.
    let top = [
        ("added", T::Regular, 0o666),
        ("added-dir", T::Directory, 0o777),
    ];
    apply(&snapshots, "k2", Some("base"), &layer(&top));
    let (fs, _) = snapshots.apply_dirs("k2").unwrap();
    assert_eq!(mode(&fs), 0o755, "the upper tree's root ({what})");
    for (path, _, m) in &top {
        assert_eq!(mode(&fs.join(path)), *m, "{path} ({what})");
    }
}

#[test]
fn modes_do_not_follow_the_umask() {
    let overlay = nix::unistd::geteuid().is_root() && {
        let probe = tempfile::tempdir().unwrap();
        hoist::snapshot::overlay::supported(probe.path())
    };
    for umask in [0o077, 0o000] {
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(umask));
        let result = std::panic::catch_unwind(|| {
            check(umask, "native");
            if overlay {
                check(umask, "overlayfs");
            }
        });
        nix::sys::stat::umask(old);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
