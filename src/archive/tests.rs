//! Layer-apply tests: layers are built in memory with `tar::Builder` or
//! hand-made headers, applied into temp dirs, and the resulting tree is
//! compared with the expected one. Tests that need root (chown, device
//! nodes, trusted.* xattrs, overlay mounts) end in `_as_root` and return
//! early otherwise.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::unistd::{Whence, lseek};
use tar::{EntryType, Header};
use tempfile::TempDir;

use super::*;

const MTIME: u64 = 1_600_000_000;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: this test needs root");
            return;
        }
    };
}

/// A unique path under /tmp that no test creates on the host: hostile
/// layers aim at it and the tests check it never appears.
fn unique_tmp(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "/tmp/hoist-archive-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------- layers

/// Per-entry header fields.
#[derive(Clone)]
struct E {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl Default for E {
    fn default() -> Self {
        E {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: MTIME,
        }
    }
}

fn m(mode: u32) -> E {
    E {
        mode,
        ..E::default()
    }
}

fn own(mode: u32, uid: u64, gid: u64) -> E {
    E {
        mode,
        uid,
        gid,
        ..E::default()
    }
}

struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, e: &E) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(0);
        h
    }

    fn dir(mut self, path: &str, e: E) -> Self {
        let mut h = Self::header(EntryType::Directory, &e);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn file(mut self, path: &str, e: E, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, &e);
        h.set_size(data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(EntryType::Symlink, &m(0o777));
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    fn hardlink(mut self, path: &str, target: &str, e: E) -> Self {
        let mut h = Self::header(EntryType::Link, &e);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    fn node(mut self, path: &str, kind: EntryType, dev: (u32, u32), e: E) -> Self {
        let mut h = Self::header(kind, &e);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn whiteout(self, path: &str) -> Self {
        self.file(path, m(0o644), b"")
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.b
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    /// An entry whose name (and link name) bytes are written as given,
    /// bypassing the builder's own path checks: for hostile layers.
    fn raw(self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        self.raw_flag(kind.as_byte(), name, link, data)
    }

    /// Like `raw` with the type flag byte as given (the crate maps a NUL
    /// flag to '0').
    fn raw_flag(mut self, flag: u8, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, &m(0o644));
        h.as_old_mut().linkflag = [flag];
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    /// Raw bytes (hand-made headers) appended to the stream.
    fn bytes(mut self, raw: &[u8]) -> Self {
        self.b.get_mut().extend_from_slice(raw);
        self
    }

    fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(512), 0);
}

// ---------------------------------------------------------------- applying

fn plain() -> ApplyOptions {
    ApplyOptions::default()
}

fn overlay(lowers: &[&Path]) -> ApplyOptions {
    ApplyOptions {
        whiteouts: WhiteoutMode::Overlay {
            userxattr: false,
            lowers: lowers.iter().map(|p| p.to_path_buf()).collect(),
        },
    }
}

fn apply(root: &Path, tar: &[u8], opts: &ApplyOptions) -> Result<Applied, ArchiveError> {
    apply_layer(root, tar, Compression::None, opts)
}

fn apply_ok(root: &Path, tar: &[u8], opts: &ApplyOptions) -> Applied {
    match apply(root, tar, opts) {
        Ok(a) => a,
        Err(e) => panic!("apply failed: {e}"),
    }
}

fn mkdir(base: &Path, name: &str) -> PathBuf {
    let p = base.join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

// ---------------------------------------------------------------- trees

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut out = BTreeMap::new();
    for name in safe::llistxattr(&c).unwrap() {
        let v = safe::lgetxattr(&c, &name).unwrap().unwrap_or_default();
        out.insert(String::from_utf8_lossy(&name).into_owned(), v);
    }
    out
}

fn printable(v: &[u8]) -> String {
    if v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        String::from_utf8_lossy(v).into_owned()
    } else {
        format!("0x{}", hex::encode(v))
    }
}

/// One line per entry below `root`, sorted: type, path, mode, owner,
/// content or target or device, and xattrs.
fn render(root: &Path) -> Vec<String> {
    render_with(root, true)
}

fn render_with(root: &Path, owners: bool) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, owners, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, owners: bool, out: &mut Vec<String>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let mode = md.mode() & 0o7777;
        let owner = if owners {
            format!(" {}:{}", md.uid(), md.gid())
        } else {
            String::new()
        };
        let mut line = if ft.is_dir() {
            format!("d {rel} {mode:o}{owner}")
        } else if ft.is_file() {
            let data = fs::read(&p).unwrap();
            let content = if data.len() <= 40 && std::str::from_utf8(&data).is_ok() {
                format!("{:?}", String::from_utf8_lossy(&data))
            } else {
                format!(
                    "len={} {}",
                    data.len(),
                    &crate::digest::Digest::of(&data).hex()[..12]
                )
            };
            format!("f {rel} {mode:o}{owner} {content}")
        } else if ft.is_symlink() {
            let t = fs::read_link(&p).unwrap();
            format!("l {rel} -> {}{owner}", t.display())
        } else if ft.is_char_device() || ft.is_block_device() {
            let c = if ft.is_char_device() { 'c' } else { 'b' };
            let (ma, mi) = (
                nix::sys::stat::major(md.rdev()),
                nix::sys::stat::minor(md.rdev()),
            );
            format!("{c} {rel} {ma}:{mi} {mode:o}{owner}")
        } else if ft.is_fifo() {
            format!("p {rel} {mode:o}{owner}")
        } else {
            format!("? {rel}")
        };
        let x = xattrs(&p);
        if !x.is_empty() {
            let parts: Vec<String> = x
                .iter()
                .map(|(k, v)| format!("{k}={}", printable(v)))
                .collect();
            line.push_str(&format!(" x[{}]", parts.join(",")));
        }
        out.push(line);
        if ft.is_dir() {
            walk(root, &p, owners, out);
        }
    }
}

fn lines(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn mtime(p: &Path) -> (i64, i64) {
    let md = fs::symlink_metadata(p).unwrap();
    (md.mtime(), md.mtime_nsec())
}

fn atime(p: &Path) -> (i64, i64) {
    let md = fs::symlink_metadata(p).unwrap();
    (md.atime(), md.atime_nsec())
}

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

// ---------------------------------------------------------------- overlay mounts

struct Mounted {
    merged: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.merged, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mount_overlay(tmp: &Path, lowers: &[&Path], upper: &Path, extra: &str) -> nix::Result<Mounted> {
    let work = mkdir(tmp, "work");
    let merged = mkdir(tmp, "merged");
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}{extra}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )?;
    Ok(Mounted { merged })
}

/// A read-only overlay of `layers` (newest first, no upperdir): how the
/// merged view of an indexed layer over its lowers is mounted.
fn mount_overlay_ro(tmp: &Path, layers: &[&Path], extra: &str) -> nix::Result<Mounted> {
    let merged = mkdir(tmp, "merged");
    let lowerdir: Vec<String> = layers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!("lowerdir={}{extra}", lowerdir.join(":"));
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )?;
    Ok(Mounted { merged })
}

// ---------------------------------------------------------------- applied or indexed

/// How a test's layers land in its directories: applied (`apply_layer`),
/// or indexed (`index_layer`) with the EROFS image mounted read-only on
/// the directory, so that what the test reads there comes through the
/// kernel; indexed either in memory or with the index spilled to disk
/// from its first entry. The same expectations hold for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Applied,
    Indexed { spilled: bool },
}

/// Applied, and Indexed where this kernel has what hoist's images need.
/// A kernel that lists the features must mount them: no skipping then.
fn modes() -> Vec<Mode> {
    if !is_root() {
        eprintln!("index mode skipped: mounting an EROFS image needs root");
        return vec![Mode::Applied];
    }
    if !crate::erofs::kernel_lists_features() {
        eprintln!(
            "index mode skipped: the kernel lists no EROFS device_table and chunked_file \
             (/sys/fs/erofs/features)"
        );
        return vec![Mode::Applied];
    }
    vec![
        Mode::Applied,
        Mode::Indexed { spilled: false },
        Mode::Indexed { spilled: true },
    ]
}

