//! The EROFS backend against the overlay backend, as root: one image with
//! every kind of tar entry (modes, large ids, nanosecond times, xattrs,
//! hardlinks within a layer and into a lower, devices, FIFOs, long names
//! and link targets, whiteouts, opaque and replaced directories,
//! directories made implicitly below a lower's) is pulled with each, in
//! parallel and in sequence; the trees seen through `hoist mount` are
//! equal entry by entry. Then what an indexed layer costs in inodes, its
//! mounts after a reboot takes them away, and its removal.

mod common;

use common::tree::full_tree;
use common::*;
use hoist::digest::Digest;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Skips (saying why) where the kernel cannot mount hoist's images, and
/// fails where it says it can but they do not work.
fn erofs_usable() -> bool {
    let probe = common::mounts::TempRoot::new();
    match hoist::snapshot::erofs::supported(probe.path()) {
        Ok(()) => true,
        Err(why) => {
            assert!(
                !hoist::erofs::kernel_lists_features(),
                "the kernel lists device_table and chunked_file, yet: {why}"
            );
            eprintln!("skipping: {why}");
            false
        }
    }
}

struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_650_000_000);
        h.set_size(0);
        h
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.0
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, 0, 0);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, 0, 0);
        if kind == tar::EntryType::Link {
            h.set_mode(0o640);
            h.set_uid(5);
        }
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn node(&mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o660, 0, 6);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn layers() -> Vec<Vec<u8>> {
    use tar::EntryType::{Block, Char, Fifo, Link, Symlink};
    let big: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
    let long_name = format!("deep/{}/{}", "d".repeat(200), "f".repeat(200));
    let long_target = "t/".repeat(900);
    let cap = [
        1u8, 0, 0, 2, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let base = Tar::new()
        .pax(&[("mtime", b"1500000000.123456789")])
        .dir("etc", 0o755, 0, 0)
        .file("etc/passwd", 0o644, b"root:x:0:0\n")
        .pax(&[("uid", b"100000"), ("gid", b"200000")])
        .file("etc/owned", 0o600, b"big ids")
        .dir("usr", 0o755, 0, 0)
        .pax(&[
            ("mtime", b"1400000000.5"),
            ("SCHILY.xattr.user.note", b"kept"),
        ])
        .dir("usr/share", 0o750, 3, 4)
        .file("usr/share/doc", 0o644, b"doc")
        .file("usr/bin-setuid", 0o4755, b"#!/bin/sh\n")
        .dir("tmp", 0o1777, 0, 0)
        .file("empty", 0o644, b"")
        .file("big", 0o644, &big)
        .pax(&[("SCHILY.xattr.security.capability", &cap[..])])
        .file("cap", 0o755, b"cap")
        .link(Symlink, "short", "etc/passwd")
        .link(Symlink, "long", &long_target)
        .link(Link, "etc/passwd-hard", "etc/passwd")
        .node(Char, "null", 1, 3)
        .node(Block, "disk", 259, 70000)
        .node(Fifo, "fifo", 0, 0)
        .dir("deep", 0o755, 0, 0)
        .dir(&format!("deep/{}", "d".repeat(200)), 0o700, 9, 9)
        .file(&long_name, 0o644, b"long name")
        .dir("gone", 0o755, 0, 0)
        .file("gone/x", 0o644, b"x")
        .dir("opaque", 0o755, 0, 0)
        .file("opaque/old", 0o644, b"old")
        .file("rep-file", 0o644, b"a file first")
        .dir("rep-dir", 0o755, 0, 0)
        .file("rep-dir/inside", 0o644, b"inside")
        .dir("lib", 0o755, 0, 0)
        .file("lib/libc", 0o755, b"libc")
        .finish();
    let top = Tar::new()
        .file(".wh.gone", 0o644, b"")
        .file("opaque/.wh..wh..opq", 0o644, b"")
        .file("opaque/new", 0o644, b"new")
        .file("usr/share/added", 0o644, b"below a lower's directory")
        .dir("rep-file", 0o700, 0, 0)
        .file("rep-file/now", 0o644, b"a dir now")
        .file("rep-dir", 0o644, b"a file now")
        .link(Link, "lib/libc-hard", "lib/libc")
        .file("etc/.wh.passwd", 0o644, b"")
        .pax(&[("mtime", b"1700000000.000000001")])
        .file("etc/added", 0o640, b"added")
        .finish();
    let third = Tar::new()
        .link(Link, "usr/share/doc-hard", "usr/share/doc")
        .file("tmp/t", 0o644, b"t")
        .finish();
    vec![gzip(&base), gzip(&top), gzip(&third)]
}

async fn push(reg: &Registry, repo: &str, layers: &[Vec<u8>]) {
    let diffs: Vec<Digest> = layers.iter().map(|l| diff_id(l)).collect();
    let mut descs = Vec::new();
    for l in layers {
        descs.push(reg.push_blob(repo, l, hoist::images::OCI_LAYER_GZIP).await);
    }
    let config = json!({
        "architecture": host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diffs.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
    });
    push_manifest_over(reg, repo, Some("1"), false, &config, &descs).await;
}

/// [`full_tree`] plus each entry's link count and hardlink group (the
/// first path of the same inode).
fn tree_with_links(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = full_tree(root);
    let mut groups: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for (path, v) in out.iter_mut() {
        let m = std::fs::symlink_metadata(root.join(path)).unwrap();
        let group = groups
            .entry((m.dev(), m.ino()))
            .or_insert_with(|| path.clone())
            .clone();
        if !m.is_dir() {
            v.push_str(&format!(" nlink={} group={group}", m.nlink()));
        }
    }
    out
}

fn mounts_under(root: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = root.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn erofs_trees_equal_overlay_trees_as_root() {
    require_root!();
    if !erofs_usable() {
        return;
    }
    let reg = Registry::start();
    let layers = layers();
    push(&reg, "erofs/rich", &layers).await;
    let r = format!("{}/erofs/rich:1", reg.addr);
    let dir = common::mounts::TempRoot::new();
    let mut trees = Vec::new();
    for (snapshotter, sequential) in [
        ("overlayfs", true),
        ("overlayfs", false),
        ("erofs", true),
        ("erofs", false),
    ] {
        let name = format!("{snapshotter}-{sequential}");
        let root = dir.path().join(&name);
        std::fs::create_dir_all(&root).unwrap();
        let mut args = vec![
            "pull",
            "--hosts-dir",
            "/nonexistent",
            "--snapshotter",
            snapshotter,
        ];
        if sequential {
            args.push("--sequential-unpack");
        }
        args.push(&r);
        let out = hoist_ok(&root, &args);
        assert_eq!(out.contains("applied in parallel"), !sequential, "{out}");
        eprintln!(
            "{name}: {} inodes under the root for a {}-layer image",
            walkdir_count(&root),
            layers.len()
        );
        let mnt = dir.path().join(format!("mnt-{name}"));
        hoist_ok(&root, &["mount", &r, mnt.to_str().unwrap()]);
        trees.push((name, tree_with_links(&mnt)));
        hoist_ok(&root, &["unmount", mnt.to_str().unwrap()]);
    }
    let (first, reference) = &trees[0];
    assert!(
        reference["usr/share/added"].starts_with("file:"),
        "{reference:?}"
    );
    assert!(
        reference["usr/share"].contains("mode=40750 uid=3 gid=4 mtime=1400000000500000000"),
        "{}",
        reference["usr/share"]
    );
    assert!(reference["lib/libc-hard"].contains("nlink=2 group=lib/libc"));
    assert!(!reference.contains_key("gone") && !reference.contains_key("opaque/old"));
    assert!(!reference.contains_key("etc/passwd") && reference.contains_key("etc/passwd-hard"));
    for (name, tree) in &trees[1..] {
        for (path, v) in reference {
            assert_eq!(tree.get(path), Some(v), "{name} against {first}: {path}");
        }
        assert_eq!(tree.len(), reference.len(), "{name} against {first}");
    }
    // Each indexed layer is a handful of inodes, not one per file.
    let root = dir.path().join("erofs-true");
    let snaps = root.join("snapshots/erofs");
    let files = walkdir_count(&snaps);
    assert!(
        files <= 8 * layers.len() + 2,
        "{files} inodes under {}",
        snaps.display()
    );
}

fn walkdir_count(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            n += 1;
            let ft = e.file_type().unwrap();
            // An indexed layer's `fs` is its image, mounted: not counted.
            if ft.is_dir() && !is_mountpoint(&e.path()) {
                stack.push(e.path());
            }
        }
    }
    n
}

fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (std::fs::metadata(path), std::fs::metadata(path.join(".."))) else {
        return false;
    };
    a.dev() != b.dev()
}

#[tokio::test]
async fn indexed_layers_mount_again_after_a_reboot_and_go_with_their_image_as_root() {
    require_root!();
    if !erofs_usable() {
        return;
    }
    let reg = Registry::start();
    let layers = layers();
    push(&reg, "erofs/again", &layers).await;
    let r = format!("{}/erofs/again:1", reg.addr);
    let dir = common::mounts::TempRoot::new();
    let root = dir.path().join("root");
    hoist_ok(&root, &["pull", "--hosts-dir", "/nonexistent", &r]);
    let layer_mounts = mounts_under(&root);
    assert_eq!(layer_mounts.len(), layers.len(), "{layer_mounts:?}");
    // A reboot takes every mount away.
    for m in &layer_mounts {
        nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    assert!(mounts_under(&root).is_empty());
    let mnt = dir.path().join("mnt");
    hoist_ok(&root, &["mount", &r, mnt.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(mnt.join("usr/share/added")).unwrap(),
        "below a lower's directory"
    );
    hoist_ok(&root, &["unmount", mnt.to_str().unwrap()]);
    // Exit status 0: clean.
    hoist_ok(&root, &["check"]);
    hoist_ok(&root, &["rmi", &r]);
    hoist_ok(&root, &["gc"]);
    assert!(mounts_under(&root).is_empty(), "{:?}", mounts_under(&root));
    let left: Vec<_> = std::fs::read_dir(root.join("snapshots/erofs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
