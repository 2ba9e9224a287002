//! The tar indexer (`index_layer`) on any uncompressed layer: the tar is
//! kept as `layer.tar`, its headers become a tree in memory and an EROFS
//! metadata image `layer.erofs` is written. Nothing is mounted. Each run
//! gets a fresh temporary directory:
//!
//! ```text
//! tmp/layer/     the directory indexed into
//! tmp/lower/     only when the layer goes over a lower (see below): d/ with
//!                d/f, d/sub/deep and an xattr, e/, h (a hardlink to d/f),
//!                l -> d, up -> ../sentinel, abs -> /<tmp>/sentinel, a
//!                sparse file, a FIFO, a char device, an opaque o/ and a
//!                whiteout gone (made as an overlay upper, by apply_layer)
//! tmp/sentinel
//! ```
//!
//! What is below the layer comes from byte 511 of the input, the padding at
//! the end of the first header block (no tar format gives it a meaning): its
//! low seven bits modulo 3 pick nothing, not known yet (a parallel unpack)
//! or `tmp/lower`; its high bit sets `userxattr`.
//!
//! No panic; afterwards `tmp/layer` holds nothing but `layer.tar` and
//! `layer.erofs` (a `layer.staging` left behind is a failure), `tmp` holds
//! nothing else, the sentinel and the lower are unchanged, and the whole
//! directory can be removed. When the index succeeds, `layer.tar` is the
//! input byte for byte, the digest and size it reports are the input's, and
//! the image is not empty and has EROFS's magic at byte 1024.
//!
//! `index_layer` fsyncs the tar, the image and the directory on every run:
//! on a disk that is a journal commit each time, so the temporary
//! directories go to `/dev/shm` (tmpfs: an fsync costs nothing there) when
//! it is there, else to `$TMPDIR`.
//!
//! Header checksums are fixed up first, as in `tar_apply.rs` (see
//! [`fix_checksums`]): otherwise nearly every mutation of a header stops at
//! the checksum check.
//!
//! Seeds (`fuzz/corpus/tar_index/`): copies of tar_apply's (nothing below),
//! some of them again with byte 511 set (`*_unknown`, `*_lower`), and
//! layers with sparse files, hardlinks within the layer and to the lower's
//! files, whiteouts over the lower, long names and xattrs; `crash_*` are
//! inputs that made this target fail, kept so that they keep being run.
#![no_main]

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hoist::archive::{
    ApplyOptions, Compression, INDEX_MEMORY, IndexBelow, LAYER_IMAGE, LAYER_TAR, WhiteoutMode,
    apply_layer, index_layer_within, remove_tree,
};
use hoist::digest::Digest;
use libfuzzer_sys::fuzz_target;

#[path = "../common/tar.rs"]
mod tar;
use tar::{fix_checksums, listing};

const SENTINEL: &[u8] = b"sentinel";
/// EROFS's superblock magic, little-endian at byte 1024 of the image.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const SUPER_OFFSET: usize = 1024;

fuzz_target!(|input: &[u8]| {
    let mut data = input.to_vec();
    fix_checksums(&mut data);
    let data = data.as_slice();
    let selector = data.get(511).copied().unwrap_or(0);
    let userxattr = selector & 0x80 != 0;

    let tmp = tempfile::Builder::new()
        .prefix("hoist-fuzz-index-")
        .tempdir_in(scratch_parent())
        .expect("a temporary directory");
    let top = tmp.path();
    let dir = top.join("layer");
    let lower = top.join("lower");
    fs::write(top.join("sentinel"), SENTINEL).unwrap();
    fs::create_dir(&dir).unwrap();
    let below = match (selector & 0x7f) % 3 {
        0 => IndexBelow::Nothing,
        1 => IndexBelow::Unknown,
        _ => {
            make_lower(&lower, top);
            IndexBelow::Lowers(vec![lower.clone()])
        }
    };
    let lower_before = matches!(below, IndexBelow::Lowers(_)).then(|| listing(&lower));

    // Half the inputs are indexed with the tree spilled to disk from its
    // first entry.
    let memory = if selector & 0x40 != 0 { 0 } else { INDEX_MEMORY };
    let result = index_layer_within(&dir, data, Compression::None, &below, userxattr, memory);

    let inside = names(&dir);
    assert!(
        inside
            .iter()
            .all(|n| n.as_str() == LAYER_TAR || n.as_str() == LAYER_IMAGE),
        "index_layer left {inside:?} in {dir:?} (result: {result:?})"
    );
    let mut expected = vec!["layer", "sentinel"];
    if lower_before.is_some() {
        expected.insert(1, "lower");
    }
    assert_eq!(names(top), expected, "something appeared in {top:?}");
    let sentinel = fs::symlink_metadata(top.join("sentinel")).unwrap();
    assert!(
        sentinel.is_file() && sentinel.nlink() == 1,
        "sentinel linked or replaced"
    );
    assert_eq!(fs::read(top.join("sentinel")).unwrap(), SENTINEL);
    if let Some(before) = lower_before {
        assert_eq!(listing(&lower), before, "the lower changed");
    }

    if let Ok(applied) = &result {
        let kept = fs::read(dir.join(LAYER_TAR)).expect("layer.tar after a successful index");
        assert!(kept == data, "layer.tar differs from the input");
        assert_eq!(applied.uncompressed_size, data.len() as u64);
        assert_eq!(applied.diff_id, Digest::of(data));
        let mut image =
            fs::File::open(dir.join(LAYER_IMAGE)).expect("layer.erofs after a successful index");
        let len = image.metadata().unwrap().len();
        assert!(len > 0, "layer.erofs is empty");
        let mut head = [0u8; SUPER_OFFSET + 4];
        image
            .read_exact(&mut head)
            .unwrap_or_else(|e| panic!("layer.erofs is {len} bytes, no superblock: {e}"));
        let magic = u32::from_le_bytes(head[SUPER_OFFSET..].try_into().unwrap());
        assert_eq!(
            magic, EROFS_MAGIC,
            "layer.erofs has magic {magic:#x} at byte {SUPER_OFFSET}"
        );
    }

    remove_tree(top).expect("the temporary directory can be removed");
    assert!(!top.exists(), "{top:?} was not removed");
});