/// A layer indexed into a scratch directory of its own, its image mounted
/// read-only on `target`; unmounted on drop, before the scratch goes.
#[derive(Debug)]
struct ImageMount {
    target: PathBuf,
    _scratch: TempDir,
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if crate::mount::unmount_all(&self.target).is_err() {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// What landing a layer gave; in index mode, the mount to keep.
#[derive(Debug)]
struct Landed {
    applied: Applied,
    image: Option<ImageMount>,
}

/// `index_layer` into a fresh scratch directory, as the applier would
/// apply with `opts`: plain or overlay without lowers is nothing below,
/// overlay with lowers is those lowers.
fn index_into_scratch(
    layer: impl Read,
    compression: Compression,
    opts: &ApplyOptions,
    spilled: bool,
) -> Result<(Applied, TempDir), ArchiveError> {
    let (below, userxattr) = match &opts.whiteouts {
        WhiteoutMode::Plain => (IndexBelow::Nothing, false),
        WhiteoutMode::Overlay { userxattr, lowers } => {
            (IndexBelow::Lowers(lowers.clone()), *userxattr)
        }
    };
    let scratch = TempDir::new().unwrap();
    let memory = if spilled {
        0
    } else {
        super::index::INDEX_MEMORY
    };
    let applied = super::index::index_layer_within(
        scratch.path(),
        layer,
        compression,
        &below,
        userxattr,
        memory,
    )?;
    // The spill file goes with the index.
    assert!(!scratch.path().join("layer.index").exists());
    Ok((applied, scratch))
}

/// Mounts the image `index_into_scratch` made on `target`.
fn mount_scratch(scratch: TempDir, target: &Path) -> ImageMount {
    let dir = scratch.path();
    if let Err(e) =
        crate::erofs::mount::mount_layer(&dir.join(LAYER_IMAGE), &dir.join(LAYER_TAR), target)
    {
        panic!(
            "the kernel lists EROFS's features, yet the image of {} does not mount: {e}",
            dir.display()
        );
    }
    ImageMount {
        target: target.to_path_buf(),
        _scratch: scratch,
    }
}

/// Lands `layer` in `root` in `mode`. Applied, exactly `apply_layer`;
/// indexed, the image is mounted on `root` (over what is there).
fn land_stream(
    mode: Mode,
    root: &Path,
    layer: impl Read,
    compression: Compression,
    opts: &ApplyOptions,
) -> Result<Landed, ArchiveError> {
    match mode {
        Mode::Applied => apply_layer(root, layer, compression, opts).map(|applied| Landed {
            applied,
            image: None,
        }),
        Mode::Indexed { spilled } => {
            let (applied, scratch) = index_into_scratch(layer, compression, opts, spilled)?;
            Ok(Landed {
                applied,
                image: Some(mount_scratch(scratch, root)),
            })
        }
    }
}

fn land(mode: Mode, root: &Path, tar: &[u8], opts: &ApplyOptions) -> Result<Landed, ArchiveError> {
    land_stream(mode, root, tar, Compression::None, opts)
}

fn land_ok(mode: Mode, root: &Path, tar: &[u8], opts: &ApplyOptions) -> Landed {
    match land(mode, root, tar, opts) {
        Ok(l) => l,
        Err(e) => panic!("{mode:?}: landing the layer failed: {e}"),
    }
}

/// Runs `f` in each of [`modes`], saying which on stderr.
fn for_each_mode(f: impl Fn(Mode)) {
    for mode in modes() {
        eprintln!("---- {mode:?}");
        f(mode);
    }
}

/// The index refuses what the applier refuses, with an error of the same
/// kind: `errs` holds one error per mode for the same layer.
fn assert_same_kind(errs: &[(Mode, ArchiveError)]) {
    if let Some(((first_mode, first), rest)) = errs.split_first() {
        for (mode, err) in rest {
            assert_eq!(
                std::mem::discriminant(err),
                std::mem::discriminant(first),
                "{mode:?} gave {err:?} where {first_mode:?} gave {first:?}"
            );
        }
    }
}

// ================================================================ basic tree

#[test]
fn plain_basic_tree_as_root() {
    require_root!();
    for_each_mode(plain_basic_tree);
}

fn plain_basic_tree(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .dir("etc", m(0o755))
        .file("etc/hosts", m(0o644), b"127.0.0.1 localhost\n")
        .dir("home", m(0o755))
        .dir("home/user", own(0o700, 1000, 1000))
        .file(
            "home/user/.profile",
            own(0o600, 1000, 1000),
            b"export A=1\n",
        )
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("etc/hosts.bak", "etc/hosts", m(0o644))
        .dir("dev", m(0o755))
        .node("dev/null", EntryType::Char, (1, 3), m(0o666))
        .node("dev/loop0", EntryType::Block, (7, 0), own(0o660, 0, 6))
        .node("dev/fifo", EntryType::Fifo, (0, 0), m(0o620))
        .finish();
    let landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(landed.applied.entries, 11);
    assert_eq!(
        render(&root),
        lines(&[
            "d dev 755 0:0",
            "c dev/null 1:3 666 0:0",
            "b dev/loop0 7:0 660 0:6",
            "p dev/fifo 620 0:0",
            "d etc 755 0:0",
            "f etc/hosts 644 0:0 \"127.0.0.1 localhost\\n\"",
            "f etc/hosts.bak 644 0:0 \"127.0.0.1 localhost\\n\"",
            "l etc/localtime -> /usr/share/zoneinfo/UTC 0:0",
            "d home 755 0:0",
            "d home/user 700 1000:1000",
            "f home/user/.profile 600 1000:1000 \"export A=1\\n\"",
        ])
    );
    assert_eq!(
        ino(&root.join("etc/hosts")),
        ino(&root.join("etc/hosts.bak"))
    );
    assert_eq!(fs::metadata(root.join("etc/hosts")).unwrap().nlink(), 2);
}

#[test]
fn missing_parents_are_created_0755_root_as_root() {
    require_root!();
    for_each_mode(missing_parents_are_created_0755_root);
}

fn missing_parents_are_created_0755_root(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .file("a/b/c/file", own(0o640, 5, 6), b"x")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(
        render(&root),
        lines(&[
            "d a 755 0:0",
            "d a/b 755 0:0",
            "d a/b/c 755 0:0",
            "f a/b/c/file 640 5:6 \"x\"",
        ])
    );
}

#[test]
fn modes_setuid_setgid_sticky_survive_chown_as_root() {
    require_root!();
    for_each_mode(modes_setuid_setgid_sticky_survive_chown);
}

fn modes_setuid_setgid_sticky_survive_chown(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .dir("bin", m(0o755))
        .file("bin/su", own(0o4755, 0, 0), b"su")
        .file("bin/mine", own(0o4750, 1000, 1000), b"mine")
        .file("bin/wall", own(0o2755, 0, 5), b"wall")
        .dir("tmp", m(0o1777))
        .dir("shared", own(0o2775, 33, 33))
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(
        render(&root),
        lines(&[
            "d bin 755 0:0",
            "f bin/su 4755 0:0 \"su\"",
            "f bin/mine 4750 1000:1000 \"mine\"",
            "f bin/wall 2755 0:5 \"wall\"",
            "d tmp 1777 0:0",
            "d shared 2775 33:33",
        ])
    );
}

#[test]
fn mtimes_with_nanoseconds_and_directory_times_after_children() {
    for_each_mode(mtimes_with_nanoseconds_and_directory_times_after_children_in);
}

fn mtimes_with_nanoseconds_and_directory_times_after_children_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .pax(&[("mtime", b"1500000000.123456789")])
        .dir("d", m(0o755))
        .pax(&[("mtime", b"1500000001.5"), ("atime", b"1600000002.25")])
        .file("d/f", m(0o644), b"data")
        .pax(&[("mtime", b"1500000003.000000007")])
        .symlink("d/link", "f")
        .dir(
            "d/sub",
            E {
                mtime: 1_400_000_000,
                ..m(0o755)
            },
        )
        .file("d/sub/g", m(0o644), b"g")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(mtime(&root.join("d")), (1_500_000_000, 123_456_789));
    assert_eq!(mtime(&root.join("d/f")), (1_500_000_001, 500_000_000));
    // EROFS keeps one time per inode, which its atime reads as too.
    if mode == Mode::Applied {
        assert_eq!(atime(&root.join("d/f")), (1_600_000_002, 250_000_000));
    }
    // The symlink's own time, set without following it to d/f.
    assert_eq!(mtime(&root.join("d/link")), (1_500_000_003, 7));
    assert_eq!(mtime(&root.join("d/sub")), (1_400_000_000, 0));
    assert_eq!(mtime(&root.join("d/sub/g")), (MTIME as i64, 0));
    // Without a later atime, atime is the mtime (containerd).
    assert_eq!(atime(&root.join("d/sub/g")), (MTIME as i64, 0));
}

#[test]
fn pax_long_names_and_large_ids_as_root() {
    require_root!();
    for_each_mode(pax_long_names_and_large_ids);
}

fn pax_long_names_and_large_ids(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let long_dir = format!("{}/{}", "d".repeat(90), "e".repeat(90));
    let gnu_long = format!("{long_dir}/{}", "g".repeat(120));
    let pax_long = format!("{long_dir}/{}", "p".repeat(150));
    let long_target = format!("/{}", "t".repeat(200));
    let tar = Layer::new()
        .dir(&long_dir, m(0o755))
        // The builder emits a GNU long name ('L') for this one.
        .file(&gnu_long, own(0o644, 3_000_000, 4_000_000), b"gnu")
        .pax(&[
            ("path", pax_long.as_bytes()),
            ("uid", b"3000001"),
            ("gid", b"4000001"),
        ])
        .file("placeholder", m(0o600), b"pax")
        // A GNU long link ('K') for the target.
        .symlink("lk", &long_target)
        .pax(&[("linkpath", b"/pax/link/target")])
        .symlink("lp", "short")
        // A ustar name split over the prefix and name fields.
        .bytes(&ustar_entry(
            &format!("{}/{}", "u".repeat(80), "v".repeat(60)),
            b"ustar",
        ))
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    let u = root.join("u".repeat(80)).join("v".repeat(60));
    assert_eq!(fs::read(u).unwrap(), b"ustar");
    let g = root.join(&gnu_long);
    let p = root.join(&pax_long);
    assert_eq!(fs::read(&g).unwrap(), b"gnu");
    assert_eq!(fs::read(&p).unwrap(), b"pax");
    let (gm, pm) = (fs::metadata(&g).unwrap(), fs::metadata(&p).unwrap());
    assert_eq!((gm.uid(), gm.gid()), (3_000_000, 4_000_000));
    assert_eq!(
        (pm.uid(), pm.gid(), pm.mode() & 0o7777),
        (3_000_001, 4_000_001, 0o600)
    );
    assert!(!root.join("placeholder").exists());
    assert_eq!(
        fs::read_link(root.join("lk")).unwrap(),
        Path::new(&long_target)
    );
    assert_eq!(
        fs::read_link(root.join("lp")).unwrap(),
        Path::new("/pax/link/target")
    );
}

/// A v2 `security.capability` value whose permitted set (CAP_DAC_OVERRIDE
/// and CAP_FOWNER) is the byte 0x0a: a newline inside a PAX value.
fn capability_with_newline() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&0x0000_000au32.to_le_bytes()); // permitted[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted[1]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[1]
    v
}

#[test]
fn xattrs_including_binary_capability_as_root() {
    require_root!();
    for_each_mode(xattrs_including_binary_capability);
}

fn xattrs_including_binary_capability(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let cap = capability_with_newline();
    let tar = Layer::new()
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.note", b"hello"),
        ])
        // Owned by a non-root user: the chown must come before the
        // capability, which chown would clear.
        .file("ping", own(0o4755, 1000, 1000), b"ping")
        .pax(&[
            ("SCHILY.xattr.trusted.t", b"v"),
            ("SCHILY.xattr.user.d", b""),
        ])
        .dir("d", m(0o755))
        .pax(&[("SCHILY.xattr.trusted.sym", b"s")])
        .symlink("l", "ping")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    let x = xattrs(&root.join("ping"));
    assert_eq!(x.get("security.capability"), Some(&cap));
    assert_eq!(x.get("user.note").map(Vec::as_slice), Some(&b"hello"[..]));
    assert_eq!(
        render(&root),
        lines(&[
            &format!(
                "f ping 4755 1000:1000 \"ping\" x[security.capability=0x{},user.note=hello]",
                hex::encode(&cap)
            ),
            "d d 755 0:0 x[trusted.t=v,user.d=]",
            "l l -> ping 0:0 x[trusted.sym=s]",
        ])
    );
}

// ================================================================ replacing

#[test]
fn replacing_entries_of_another_type_plain_as_root() {
    require_root!();
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let outside = unique_tmp("replace");
    let base = Layer::new()
        .dir("d", m(0o755))
        .file("d/x", m(0o644), b"x")
        .dir("d/y", m(0o755))
        .file("d/y/z", m(0o644), b"z")
        .file("f", m(0o644), b"file")
        .symlink("s", &outside)
        .dir("e", own(0o700, 9, 9))
        .file("e/keep", m(0o644), b"keep")
        .finish();
    apply_ok(&root, &base, &plain());
    let layer = Layer::new()
        .file("d", m(0o600), b"now a file")
        .dir("f", m(0o750))
        .file("f/inner", m(0o644), b"inner")
        .file("s", m(0o644), b"not through the link")
        .dir("e", own(0o755, 5, 5))
        .finish();
    apply_ok(&root, &layer, &plain());
    assert_eq!(
        render(&root),
        lines(&[
            "f d 600 0:0 \"now a file\"",
            "d f 750 0:0",
            "f f/inner 644 0:0 \"inner\"",
            "f s 644 0:0 \"not through the link\"",
            "d e 755 5:5",
            "f e/keep 644 0:0 \"keep\"",
        ])
    );
    assert!(!Path::new(&outside).exists());
}

// ================================================================ whiteouts, plain

#[test]
fn plain_whiteout_of_file_and_dir_as_root() {
    require_root!();
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let base = Layer::new()
        .file("a", m(0o644), b"a")
        .dir("d", m(0o755))
        .file("d/x", m(0o644), b"x")
        .dir("d/y", m(0o755))
        .file("d/y/z", m(0o644), b"z")
        .file("keep", m(0o644), b"keep")
        .finish();
    apply_ok(&root, &base, &plain());
    let layer = Layer::new()
        .whiteout(".wh.a")
        .whiteout(".wh.d")
        .whiteout(".wh.never-existed")
        .whiteout("missing/dir/.wh.x")
        .finish();
    apply_ok(&root, &layer, &plain());
    assert_eq!(render(&root), lines(&["f keep 644 0:0 \"keep\""]));
}

fn opaque_base() -> Vec<u8> {
    Layer::new()
        .dir("d", m(0o755))
        .file("d/old", m(0o644), b"old")
        .dir("d/sub", m(0o755))
        .file("d/sub/old2", m(0o644), b"old2")
        .file("other", m(0o644), b"other")
        .finish()
}

fn opaque_layer(marker_first: bool) -> Vec<u8> {
    let mut l = Layer::new().dir("d", m(0o755));
    if marker_first {
        l = l.whiteout("d/.wh..wh..opq");
    }
    l = l
        .file("d/new", m(0o644), b"new")
        .dir("d/sub", m(0o755))
        .file("d/sub/new2", m(0o644), b"new2");
    if !marker_first {
        l = l.whiteout("d/.wh..wh..opq");
    }
    l.finish()
}

#[test]
fn plain_opaque_dir_in_either_entry_order_as_root() {
    require_root!();
    for marker_first in [true, false] {
        let tmp = TempDir::new().unwrap();
        let root = mkdir(tmp.path(), "root");
        apply_ok(&root, &opaque_base(), &plain());
        apply_ok(&root, &opaque_layer(marker_first), &plain());
        assert_eq!(
            render(&root),
            lines(&[
                "d d 755 0:0",
                "f d/new 644 0:0 \"new\"",
                "d d/sub 755 0:0",
                "f d/sub/new2 644 0:0 \"new2\"",
                "f other 644 0:0 \"other\"",
            ]),
            "marker first: {marker_first}"
        );
    }
}

#[test]
fn plain_whiteout_after_same_layer_entries_keeps_them_as_root() {
    require_root!();
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    apply_ok(&root, &opaque_base(), &plain());
    // Whiteouts hide lower layers only (image-spec), whatever the order.
    let layer = Layer::new()
        .file("d/new", m(0o644), b"new")
        .whiteout(".wh.d")
        .file("other", m(0o600), b"rewritten")
        .whiteout(".wh.other")
        .finish();
    apply_ok(&root, &layer, &plain());
    assert_eq!(
        render(&root),
        lines(&[
            "d d 755 0:0",
            "f d/new 644 0:0 \"new\"",
            "f other 600 0:0 \"rewritten\"",
        ])
    );
}

#[test]
fn old_style_type_flags_as_root() {
    require_root!();
    for_each_mode(old_style_type_flags);
}

fn old_style_type_flags(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .raw_flag(0, b"olddir/", b"", b"")
        .raw_flag(0, b"olddir/oldfile", b"", b"v7")
        .raw(EntryType::new(b'7'), b"contiguous", b"", b"c")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(
        render(&root),
        lines(&[
            "d olddir 644 0:0",
            "f olddir/oldfile 644 0:0 \"v7\"",
            "f contiguous 644 0:0 \"c\"",
        ])
    );
}

#[test]
fn root_entry_and_aufs_metadata_are_skipped_as_root() {
    require_root!();
    for_each_mode(root_entry_and_aufs_metadata_are_skipped);
}

fn root_entry_and_aufs_metadata_are_skipped(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .raw(EntryType::Directory, b"./", b"", b"")
        .dir(".wh..wh.plnk", m(0o700))
        .file(".wh..wh.plnk/123.456", m(0o644), b"aufs")
        .file("a", m(0o644), b"a")
        .finish();
    let landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(landed.applied.entries, 4);
    assert_eq!(render(&root), lines(&["f a 644 0:0 \"a\""]));
}

// ================================================================ whiteouts, overlay

/// Applies `base` as a lower (plain), `layer` into an upper (overlay mode),
/// and mounts the result. Indexed, the layer's image is mounted read-only
/// on the upper and the result is a read-only overlay of the two.
struct Stack {
    mode: Mode,
    userxattr: bool,
    tmp: TempDir,
    lower: PathBuf,
    upper: PathBuf,
    images: std::cell::RefCell<Vec<ImageMount>>,
}

impl Stack {
    fn new(mode: Mode, base: &[u8]) -> Self {
        Self::with_userxattr(mode, base, false)
    }

    fn with_userxattr(mode: Mode, base: &[u8], userxattr: bool) -> Self {
        let tmp = TempDir::new().unwrap();
        let lower = mkdir(tmp.path(), "lower");
        let upper = mkdir(tmp.path(), "upper");
        apply_ok(&lower, base, &plain());
        Stack {
            mode,
            userxattr,
            tmp,
            lower,
            upper,
            images: Default::default(),
        }
    }

    fn options(&self) -> ApplyOptions {
        ApplyOptions {
            whiteouts: WhiteoutMode::Overlay {
                userxattr: self.userxattr,
                lowers: vec![self.lower.clone()],
            },
        }
    }

    fn try_apply(&self, layer: &[u8]) -> Result<Applied, ArchiveError> {
        let landed = land(self.mode, &self.upper, layer, &self.options())?;
        self.images.borrow_mut().extend(landed.image);
        Ok(landed.applied)
    }

    fn apply(&self, layer: &[u8]) {
        if let Err(e) = self.try_apply(layer) {
            panic!("{:?}: landing the layer failed: {e}", self.mode);
        }
    }

    fn mount(&self) -> Mounted {
        self.mount_with("").unwrap()
    }