/// Where the temporary directories go: tmpfs if there is one.
fn scratch_parent() -> &'static Path {
    static PARENT: OnceLock<PathBuf> = OnceLock::new();
    PARENT.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let writable = tempfile::Builder::new()
            .prefix("hoist-fuzz-probe-")
            .tempdir_in(shm)
            .is_ok();
        if writable {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Builds the lower at `lower` (`top` holds the sentinel): most of it by
/// applying [`lower_tar`] as an overlay upper, as a layer below this one
/// would have been, then the absolute symlink and a sparse file. Not as
/// root, the whiteout, the opaque xattr and the device may be missing (the
/// tar puts them last).
fn make_lower(lower: &Path, top: &Path) {
    fs::create_dir(lower).unwrap();
    let upper = ApplyOptions {
        whiteouts: WhiteoutMode::Overlay {
            userxattr: false,
            lowers: Vec::new(),
        },
    };
    let applied = apply_layer(lower, lower_tar(), Compression::None, &upper);
    if let Err(e) = applied
        && fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    {
        panic!("preparing the lower: {e}");
    }
    symlink(top.join("sentinel"), lower.join("abs")).unwrap();
    let sparse = fs::File::create(lower.join("sparse")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    sparse.write_all_at(b"data in the middle", 600_000).unwrap();
}

/// The tar the lower is applied from (see the module's comment).
fn lower_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let mut t = Vec::new();
        pax(&mut t, &[("SCHILY.xattr.user.lower", "d")]);
        entry(&mut t, "d/", b'5', 0o750, b"", "");
        entry(&mut t, "d/f", b'0', 0o644, b"lower file", "");
        entry(&mut t, "d/sub/", b'5', 0o700, b"", "");
        entry(&mut t, "d/sub/deep", b'0', 0o600, b"deep", "");
        entry(&mut t, "e/", b'5', 0o711, b"", "");
        entry(&mut t, "h", b'1', 0o644, b"", "d/f");
        entry(&mut t, "l", b'2', 0o777, b"", "d");
        entry(&mut t, "up", b'2', 0o777, b"", "../sentinel");
        entry(&mut t, "p", b'6', 0o644, b"", "");
        entry(&mut t, "o/", b'5', 0o755, b"", "");
        entry(&mut t, "o/x", b'0', 0o644, b"under an opaque dir", "");
        entry(&mut t, "o/.wh..wh..opq", b'0', 0o644, b"", "");
        entry(&mut t, ".wh.gone", b'0', 0o644, b"", "");
        entry(&mut t, "null", b'3', 0o666, b"", "");
        t.extend_from_slice(&[0; 1024]);
        t
    })
}

/// Appends a ustar entry (a char device is 1:3).
fn entry(t: &mut Vec<u8>, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
    let mut h = [0u8; 512];
    let field = |h: &mut [u8; 512], at: usize, width: usize, value: u64| {
        let s = format!("{value:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(s.as_bytes());
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    field(&mut h, 100, 8, mode.into());
    let owner = if name.starts_with("d/") { 1000 } else { 0 };
    field(&mut h, 108, 8, owner);
    field(&mut h, 116, 8, owner);
    field(&mut h, 124, 12, data.len() as u64);
    field(&mut h, 136, 12, 1_600_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..265].copy_from_slice(b"ustar\x0000");
    if kind == b'3' {
        field(&mut h, 329, 8, 1);
        field(&mut h, 337, 8, 3);
    }
    t.extend_from_slice(&h);
    t.extend_from_slice(data);
    t.resize(t.len().next_multiple_of(512), 0);
    let at = t.len() - data.len().next_multiple_of(512) - 512;
    fix_checksums(&mut t[at..at + 512]);
}

/// Appends a PAX extended header for the next entry.
fn pax(t: &mut Vec<u8>, records: &[(&str, &str)]) {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = format!(" {k}={v}\n");
        let mut n = rest.len() + 1;
        while format!("{n}{rest}").len() != n {
            n += 1;
        }
        body.extend_from_slice(format!("{n}{rest}").as_bytes());
    }
    entry(t, "PaxHeader", b'x', 0o644, &body, "");
}