    fn mount_with(&self, extra: &str) -> nix::Result<Mounted> {
        match self.mode {
            Mode::Applied => mount_overlay(self.tmp.path(), &[&self.lower], &self.upper, extra),
            Mode::Indexed { .. } => {
                mount_overlay_ro(self.tmp.path(), &[&self.upper, &self.lower], extra)
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The image mounts go before the temp dir holding their targets.
        self.images.get_mut().clear();
    }
}

#[test]
fn overlay_whiteout_of_file_and_dir_as_root() {
    require_root!();
    for_each_mode(overlay_whiteout_of_file_and_dir);
}

fn overlay_whiteout_of_file_and_dir(mode: Mode) {
    let base = Layer::new()
        .file("a", m(0o644), b"a")
        .dir("d", m(0o755))
        .file("d/x", m(0o644), b"x")
        .dir("p", m(0o755))
        .file("p/gone", m(0o644), b"gone")
        .file("p/stays", m(0o644), b"stays")
        .file("keep", m(0o644), b"keep")
        .finish();
    let s = Stack::new(mode, &base);
    s.apply(
        &Layer::new()
            .whiteout(".wh.a")
            .whiteout(".wh.d")
            .whiteout("p/.wh.gone")
            .finish(),
    );
    assert_eq!(
        render(&s.upper),
        lines(&[
            "c a 0:0 0 0:0",
            "c d 0:0 0 0:0",
            "d p 755 0:0",
            "c p/gone 0:0 0 0:0",
        ])
    );
    let mnt = s.mount();
    assert_eq!(
        render(&mnt.merged),
        lines(&[
            "f keep 644 0:0 \"keep\"",
            "d p 755 0:0",
            "f p/stays 644 0:0 \"stays\"",
        ])
    );
}

#[test]
fn overlay_opaque_dir_in_either_entry_order_as_root() {
    require_root!();
    for_each_mode(overlay_opaque_dir_in_either_entry_order);
}

fn overlay_opaque_dir_in_either_entry_order(mode: Mode) {
    for marker_first in [true, false] {
        let s = Stack::new(mode, &opaque_base());
        s.apply(&opaque_layer(marker_first));
        assert_eq!(
            render(&s.upper),
            lines(&[
                "d d 755 0:0 x[trusted.overlay.opaque=y]",
                "f d/new 644 0:0 \"new\"",
                "d d/sub 755 0:0",
                "f d/sub/new2 644 0:0 \"new2\"",
            ]),
            "marker first: {marker_first}"
        );
        let mnt = s.mount();
        assert_eq!(
            render(&mnt.merged),
            lines(&[
                "d d 755 0:0",
                "f d/new 644 0:0 \"new\"",
                "d d/sub 755 0:0",
                "f d/sub/new2 644 0:0 \"new2\"",
                "f other 644 0:0 \"other\"",
            ]),
            "marker first: {marker_first}"
        );
    }
}

#[test]
fn overlay_userxattr_opaque_as_root() {
    require_root!();
    for_each_mode(overlay_userxattr_opaque);
}

fn overlay_userxattr_opaque(mode: Mode) {
    let s = Stack::with_userxattr(mode, &opaque_base(), true);
    let upper = &s.upper;
    s.apply(&opaque_layer(true));
    assert_eq!(
        xattrs(&upper.join("d"))
            .get("user.overlay.opaque")
            .map(Vec::as_slice),
        Some(&b"y"[..])
    );
    assert!(!xattrs(&upper.join("d")).contains_key("trusted.overlay.opaque"));
    match s.mount_with(",userxattr") {
        Ok(mnt) => {
            let mut names: Vec<_> = fs::read_dir(mnt.merged.join("d"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["new", "sub"]);
        }
        Err(e) => eprintln!("overlay userxattr mount unsupported here ({e}); upper checked only"),
    }
}

#[test]
fn overlay_replacing_file_by_dir_and_dir_by_file_as_root() {
    require_root!();
    for_each_mode(overlay_replacing_file_by_dir_and_dir_by_file);
}

fn overlay_replacing_file_by_dir_and_dir_by_file(mode: Mode) {
    let base = Layer::new()
        .file("f", m(0o644), b"file")
        .dir("g", m(0o755))
        .file("g/x", m(0o644), b"x")
        .finish();
    let s = Stack::new(mode, &base);
    s.apply(
        &Layer::new()
            .dir("f", m(0o750))
            .file("f/inner", m(0o644), b"inner")
            .file("g", m(0o600), b"now a file")
            .finish(),
    );
    assert_eq!(
        render(&s.upper),
        lines(&[
            "d f 750 0:0",
            "f f/inner 644 0:0 \"inner\"",
            "f g 600 0:0 \"now a file\"",
        ])
    );
    let mnt = s.mount();
    assert_eq!(render(&mnt.merged), render(&s.upper));
}

#[test]
fn overlay_recreated_dir_after_whiteout_is_opaque_as_root() {
    require_root!();
    for_each_mode(overlay_recreated_dir_after_whiteout_is_opaque);
}

fn overlay_recreated_dir_after_whiteout_is_opaque(mode: Mode) {
    let s = Stack::new(mode, &opaque_base());
    s.apply(
        &Layer::new()
            .whiteout(".wh.d")
            .dir("d", m(0o700))
            .file("d/new", m(0o644), b"new")
            .whiteout(".wh.other")
            .file("other/inside", m(0o644), b"inside")
            .finish(),
    );
    assert_eq!(
        render(&s.upper),
        lines(&[
            "d d 700 0:0 x[trusted.overlay.opaque=y]",
            "f d/new 644 0:0 \"new\"",
            "d other 755 0:0 x[trusted.overlay.opaque=y]",
            "f other/inside 644 0:0 \"inside\"",
        ])
    );
    let mnt = s.mount();
    assert_eq!(
        render(&mnt.merged),
        lines(&[
            "d d 700 0:0",
            "f d/new 644 0:0 \"new\"",
            "d other 755 0:0",
            "f other/inside 644 0:0 \"inside\"",
        ])
    );
}

#[test]
fn overlay_missing_parent_copied_from_lower_as_root() {
    require_root!();
    for_each_mode(overlay_missing_parent_copied_from_lower);
}

fn overlay_missing_parent_copied_from_lower(mode: Mode) {
    let base = Layer::new()
        .pax(&[
            ("mtime", b"1400000000.111111111"),
            ("SCHILY.xattr.user.meta", b"1"),
            ("SCHILY.xattr.trusted.overlay.origin", b"junk"),
        ])
        .dir("p", own(0o750, 1000, 1001))
        .pax(&[("mtime", b"1400000002.222222222")])
        .dir("p/q", own(0o2700, 7, 8))
        .file("p/other", m(0o644), b"other")
        .finish();
    let s = Stack::new(mode, &base);
    s.apply(&Layer::new().file("p/q/new", m(0o644), b"new").finish());
    assert_eq!(
        render(&s.upper),
        lines(&[
            "d p 750 1000:1001 x[user.meta=1]",
            "d p/q 2700 7:8",
            "f p/q/new 644 0:0 \"new\"",
        ])
    );
    assert_eq!(mtime(&s.upper.join("p")), (1_400_000_000, 111_111_111));
    assert_eq!(mtime(&s.upper.join("p/q")), (1_400_000_002, 222_222_222));
    let mnt = s.mount();
    assert_eq!(
        render(&mnt.merged),
        lines(&[
            "d p 750 1000:1001 x[user.meta=1]",
            "f p/other 644 0:0 \"other\"",
            "d p/q 2700 7:8",
            "f p/q/new 644 0:0 \"new\"",
        ])
    );
}

#[test]
fn overlay_parent_lookup_follows_the_merged_view_of_lowers_as_root() {
    require_root!();
    for_each_mode(overlay_parent_lookup_follows_the_merged_view_of_lowers);
}

fn overlay_parent_lookup_follows_the_merged_view_of_lowers(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let (l2, l1, upper) = (
        mkdir(tmp.path(), "l2"),
        mkdir(tmp.path(), "l1"),
        mkdir(tmp.path(), "upper"),
    );
    // Indexed, each is an image mounted on its directory: the index
    // looks below through the lowers' EROFS mounts.
    let _l2 = land_ok(
        mode,
        &l2,
        &Layer::new()
            .dir("a", m(0o711))
            .dir("a/b", m(0o701))
            .dir("x", m(0o700))
            .dir("y", m(0o705))
            .finish(),
        &plain(),
    );
    // l1 is newer: `a` opaque without `b`, `x` whited out, `y` untouched.
    let _l1 = land_ok(
        mode,
        &l1,
        &Layer::new()
            .dir("a", m(0o750))
            .whiteout("a/.wh..wh..opq")
            .whiteout(".wh.x")
            .finish(),
        &overlay(&[&l2]),
    );
    let _upper = land_ok(
        mode,
        &upper,
        &Layer::new()
            .file("a/b/c", m(0o644), b"c")
            .file("x/f", m(0o644), b"f")
            .file("y/f", m(0o644), b"f")
            .finish(),
        &overlay(&[&l1, &l2]),
    );
    assert_eq!(
        render(&upper),
        lines(&[
            "d a 750 0:0",
            "d a/b 755 0:0",
            "f a/b/c 644 0:0 \"c\"",
            "d x 755 0:0",
            "f x/f 644 0:0 \"f\"",
            "d y 705 0:0",
            "f y/f 644 0:0 \"f\"",
        ])
    );
}

#[test]
fn overlay_hardlink_to_lower_file_is_copied_up_as_root() {
    require_root!();
    for_each_mode(overlay_hardlink_to_lower_file_is_copied_up);
}

fn overlay_hardlink_to_lower_file_is_copied_up(mode: Mode) {
    let sparse_size = 1 << 20;
    let base = Layer::new()
        .dir("bin", own(0o751, 2, 3))
        .pax(&[("SCHILY.xattr.user.k", b"v"), ("mtime", b"1300000000.5")])
        .file("bin/tool", own(0o4755, 7, 7), b"#!/bin/tool\n")
        .bytes(&gnu_sparse_entry(
            "bin/sparse",
            sparse_size,
            &[(65536, 4096)],
        ))
        .finish();
    let s = Stack::new(mode, &base);
    s.apply(
        &Layer::new()
            .hardlink("bin/alias", "bin/tool", own(0o4755, 7, 7))
            .hardlink("usr/sparse-link", "/bin/sparse", m(0o644))
            .finish(),
    );
    let up = |p: &str| s.upper.join(p);
    assert_eq!(ino(&up("bin/tool")), ino(&up("bin/alias")));
    assert_eq!(ino(&up("bin/sparse")), ino(&up("usr/sparse-link")));
    assert_eq!(
        xattrs(&up("bin/tool")).get("user.k").map(Vec::as_slice),
        Some(&b"v"[..])
    );
    // Copied up with the lower's metadata, then the link header's applied
    // to the shared inode (as containerd applies every header).
    assert_eq!(mtime(&up("bin/tool")), (MTIME as i64, 0));
    let r = render(&s.upper);
    assert!(r.contains(&"d bin 751 2:3".to_string()), "{r:#?}");
    assert!(
        r.contains(&"f bin/tool 4755 7:7 \"#!/bin/tool\\n\" x[user.k=v]".to_string()),
        "{r:#?}"
    );
    assert_holes(&up("bin/sparse"), sparse_size, &[(65536, 4096)]);
    let mnt = s.mount();
    let mp = |p: &str| mnt.merged.join(p);
    assert_eq!(fs::read(mp("bin/alias")).unwrap(), b"#!/bin/tool\n");
    assert_eq!(ino(&mp("bin/tool")), ino(&mp("bin/alias")));
    assert_eq!(fs::metadata(mp("bin/alias")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(mp("bin/alias")).unwrap().mode() & 0o7777,
        0o4755
    );
}

#[test]
fn overlay_hardlink_to_a_hidden_lower_file_fails_as_root() {
    require_root!();
    for_each_mode(overlay_hardlink_to_a_hidden_lower_file_fails);
}

fn overlay_hardlink_to_a_hidden_lower_file_fails(mode: Mode) {
    let base = Layer::new()
        .file("gone", m(0o644), b"gone")
        .dir("d", m(0o755))
        .file("d/old", m(0o644), b"old")
        .finish();
    for layer in [
        Layer::new()
            .whiteout(".wh.gone")
            .hardlink("link", "gone", m(0o644)),
        Layer::new()
            .dir("d", m(0o755))
            .whiteout("d/.wh..wh..opq")
            .hardlink("link", "d/old", m(0o644)),
    ] {
        let s = Stack::new(mode, &base);
        let err = s.try_apply(&layer.finish()).unwrap_err();
        assert!(
            matches!(err, ArchiveError::Hardlink { ref reason, .. } if reason == "target does not exist"),
            "{err}"
        );
        assert!(fs::symlink_metadata(s.upper.join("link")).is_err());
    }
}

#[test]
fn overlay_drops_overlay_xattrs_from_the_layer_as_root() {
    require_root!();
    for_each_mode(overlay_drops_overlay_xattrs_from_the_layer);
}

fn overlay_drops_overlay_xattrs_from_the_layer(mode: Mode) {
    let s = Stack::new(mode, &opaque_base());
    s.apply(
        &Layer::new()
            .pax(&[
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/other"),
                ("SCHILY.xattr.user.fine", b"1"),
            ])
            .dir("d", m(0o755))
            .finish(),
    );
    assert_eq!(render(&s.upper), lines(&["d d 755 0:0 x[user.fine=1]"]));
}

#[test]
fn plain_hardlink_in_tree_as_root() {
    require_root!();
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    apply_ok(
        &root,
        &Layer::new()
            .file("bin/tool", own(0o755, 7, 7), b"tool")
            .finish(),
        &plain(),
    );
    let layer = Layer::new()
        .hardlink("bin/alias", "/bin/tool", own(0o755, 7, 7))
        .finish();
    assert_eq!(apply_ok(&root, &layer, &plain()).entries, 1);
    assert_eq!(ino(&root.join("bin/tool")), ino(&root.join("bin/alias")));
    let err = apply(
        &root,
        &Layer::new().hardlink("x", "bin", m(0o644)).finish(),
        &plain(),
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::Hardlink { .. }), "{err}");
    assert!(err.to_string().contains("directory"), "{err}");
}

/// The same over a lower in overlay mode, where the target is copied up.
#[test]
fn overlay_hardlink_in_tree_as_root() {
    require_root!();
    for_each_mode(overlay_hardlink_in_tree);
}

fn overlay_hardlink_in_tree(mode: Mode) {
    let base = Layer::new()
        .file("bin/tool", own(0o755, 7, 7), b"tool")
        .finish();
    let s = Stack::new(mode, &base);
    let layer = Layer::new()
        .hardlink("bin/alias", "/bin/tool", own(0o755, 7, 7))
        .finish();
    assert_eq!(s.try_apply(&layer).unwrap().entries, 1);
    let mnt = s.mount();
    let root = &mnt.merged;
    assert_eq!(ino(&root.join("bin/tool")), ino(&root.join("bin/alias")));
    let s = Stack::new(mode, &base);
    let err = s
        .try_apply(&Layer::new().hardlink("x", "bin", m(0o644)).finish())
        .unwrap_err();
    assert!(matches!(err, ArchiveError::Hardlink { .. }), "{err}");
    assert!(err.to_string().contains("directory"), "{err}");
}

// ================================================================ sparse files

/// A GNU old-format sparse entry ('S'), with extension headers when there
/// are more than four fragments. Fragment i is filled with b'a' + i.
fn gnu_sparse_entry(name: &str, real: u64, segs: &[(u64, u64)]) -> Vec<u8> {
    let data = sparse_data(segs);
    let mut h = Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_mtime(MTIME);
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(data.len() as u64);
    let gnu = h.as_gnu_mut().unwrap();
    for (slot, (o, l)) in gnu.sparse.iter_mut().zip(segs) {
        slot.set_offset(*o);
        slot.set_length(*l);
    }
    gnu.set_real_size(real);
    gnu.set_is_extended(segs.len() > 4);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let rest: Vec<_> = segs.iter().skip(4).collect();
    let chunks: Vec<_> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, (o, l)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(*o);
            slot.set_length(*l);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        out.extend_from_slice(ext.as_bytes());
    }
    out.extend_from_slice(&data);
    pad(&mut out);
    out
}

fn sparse_data(segs: &[(u64, u64)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (i, (_, l)) in segs.iter().enumerate() {
        data.extend(std::iter::repeat_n(b'a' + i as u8, *l as usize));
    }
    data
}

/// A ustar header plus data for PAX-format entries built by hand.
fn ustar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_mtime(MTIME);
    h.set_entry_type(EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    pad(&mut out);
    out
}

fn assert_holes(path: &Path, real: u64, segs: &[(u64, u64)]) {
    let mut want = vec![0u8; real as usize];
    for (i, (o, l)) in segs.iter().enumerate() {
        want[*o as usize..(*o + *l) as usize].fill(b'a' + i as u8);
    }
    let mut got = Vec::new();
    File::open(path).unwrap().read_to_end(&mut got).unwrap();
    assert!(got == want, "{} content differs", path.display());
    // Every 4 KiB-aligned gap between fragments must be a hole on disk.
    let f = File::open(path).unwrap();
    let mut gaps = Vec::new();
    let mut at = 0;
    for (o, l) in segs {
        gaps.push((at, *o));
        at = o + l;
    }
    gaps.push((at, real));
    for (start, end) in gaps {
        let (s, e) = (start.next_multiple_of(4096), end / 4096 * 4096);
        if s >= e {
            continue;
        }
        match lseek(f.as_fd(), s as i64, Whence::SeekData) {
            Ok(next) => assert!(
                next as u64 >= e,
                "{}: data at {next} inside the hole {s}..{e}",
                path.display()
            ),
            Err(nix::errno::Errno::ENXIO) => {}
            Err(err) => panic!("SEEK_DATA: {err}"),
        }
    }
    // EROFS reports a file's blocks from its size, holes or not: there
    // SEEK_DATA above is what shows them.
    let on_erofs =
        nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as u64 == 0xE0F5_E1E2);
    if on_erofs {
        return;
    }
    let blocks = fs::metadata(path).unwrap().blocks() * 512;
    let data: u64 = segs.iter().map(|(_, l)| l).sum();
    assert!(
        blocks <= data + 64 * 1024,
        "{} uses {blocks} bytes",
        path.display()
    );
}

const SEGS: [(u64, u64); 6] = [
    (8192, 4096),
    (65536, 8192),
    (131072, 4096),
    (262144, 4096),
    (524288, 100),
    (1048576 - 4096, 4096),
];
const REAL: u64 = 1048576 + 100;

#[test]
fn gnu_old_sparse_file_is_written_with_holes() {
    for_each_mode(gnu_old_sparse_file_is_written_with_holes_in);
}

fn gnu_old_sparse_file_is_written_with_holes_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    // Six fragments: four in the header, two in an extension block.
    let tar = Layer::new()
        .bytes(&gnu_sparse_entry("sparse", REAL, &SEGS))
        .file("after", m(0o644), b"after")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_holes(&root.join("sparse"), REAL, &SEGS);
    assert_eq!(fs::read(root.join("after")).unwrap(), b"after");
    // Beginning with data, ending exactly at the end.
    let segs = [(0, 4096), (40960, 4096)];
    let tar = Layer::new()
        .bytes(&gnu_sparse_entry("s2", 45056, &segs))
        .finish();
    let _landed2 = land_ok(mode, &root, &tar, &plain());
    assert_holes(&root.join("s2"), 45056, &segs);
}

#[test]
fn pax_sparse_formats_are_written_with_holes() {
    for_each_mode(pax_sparse_formats_are_written_with_holes_in);
}

fn pax_sparse_formats_are_written_with_holes_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let data = sparse_data(&SEGS);
    let real = REAL.to_string();
    let numblocks = SEGS.len().to_string();

    // 0.0: repeated offset/numbytes records.
    let mut recs: Vec<(String, Vec<u8>)> = vec![
        ("GNU.sparse.size".into(), real.clone().into_bytes()),
        (
            "GNU.sparse.numblocks".into(),
            numblocks.clone().into_bytes(),
        ),
    ];
    for (o, l) in SEGS {
        recs.push(("GNU.sparse.offset".into(), o.to_string().into_bytes()));
        recs.push(("GNU.sparse.numbytes".into(), l.to_string().into_bytes()));
    }
    let recs0: Vec<(&str, &[u8])> = recs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();

    // 0.1: one comma-separated map, real name in GNU.sparse.name.
    let map: Vec<String> = SEGS
        .iter()
        .flat_map(|(o, l)| [o.to_string(), l.to_string()])
        .collect();
    let map = map.join(",");

    // 1.0: the map at the start of the data, padded to a block.
    let mut data10 = format!("{}\n", SEGS.len()).into_bytes();
    for (o, l) in SEGS {
        data10.extend_from_slice(format!("{o}\n{l}\n").as_bytes());
    }
    pad(&mut data10);
    data10.extend_from_slice(&data);

    let tar = Layer::new()
        .pax(&recs0)
        .bytes(&ustar_entry("s00", &data))
        .pax(&[
            ("GNU.sparse.size", real.as_bytes()),
            ("GNU.sparse.numblocks", numblocks.as_bytes()),
            ("GNU.sparse.name", b"s01"),
            ("GNU.sparse.map", map.as_bytes()),
        ])
        .bytes(&ustar_entry("GNUSparseFile.1/s01", &data))
        .pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"s10"),
            ("GNU.sparse.realsize", real.as_bytes()),
        ])
        .bytes(&ustar_entry("GNUSparseFile.2/s10", &data10))
        .file("after", m(0o644), b"after")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    for name in ["s00", "s01", "s10"] {
        assert_holes(&root.join(name), REAL, &SEGS);
    }
    assert!(!root.join("GNUSparseFile.1").exists());
    assert_eq!(fs::read(root.join("after")).unwrap(), b"after");
}

#[test]
fn bad_sparse_maps_are_errors() {
    for_each_mode(bad_sparse_maps_are_errors_in);
}

fn bad_sparse_maps_are_errors_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    // Overlapping fragments.
    let tar = Layer::new()
        .bytes(&gnu_sparse_entry("s", 100_000, &[(0, 4096), (1000, 4096)]))
        .finish();
    let err = land(mode, &root, &tar, &plain()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Malformed { ref path, .. } if path == "s"),
        "{err}"
    );
    // A map that covers more than the entry holds.
    let tar = Layer::new()
        .pax(&[
            ("GNU.sparse.size", b"100000"),
            ("GNU.sparse.map", b"0,9000"),
            ("GNU.sparse.name", b"t"),
        ])
        .bytes(&ustar_entry("t", &[b'x'; 512]))
        .finish();
    let err = land(mode, &root, &tar, &plain()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Malformed { ref path, .. } if path == "t"),
        "{err}"
    );
}

// ================================================================ hostile layers

/// A temp dir holding the root and, beside it, a sentinel that no layer
/// may touch.
struct Jail {
    tmp: TempDir,
    root: PathBuf,
}

impl Jail {
    fn new() -> Self {
        let tmp = TempDir::new().unwrap();
        let root = mkdir(tmp.path(), "root");
        fs::write(tmp.path().join("sentinel"), b"sentinel").unwrap();
        mkdir(tmp.path(), "outside");
        fs::write(tmp.path().join("outside/keep"), b"keep").unwrap();
        Jail { tmp, root }
    }

    /// The temp dir outside the root holds exactly what `new` put there.
    fn assert_outside_untouched(&self) {
        let mut names: Vec<_> = fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["outside", "root", "sentinel"]);
        assert_eq!(
            fs::read(self.tmp.path().join("sentinel")).unwrap(),
            b"sentinel"
        );
        let inside: Vec<_> = fs::read_dir(self.tmp.path().join("outside"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(inside, ["keep"]);
        assert_eq!(
            fs::read(self.tmp.path().join("outside/keep")).unwrap(),
            b"keep"
        );
    }
}

#[test]
fn hostile_dotdot_traversal_is_refused() {
    for_each_mode(hostile_dotdot_traversal_is_refused_in);
}

fn hostile_dotdot_traversal_is_refused_in(mode: Mode) {
    for name in [
        &b"../escape"[..],
        b"a/../../escape",
        b"./../sentinel",
        b"../outside/keep",
    ] {
        let j = Jail::new();
        let tar = Layer::new()
            .dir("a", m(0o755))
            .raw(EntryType::Regular, name, b"", b"pwned")
            .finish();
        let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
        assert!(
            matches!(err, ArchiveError::Breakout { ref path, .. } if path.as_bytes() == name),
            "{err}"
        );
        j.assert_outside_untouched();
    }
}

#[test]
fn hostile_absolute_paths_stay_inside_the_root() {
    for_each_mode(hostile_absolute_paths_stay_inside_the_root_in);
}

fn hostile_absolute_paths_stay_inside_the_root_in(mode: Mode) {
    let j = Jail::new();
    let host = unique_tmp("abs");
    let outside_abs = j.tmp.path().join("outside/abs-file");
    let tar = Layer::new()
        .raw(
            EntryType::Regular,
            format!("{host}/file").as_bytes(),
            b"",
            b"in root",
        )
        .raw(
            EntryType::Regular,
            outside_abs.as_os_str().as_bytes(),
            b"",
            b"in root too",
        )
        .finish();
    let _landed = land_ok(mode, &j.root, &tar, &plain());
    assert_eq!(
        fs::read(j.root.join(&host[1..]).join("file")).unwrap(),
        b"in root"
    );
    let inner = j.root.join(outside_abs.strip_prefix("/").unwrap());
    assert_eq!(fs::read(inner).unwrap(), b"in root too");
    assert!(!Path::new(&host).exists());
    j.assert_outside_untouched();
}

#[test]
fn hostile_symlink_then_file_through_it_is_confined() {
    for_each_mode(hostile_symlink_then_file_through_it_is_confined_in);
}

fn hostile_symlink_then_file_through_it_is_confined_in(mode: Mode) {
    let j = Jail::new();
    let host = unique_tmp("link");
    let outside = j.tmp.path().join("outside");
    let tar = Layer::new()
        .symlink("link", &host)
        .file("link/file", m(0o644), b"through link")
        .symlink("up", "../../../../../../../../..")
        .file("up/climbed", m(0o644), b"climbed")
        .symlink("abs", outside.to_str().unwrap())
        .file("abs/keep", m(0o644), b"overwritten?")
        .symlink("tmp-link", "/tmp")
        .dir(&format!("tmp-link/{}", &host[5..]), m(0o755))
        .finish();
    let _landed = land_ok(mode, &j.root, &tar, &plain());
    // RESOLVE_IN_ROOT semantics: every target is taken inside the root.
    assert_eq!(
        fs::read(j.root.join(&host[1..]).join("file")).unwrap(),
        b"through link"
    );
    assert_eq!(fs::read(j.root.join("climbed")).unwrap(), b"climbed");
    let inner = j.root.join(outside.strip_prefix("/").unwrap());
    assert_eq!(fs::read(inner.join("keep")).unwrap(), b"overwritten?");
    assert!(!Path::new(&host).exists());
    j.assert_outside_untouched();
}

#[test]
fn hostile_symlink_as_final_component_is_replaced_not_followed() {
    for_each_mode(hostile_symlink_as_final_component_is_replaced_not_followed_in);
}

fn hostile_symlink_as_final_component_is_replaced_not_followed_in(mode: Mode) {
    let j = Jail::new();
    let outside = j.tmp.path().join("outside");
    let tar = Layer::new()
        .symlink("f", outside.join("keep").to_str().unwrap())
        .file("f", m(0o644), b"replaced")
        .symlink("d", outside.to_str().unwrap())
        .dir("d", m(0o755))
        .file("d/new", m(0o644), b"new")
        .finish();
    let _landed = land_ok(mode, &j.root, &tar, &plain());
    assert_eq!(fs::read(j.root.join("f")).unwrap(), b"replaced");
    assert!(fs::symlink_metadata(j.root.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(j.root.join("d/new")).unwrap(), b"new");
    j.assert_outside_untouched();
}

#[test]
fn hostile_hardlink_to_host_file_links_inside_or_fails() {
    let errs: Vec<_> = modes()
        .into_iter()
        .map(|mode| {
            (
                mode,
                hostile_hardlink_to_host_file_links_inside_or_fails_in(mode),
            )
        })
        .collect();
    assert_same_kind(&errs);
}

/// Returns the error for the sentinel's absolute path.
fn hostile_hardlink_to_host_file_links_inside_or_fails_in(mode: Mode) -> ArchiveError {
    let j = Jail::new();
    let host_ino = ino(Path::new("/etc/passwd"));
    let host_nlink = fs::metadata("/etc/passwd").unwrap().nlink();
    // Absent inside the root: an error, not the host file.
    let err = land(
        mode,
        &j.root,
        &Layer::new()
            .hardlink("pw", "/etc/passwd", m(0o644))
            .finish(),
        &plain(),
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::Hardlink { .. }), "{err}");
    assert!(!j.root.join("pw").exists());
    let sentinel = j.tmp.path().join("sentinel");
    for target in [&b"../sentinel"[..], b"../../etc/passwd"] {
        let tar = Layer::new()
            .raw(EntryType::Link, b"pw", target, b"")
            .finish();
        let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
        assert!(matches!(err, ArchiveError::Hardlink { .. }), "{err}");
    }
    // Absolute host path of the sentinel: also taken inside the root.
    let tar = Layer::new()
        .raw(EntryType::Link, b"s", sentinel.as_os_str().as_bytes(), b"")
        .finish();
    let sentinel_err = land(mode, &j.root, &tar, &plain()).unwrap_err();
    // Present inside the root: linked there.
    let tar = Layer::new()
        .file("etc/passwd", m(0o644), b"root:x:0:0::/root:/bin/sh\n")
        .hardlink("pw", "/etc/passwd", m(0o644))
        .symlink("etc-link", "/etc")
        .hardlink("pw2", "etc-link/../etc/passwd", m(0o644))
        .finish();
    let _landed = land_ok(mode, &j.root, &tar, &plain());
    let inner = ino(&j.root.join("etc/passwd"));
    assert_eq!(ino(&j.root.join("pw")), inner);
    assert_ne!(inner, host_ino);
    assert_eq!(fs::metadata("/etc/passwd").unwrap().nlink(), host_nlink);
    assert_eq!(fs::metadata(&sentinel).unwrap().nlink(), 1);
    j.assert_outside_untouched();
    sentinel_err
}

#[test]
fn hostile_whiteouts_cannot_delete_outside() {
    let j = Jail::new();
    let outside = j.tmp.path().join("outside");
    for mode in modes() {
        for name in [
            &b"../../.wh.sentinel"[..],
            b"../.wh.sentinel",
            b"a/../../.wh.outside",
        ] {
            let tar = Layer::new()
                .raw(EntryType::Regular, name, b"", b"")
                .finish();
            let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
            assert!(
                matches!(err, ArchiveError::Breakout { .. }),
                "{mode:?}: {err}"
            );
        }
        for name in [&b".wh."[..], b"d/.wh.."] {
            let tar = Layer::new()
                .raw(EntryType::Regular, name, b"", b"")
                .finish();
            let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
            assert!(
                matches!(err, ArchiveError::InvalidWhiteout { .. }),
                "{mode:?}: {err}"
            );
        }
    }
    // (Plain mode only: an index never deletes, it is always overlay's.)
    // Through symlinks to the outside, and of a symlink to the outside
    // (from a lower layer: whiteouts do not hit the same layer's entries).
    let lower = Layer::new()
        .symlink("out", outside.to_str().unwrap())
        .finish();
    apply_ok(&j.root, &lower, &plain());
    let tar = Layer::new()
        .whiteout("out/.wh.keep")
        .symlink("parent", j.tmp.path().to_str().unwrap())
        .whiteout("parent/.wh.sentinel")
        .whiteout("parent/.wh.outside")
        .symlink("dot", "..")
        .whiteout("dot/.wh.sentinel")
        .whiteout(".wh.out")
        .finish();
    apply_ok(&j.root, &tar, &plain());
    assert!(fs::symlink_metadata(j.root.join("out")).is_err());
    j.assert_outside_untouched();

    // The same in overlay mode, where whiteouts create device nodes;
    // indexed, in a jail of its own.
    if is_root() {
        for mode in modes() {
            let fresh;
            let j = match mode {
                Mode::Applied => &j,
                Mode::Indexed { .. } => {
                    fresh = Jail::new();
                    &fresh
                }
            };
            let outside = j.tmp.path().join("outside");
            let lower = j.tmp.path().join("outside");
            let tar = Layer::new()
                .symlink("o2", outside.to_str().unwrap())
                .whiteout("o2/.wh.keep")
                .finish();
            let _landed = land_ok(mode, &j.root, &tar, &overlay(&[&lower]));
            j.assert_outside_untouched();
        }
    }
}

#[test]
fn hostile_symlink_loops_are_errors() {
    let errs: Vec<_> = modes()
        .into_iter()
        .map(|mode| (mode, hostile_symlink_loops_are_errors_in(mode)))
        .collect();
    assert_same_kind(&errs);
}

fn hostile_symlink_loops_are_errors_in(mode: Mode) -> ArchiveError {
    let j = Jail::new();
    let tar = Layer::new()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", m(0o644), b"x")
        .finish();
    let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
    assert!(err.to_string().contains("symbolic links"), "{err}");
    j.assert_outside_untouched();
    err
}

#[test]
fn directory_replaced_later_in_the_layer_by_a_file() {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .dir("d", m(0o755))
        .dir("d/sub", m(0o755))
        .file("d", m(0o644), b"file now")
        .whiteout("d/.wh.sub")
        .finish();
    apply_ok(&root, &tar, &plain());
    assert_eq!(render_with(&root, false), lines(&["f d 644 \"file now\""]));
}

#[test]
fn file_below_a_file_is_an_error() {
    for_each_mode(file_below_a_file_is_an_error_in);
}

fn file_below_a_file_is_an_error_in(mode: Mode) {
    let j = Jail::new();
    let tar = Layer::new()
        .file("f", m(0o644), b"f")
        .file("f/x", m(0o644), b"x")
        .finish();
    let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
    assert!(matches!(err, ArchiveError::NotADirectory { .. }), "{err}");
    assert!(err.to_string().contains("/f"), "{err}");
}

// ================================================================ streams and digests

fn sample_tar() -> Vec<u8> {
    let mut tar = Layer::new()
        .dir("d", m(0o755))
        .file("d/a", m(0o644), &[7u8; 5000])
        .file("d/b", m(0o644), b"b")
        .finish();
    // Writers often pad to a 10 KiB record: the digest covers the padding.
    tar.resize(tar.len().next_multiple_of(10240), 0);
    tar
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

#[test]
fn diff_id_and_size_for_each_compression() {
    for_each_mode(diff_id_and_size_for_each_compression_in);
}

fn diff_id_and_size_for_each_compression_in(mode: Mode) {
    let tar = sample_tar();
    let want = crate::digest::Digest::of(&tar);
    // Two gzip members, as some tools write.
    let (h1, h2) = tar.split_at(3000);
    let multi = [gzip(h1), gzip(h2)].concat();
    for (compression, blob) in [
        (Compression::None, tar.clone()),
        (Compression::Gzip, gzip(&tar)),
        (Compression::Gzip, multi),
        (Compression::Zstd, zstd(&tar)),
    ] {
        let tmp = TempDir::new().unwrap();
        let landed = land_stream(mode, tmp.path(), blob.as_slice(), compression, &plain()).unwrap();
        let applied = &landed.applied;
        assert_eq!(applied.diff_id, want, "{compression}");
        assert_eq!(applied.uncompressed_size, tar.len() as u64, "{compression}");
        assert_eq!(applied.entries, 3);
        assert_eq!(fs::read(tmp.path().join("d/a")).unwrap(), vec![7u8; 5000]);
        assert_eq!(fs::read(tmp.path().join("d/b")).unwrap(), b"b");
    }
}

#[test]
fn diff_id_covers_bytes_after_the_archive_end() {
    for_each_mode(diff_id_covers_bytes_after_the_archive_end_in);
}

fn diff_id_covers_bytes_after_the_archive_end_in(mode: Mode) {
    let mut tar = sample_tar();
    tar.extend_from_slice(b"trailing bytes after the end-of-archive blocks");
    let tmp = TempDir::new().unwrap();
    let landed = land(mode, tmp.path(), &tar, &plain()).unwrap();
    let applied = &landed.applied;
    assert_eq!(applied.diff_id, crate::digest::Digest::of(&tar));
    assert_eq!(applied.uncompressed_size, tar.len() as u64);
}

#[test]
fn corrupt_gzip_is_an_error() {
    for_each_mode(corrupt_gzip_is_an_error_in);
}

fn corrupt_gzip_is_an_error_in(mode: Mode) {
    let tar = sample_tar();
    let good = gzip(&tar);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut bad_crc = good.clone();
    let n = bad_crc.len();
    bad_crc[n - 6] ^= 0xff; // inside the CRC32 trailer
    for blob in [flipped, bad_crc, b"not gzip at all, just text".to_vec()] {
        let tmp = TempDir::new().unwrap();
        let err = land_stream(
            mode,
            tmp.path(),
            blob.as_slice(),
            Compression::Gzip,
            &plain(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::Stream {
                    compression: Compression::Gzip,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("reading gzip layer stream: "),
            "{err}"
        );
    }
    // Cut short: the decompressor or the tar reader notices.
    let tmp = TempDir::new().unwrap();
    let half = &good[..good.len() / 2];
    let err = land_stream(mode, tmp.path(), half, Compression::Gzip, &plain()).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Stream { .. } | ArchiveError::Truncated { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn corrupt_or_truncated_zstd_is_an_error() {
    for_each_mode(corrupt_or_truncated_zstd_is_an_error_in);
}

fn corrupt_or_truncated_zstd_is_an_error_in(mode: Mode) {
    let blob = zstd(&sample_tar());
    let tmp = TempDir::new().unwrap();
    let err = land_stream(
        mode,
        tmp.path(),
        &blob[..blob.len() / 2],
        Compression::Zstd,
        &plain(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Stream {
                compression: Compression::Zstd,
                ..
            } | ArchiveError::Truncated { .. }
        ),
        "{err:?}"
    );
    let tmp = TempDir::new().unwrap();
    let err = land_stream(
        mode,
        tmp.path(),
        &b"\x28\xb5\x2f\xfdgarbage"[..],
        Compression::Zstd,
        &plain(),
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::Stream { .. }), "{err:?}");
}

#[test]
fn truncated_tar_is_an_error_naming_the_entry() {
    for_each_mode(truncated_tar_is_an_error_naming_the_entry_in);
}

fn truncated_tar_is_an_error_naming_the_entry_in(mode: Mode) {
    let tar = Layer::new()
        .file("first", m(0o644), b"1")
        .file("big", m(0o644), &[1u8; 4000])
        .file("last", m(0o644), b"2")
        .finish();
    // Cut inside big's data.
    let tmp = TempDir::new().unwrap();
    let err = land(mode, tmp.path(), &tar[..512 * 3 + 100], &plain()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Truncated { ref path, .. } if path == "big"),
        "{err:?}"
    );
    assert!(err.to_string().contains("big"), "{err}");
    // Cut inside the last header.
    let last_header = 512 * 3 + 4096;
    let tmp = TempDir::new().unwrap();
    let err = land(mode, tmp.path(), &tar[..last_header + 200], &plain()).unwrap_err();
    assert!(matches!(err, ArchiveError::Truncated { .. }), "{err:?}");
    // A damaged header checksum.
    let mut bad = tar.clone();
    bad[last_header + 10] ^= 0x20;
    let tmp = TempDir::new().unwrap();
    let err = land(mode, tmp.path(), &bad, &plain()).unwrap_err();
    assert!(matches!(err, ArchiveError::Malformed { .. }), "{err:?}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn unsupported_entry_type_is_an_error() {
    for_each_mode(unsupported_entry_type_is_an_error_in);
}

fn unsupported_entry_type_is_an_error_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let tar = Layer::new()
        .raw(EntryType::new(b'V'), b"label", b"", b"")
        .finish();
    let err = land(mode, tmp.path(), &tar, &plain()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::UnsupportedType { ref path, typeflag: 'V' } if path == "label"),
        "{err:?}"
    );
}

#[test]
fn absurd_sizes_are_errors_not_panics() {
    for_each_mode(absurd_sizes_are_errors_not_panics_in);
}

fn absurd_sizes_are_errors_not_panics_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let tar = Layer::new()
        .pax(&[("size", u64::MAX.to_string().as_bytes())])
        .file("f", m(0o644), b"x")
        .finish();
    let err = land(mode, tmp.path(), &tar, &plain()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Malformed { ref path, .. } if path == "f"),
        "{err:?}"
    );
    // A global header with a base-256 size near u64::MAX.
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XGlobalHeader);
    h.as_old_mut().size = [
        0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    h.set_cksum();
    let tar = Layer::new().bytes(h.as_bytes()).finish();
    let err = land(mode, tmp.path(), &tar, &plain()).unwrap_err();
    assert!(matches!(err, ArchiveError::Malformed { .. }), "{err:?}");
}

#[test]
fn missing_root_or_lower_is_an_error() {
    let tmp = TempDir::new().unwrap();
    let tar = Layer::new().file("f", m(0o644), b"x").finish();
    let err = apply(&tmp.path().join("nope"), &tar, &plain()).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Open {
                what: "apply root",
                ..
            }
        ),
        "{err:?}"
    );
    // The index's directory, missing: its tar cannot be made there.
    let err = index_layer(
        &tmp.path().join("nope"),
        &tar[..],
        Compression::None,
        &IndexBelow::Nothing,
        false,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Open {
                what: "layer file",
                ..
            }
        ),
        "{err:?}"
    );
    let missing = tmp.path().join("no-lower");
    for mode in modes() {
        let err = land(mode, tmp.path(), &tar, &overlay(&[&missing])).unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::Open {
                    what: "overlay lower",
                    ..
                }
            ),
            "{mode:?}: {err:?}"
        );
        assert!(err.to_string().contains("no-lower"), "{err}");
    }
}

/// A tiny deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn damaged_layers_never_panic_or_escape() {
    let layer = Layer::new()
        .dir("d", m(0o755))
        .pax(&[("SCHILY.xattr.user.x", b"1"), ("mtime", b"1.5")])
        .file("d/f", m(0o644), &[3u8; 1500])
        .symlink("d/l", "../f")
        .hardlink("d/h", "d/f", m(0o644))
        .file(&format!("{}/long", "n".repeat(120)), m(0o644), b"long")
        .bytes(&gnu_sparse_entry("sp", 20000, &[(4096, 600), (12000, 100)]))
        .whiteout("d/.wh.gone")
        .finish();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let modes = modes();
    for round in 0..300 {
        let mut bad = layer.clone();
        for _ in 0..1 + rng.next() % 8 {
            let i = (rng.next() % bad.len() as u64) as usize;
            bad[i] = rng.next() as u8;
        }
        if round % 5 == 0 {
            let cut = (rng.next() % bad.len() as u64) as usize;
            bad.truncate(cut);
        }
        let gz = gzip(&bad);
        for &mode in &modes {
            let j = Jail::new();
            // Odd rounds in overlay mode, with a lower outside the root.
            let lower = j.tmp.path().join("outside");
            let opts = if round % 2 == 1 {
                overlay(&[&lower])
            } else {
                plain()
            };
            for (blob, compression) in [(&bad[..], Compression::None), (&gz[..], Compression::Gzip)]
            {
                let landed = land_stream(mode, &j.root, blob, compression, &opts);
                if let (Ok(_), Mode::Indexed { .. }) = (&landed, mode) {
                    // What the index accepted, the kernel reads back whole.
                    render(&j.root);
                }
            }
            j.assert_outside_untouched();
        }
    }
}

// ================================================================ hostile sizes and depths

/// Runs `f` on a thread with a 256 KiB stack: room for the code, but not
/// for a frame per level of the trees these tests make.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// An entry whose name may be any length: a GNU long-name entry first
/// when it does not fit the header.
fn long_entry(out: &mut Vec<u8>, name: &[u8], kind: EntryType, data: &[u8]) {
    if name.len() > 100 {
        let mut long = Header::new_gnu();
        long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        long.set_entry_type(EntryType::GNULongName);
        long.set_mode(0o644);
        long.set_size(name.len() as u64 + 1);
        long.set_cksum();
        out.extend_from_slice(long.as_bytes());
        out.extend_from_slice(name);
        out.push(0);
        pad(out);
    }
    let mut h = Header::new_gnu();
    let n = name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    h.set_entry_type(kind);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(MTIME);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    pad(out);
}

/// A layer made as it is read: a directory chain `a/a/.../a/` `depth`
/// levels deep, one entry per level, then a file `a` replacing the chain's
/// top. 40,000 levels are 1.6 GB of tar, so it is never held whole.
struct DeepChain {
    depth: usize,
    level: usize,
    name: Vec<u8>,
    buf: Vec<u8>,
    at: usize,
    /// Bytes handed out so far.
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DeepChain {
    fn new(depth: usize) -> Self {
        DeepChain {
            depth,
            level: 0,
            name: Vec::new(),
            buf: Vec::new(),
            at: 0,
            read: Default::default(),
        }
    }
}

impl Read for DeepChain {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
            if self.level < self.depth {
                if !self.name.is_empty() {
                    self.name.push(b'/');
                }
                self.name.push(b'a');
                let dir = [&self.name[..], b"/"].concat();
                long_entry(&mut self.buf, &dir, EntryType::Directory, b"");
            } else if self.level == self.depth {
                long_entry(&mut self.buf, b"a", EntryType::Regular, b"replaced");
                self.buf.extend_from_slice(&[0; 1024]);
            } else {
                return Ok(0);
            }
            self.level += 1;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A chain `a/a/...` `depth` levels deep in `dir` with a file at the
/// bottom, made through fds: its paths are far longer than PATH_MAX.
fn deep_tree(dir: &Path, depth: usize) {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::{Mode, mkdirat};
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut cur = open(dir, flags, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(cur.as_fd(), "a", Mode::from_bits_truncate(0o755)).unwrap();
        cur = openat(cur.as_fd(), "a", flags, Mode::empty()).unwrap();
    }
    let file = OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
    openat(cur.as_fd(), "f", file, Mode::from_bits_truncate(0o644)).unwrap();
}

#[test]
fn a_directory_chain_deeper_than_path_max_is_refused_quickly() {
    for_each_mode(a_directory_chain_deeper_than_path_max_is_refused_quickly_in);
}

fn a_directory_chain_deeper_than_path_max_is_refused_quickly_in(mode: Mode) {
    for opts in [plain(), overlay(&[])] {
        let tmp = TempDir::new().unwrap();
        let root = mkdir(tmp.path(), "root");
        let layer = DeepChain::new(40_000);
        let read = layer.read.clone();
        let start = std::time::Instant::now();
        let err = land_stream(mode, &root, layer, Compression::None, &opts).unwrap_err();
        let read = read.load(Ordering::Relaxed);
        eprintln!(
            "{mode:?}: 40,000-deep chain refused in {:?} after {} KiB of its 1.6 GB",
            start.elapsed(),
            read >> 10
        );
        // Level 2048 is the first whose path ("a/" 2048 times) is too long.
        assert!(
            matches!(&err, ArchiveError::Refused { path, reason }
                if *path == "a/".repeat(2048) && reason.contains("4095 bytes long")),
            "{err}"
        );
        assert!(read < 64 << 20, "read {read} bytes");
        // The snapshot store removes what it made the same way.
        let r = root.clone();
        on_small_stack(move || remove_tree(&r)).unwrap();
        assert!(!root.exists());
    }
}

#[test]
fn a_deep_chain_replaced_by_a_file_is_removed_without_recursion() {
    for_each_mode(a_deep_chain_replaced_by_a_file_is_removed_without_recursion_in);
}

fn a_deep_chain_replaced_by_a_file_is_removed_without_recursion_in(mode: Mode) {
    for opts in [plain(), overlay(&[])] {
        let tmp = TempDir::new().unwrap();
        let root = mkdir(tmp.path(), "root");
        let r = root.clone();
        let layer = DeepChain::new(2000);
        let landed = on_small_stack(move || land_stream(mode, &r, layer, Compression::None, &opts));
        let landed = landed.unwrap();
        assert_eq!(landed.applied.entries, 2001);
        assert_eq!(render_with(&root, false), lines(&["f a 644 \"replaced\""]));
    }
}

#[test]
fn a_symlink_cannot_lengthen_a_path_past_the_limit() {
    for_each_mode(a_symlink_cannot_lengthen_a_path_past_the_limit_in);
}

fn a_symlink_cannot_lengthen_a_path_past_the_limit_in(mode: Mode) {
    let j = Jail::new();
    let deep = vec!["d"; 1500].join("/");
    let mut below = Vec::new();
    long_entry(
        &mut below,
        format!("l/{}/x", vec!["e"; 1500].join("/")).as_bytes(),
        EntryType::Regular,
        b"x",
    );
    let tar = Layer::new()
        .dir(&deep, m(0o755))
        .symlink("l", &deep)
        .bytes(&below)
        .finish();
    let err = land(mode, &j.root, &tar, &plain()).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Refused { path, reason }
            if path.starts_with("l/e/e/") && reason.contains("longer than 4094")),
        "{err}"
    );
    j.assert_outside_untouched();
}

#[test]
fn the_snapshot_store_removes_a_deep_tree_without_recursion() {
    use crate::snapshot::Snapshotter;
    let h = crate::snapshot::testsuite::harness(Box::new(crate::snapshot::native::Native)).unwrap();
    h.snapshots
        .prepare("active", None, Default::default())
        .unwrap();
    let (fs_dir, _) = h.snapshots.apply_dirs("active").unwrap();
    deep_tree(&fs_dir, 40_000);
    // Half removed before a crash: GC after the restart meets it.
    let dir = h.snapshots.root().path().to_path_buf();
    let orphan = mkdir(&dir, "removing-999");
    deep_tree(&orphan, 40_000);
    let (snapshots, db) = (h.snapshots.clone(), h.db.clone());
    on_small_stack(move || {
        snapshots.remove("active")?;
        crate::snapshot::garbage_collect(&db).map(drop)
    })
    .unwrap();
    assert!(!fs_dir.exists() && !orphan.exists());
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn native_copy_of_a_deep_tree_does_not_recurse() {
    let tmp = TempDir::new().unwrap();
    let src = mkdir(tmp.path(), "src");
    deep_tree(&src, 1500);
    let dst = tmp.path().join("dst");
    let (s, d) = (src.clone(), dst.clone());
    on_small_stack(move || crate::snapshot::native::copy_tree(&s, &d)).unwrap();
    assert!(dst.join(vec!["a"; 1500].join("/")).join("f").is_file());
    remove_tree(&dst).unwrap();
    remove_tree(&src).unwrap();
}

/// One PAX record, its length prefix counting itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = [key, b"=", value, b"\n"].concat();
    let mut len = body.len() + 2;
    while format!("{len} ").len() + body.len() != len {
        len += 1;
    }
    [format!("{len} ").as_bytes(), &body].concat()
}

/// A PAX extended (`x`) or global (`g`) header holding `records`.
fn ext_header(kind: EntryType, records: &[u8]) -> Vec<u8> {
    let mut h = Header::new_ustar();
    h.set_path("PaxHeaders/f").unwrap();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(records.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(records);
    pad(&mut out);
    out
}

/// 48 `x` headers of about 1 MiB, each of 25,000 distinct user xattrs,
/// in front of one small file `f`.
fn pax_flood() -> Vec<u8> {
    let mut layer = Layer::new();
    for h in 0..48 {
        let mut records = Vec::with_capacity(1 << 20);
        for i in 0..25_000 {
            let key = format!("SCHILY.xattr.user.{h:02}.{i:05}");
            records.extend(pax_record(key.as_bytes(), b"0123456789"));
        }
        assert!(records.len() <= 1 << 20);
        layer = layer.bytes(&ext_header(EntryType::XHeader, &records));
    }
    layer.file("f", m(0o644), b"small").finish()
}

#[test]
fn a_flood_of_pax_headers_is_refused_quickly_naming_the_entry() {
    for_each_mode(a_flood_of_pax_headers_is_refused_quickly_naming_the_entry_in);
}

fn a_flood_of_pax_headers_is_refused_quickly_naming_the_entry_in(mode: Mode) {
    let layer = pax_flood();
    let tmp = TempDir::new().unwrap();
    let start = std::time::Instant::now();
    let err = land(mode, tmp.path(), &layer, &plain()).unwrap_err();
    eprintln!(
        "{} MiB PAX flood refused in {:?}",
        layer.len() >> 20,
        start.elapsed()
    );
    assert!(
        matches!(&err, ArchiveError::Refused { path, reason }
            if path == "f" && reason.contains("65536")),
        "{err}"
    );
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn xattrs_beyond_what_linux_keeps_refuse_their_entry() {
    for_each_mode(xattrs_beyond_what_linux_keeps_refuse_their_entry_in);
}

fn xattrs_beyond_what_linux_keeps_refuse_their_entry_in(mode: Mode) {
    // 5000 names of 16 bytes with their NULs: more than 64 KiB.
    let many: Vec<u8> = (0..5000)
        .flat_map(|i| pax_record(format!("SCHILY.xattr.user.{i:010}").as_bytes(), b""))
        .collect();
    let big = pax_record(b"SCHILY.xattr.user.big", &[b'v'; 65537]);
    for (records, name) in [(many, "named/by/pax"), (big, "named/by/pax")] {
        let records = [records, pax_record(b"path", name.as_bytes())].concat();
        let tar = Layer::new()
            .bytes(&ext_header(EntryType::XHeader, &records))
            .file("header-name", m(0o644), b"x")
            .finish();
        let tmp = TempDir::new().unwrap();
        let err = land(mode, tmp.path(), &tar, &plain()).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Refused { path, .. } if path == name),
            "{err}"
        );
    }
}

#[test]
fn a_later_pax_header_replaces_the_earlier_one_as_root() {
    require_root!();
    for_each_mode(a_later_pax_header_replaces_the_earlier_one);
}

fn a_later_pax_header_replaces_the_earlier_one(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let tar = Layer::new()
        .pax(&[
            ("path", b"first"),
            ("SCHILY.xattr.user.first", b"1"),
            ("mtime", b"1234"),
        ])
        .pax(&[("SCHILY.xattr.user.second", b"2")])
        .file("f", m(0o644), b"f")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(
        render_with(&root, false),
        lines(&["f f 644 \"f\" x[user.second=2]"])
    );
    assert_eq!(mtime(&root.join("f")), (MTIME as i64, 0));
}

#[test]
fn a_global_header_ends_the_extended_headers_before_it_as_root() {
    require_root!();
    for_each_mode(a_global_header_ends_the_extended_headers_before_it);
}

fn a_global_header_ends_the_extended_headers_before_it(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let global = ext_header(EntryType::XGlobalHeader, &pax_record(b"comment", b"g"));
    let tar = Layer::new()
        .pax(&[("path", b"first"), ("SCHILY.xattr.user.first", b"1")])
        .bytes(&global)
        .file("f", m(0o644), b"f")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(render_with(&root, false), lines(&["f f 644 \"f\""]));
    // One larger than Go's archive/tar reads is refused, like an `x` one.
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XGlobalHeader);
    h.set_size((1 << 20) + 1);
    h.set_cksum();
    let tar = Layer::new().bytes(h.as_bytes()).finish();
    let err = land(mode, &root, &tar, &plain()).unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
}

#[test]
fn a_zero_block_then_a_header_is_an_error() {
    for_each_mode(a_zero_block_then_a_header_is_an_error_in);
}

fn a_zero_block_then_a_header_is_an_error_in(mode: Mode) {
    let first = Layer::new().file("a", m(0o644), b"a").finish();
    let hidden = Layer::new().file("b", m(0o644), b"b").finish();
    // One zero block instead of the two that end an archive.
    let tar = [&first[..first.len() - 512], &hidden].concat();
    for (compression, blob) in [
        (Compression::None, tar.clone()),
        (Compression::Gzip, gzip(&tar)),
    ] {
        let tmp = TempDir::new().unwrap();
        let err =
            land_stream(mode, tmp.path(), blob.as_slice(), compression, &plain()).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Malformed { path, reason }
                if path == "b" && reason.contains("zero block")),
            "{compression}: {err}"
        );
    }
}

#[test]
fn two_zero_blocks_or_one_at_the_end_end_the_archive() {
    for_each_mode(two_zero_blocks_or_one_at_the_end_end_the_archive_in);
}

fn two_zero_blocks_or_one_at_the_end_end_the_archive_in(mode: Mode) {
    let first = Layer::new().file("a", m(0o644), b"a").finish();
    let hidden = Layer::new().file("b", m(0o644), b"b").finish();
    let after_end = [&first[..], &hidden].concat();
    let one_then_eof = &first[..first.len() - 512];
    for tar in [&after_end[..], one_then_eof] {
        let tmp = TempDir::new().unwrap();
        let landed = land(mode, tmp.path(), tar, &plain()).unwrap();
        let applied = &landed.applied;
        assert_eq!(render_with(tmp.path(), false), lines(&["f a 644 \"a\""]));
        // What follows the end is hashed, not applied.
        assert_eq!(applied.diff_id, crate::digest::Digest::of(tar));
        assert_eq!(applied.uncompressed_size, tar.len() as u64);
    }
}

/// Names decided as Go's archive/tar decides them, so that hoist writes
/// the files a scanner sees: a GNU long name over a PAX path, an empty PAX
/// path meaning none, and `GNU.sparse.name` only for a sparse file.
#[test]
fn entry_names_are_chosen_as_go_chooses_them() {
    for_each_mode(entry_names_are_chosen_as_go_chooses_them_in);
}

fn entry_names_are_chosen_as_go_chooses_them_in(mode: Mode) {
    let tmp = TempDir::new().unwrap();
    let root = mkdir(tmp.path(), "root");
    let long = format!("long/{}", "n".repeat(120));
    let mut by_long_name = Vec::new();
    long_entry(&mut by_long_name, long.as_bytes(), EntryType::Regular, b"1");
    let tar = Layer::new()
        .dir("long", m(0o755))
        .pax(&[("path", b"pax-path")])
        .bytes(&by_long_name)
        .pax(&[("path", b"")])
        .file("header-name", m(0o644), b"2")
        .pax(&[("GNU.sparse.name", b"sparse-name")])
        .file("not-sparse", m(0o644), b"3")
        .finish();
    let _landed = land_ok(mode, &root, &tar, &plain());
    assert_eq!(
        render_with(&root, false),
        lines(&[
            "d long 755",
            &format!("f {long} 644 \"1\""),
            "f header-name 644 \"2\"",
            "f not-sparse 644 \"3\"",
        ])
    );
}

/// `..` in a symlink target steps back up the resolved path, which the
/// walk reopens by its real path rather than keeping an fd per level.
#[test]
fn symlink_targets_climb_from_the_link_s_directory() {
    for_each_mode(symlink_targets_climb_from_the_link_s_directory_in);
}

fn symlink_targets_climb_from_the_link_s_directory_in(mode: Mode) {
    let j = Jail::new();
    let tar = Layer::new()
        .dir("a/b/c", m(0o755))
        .symlink("a/b/c/up", "../../x")
        .file("a/b/c/up/f", m(0o644), b"f")
        .symlink("a/b/c/far", "../../../../../../y")
        .file("a/b/c/far/g", m(0o644), b"g")
        .finish();
    let _landed = land_ok(mode, &j.root, &tar, &plain());
    assert_eq!(fs::read(j.root.join("a/x/f")).unwrap(), b"f");
    assert_eq!(fs::read(j.root.join("y/g")).unwrap(), b"g");
    j.assert_outside_untouched();
}
