//! The tar applier on any uncompressed layer, applied as the native
//! snapshotter applies it (plain whiteouts, onto a tree that already holds
//! files and symlinks pointing out of it) and as the overlay snapshotter
//! does (into an empty upperdir, with a lower to copy up from). Each run
//! gets a fresh temporary directory:
//!
//! ```text
//! tmp/root/    the plain apply's root, with the tree below and two
//!              symlinks out of it: out -> ../lower, abs -> /<tmp>/lower
//! tmp/upper/   the overlay apply's upperdir
//! tmp/lower/   its lower: d/f, d/sub/, l -> d, up -> ../sentinel
//! tmp/sentinel
//! ```
//!
//! No panic, no escape: afterwards `tmp` holds exactly these four names,
//! the lower and the sentinel are unchanged, and the whole directory can
//! be removed. Memory stays bounded by the run's `-rss_limit_mb`.
//!
//! Header checksums are fixed up before the apply (see [`fix_checksums`]):
//! otherwise nearly every mutation of a header stops at the checksum check
//! and the fuzzer never gets past it.
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use hoist::archive::{ApplyOptions, Compression, WhiteoutMode, apply_layer, remove_tree};
use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"sentinel";

fuzz_target!(|input: &[u8]| {
    let mut data = input.to_vec();
    fix_checksums(&mut data);
    let data = data.as_slice();
    let tmp = tempfile::Builder::new()
        .prefix("hoist-fuzz-tar-")
        .tempdir()
        .expect("a temporary directory");
    let dir = tmp.path();
    let root = dir.join("root");
    let upper = dir.join("upper");
    let lower = dir.join("lower");
    fs::write(dir.join("sentinel"), SENTINEL).unwrap();
    for tree in [&root, &lower] {
        fs::create_dir_all(tree.join("d/sub")).unwrap();
        fs::write(tree.join("d/f"), b"lower file").unwrap();
        symlink("d", tree.join("l")).unwrap();
        symlink("../sentinel", tree.join("up")).unwrap();
    }
    symlink("../lower", root.join("out")).unwrap();
    symlink(&lower, root.join("abs")).unwrap();
    fs::create_dir(&upper).unwrap();
    let lower_before = listing(&lower);

    let plain = ApplyOptions::default();
    let _ = apply_layer(&root, data, Compression::None, &plain);
    let overlay = ApplyOptions {
        whiteouts: WhiteoutMode::Overlay {
            userxattr: false,
            lowers: vec![lower.clone()],
        },
    };
    let _ = apply_layer(&upper, data, Compression::None, &overlay);

    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["lower", "root", "sentinel", "upper"],
        "escaped into {dir:?}"
    );
    let sentinel = fs::symlink_metadata(dir.join("sentinel")).unwrap();
    assert!(
        sentinel.is_file() && sentinel.nlink() == 1,
        "sentinel linked or replaced"
    );
    assert_eq!(fs::read(dir.join("sentinel")).unwrap(), SENTINEL);
    assert_eq!(listing(&lower), lower_before, "the lower changed");

    remove(dir);
    assert!(!dir.exists(), "{dir:?} was not removed");
});

/// Every entry below `top`: its path, type, mode, link count and content
/// (a symlink's target).
fn listing(top: &Path) -> Vec<(PathBuf, u32, u64, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let mut todo = vec![top.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_symlink() {
                fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else if meta.is_file() {
                fs::read(&path).unwrap()
            } else {
                todo.push(path.clone());
                Vec::new()
            };
            out.push((path, meta.mode(), meta.nlink(), content));
        }
    }
    out.sort();
    out
}

/// Removes the directory; when not root, after making every directory in it
/// writable and searchable again (a layer may make one 0000).
fn remove(dir: &Path) {
    if remove_tree(dir).is_ok() {
        return;
    }
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
    }
    remove_tree(dir).expect("the applied trees can be removed");
}

/// Walks the blocks as the reader will, header to header, and rewrites each
/// header's checksum: header-only types skip no data, an old GNU sparse
/// header its extension blocks, anything else its size field's worth (a PAX
/// `size` record is not looked at, so a header after such an entry keeps its
/// checksum, right or wrong). Zero blocks stay zero.
fn fix_checksums(data: &mut [u8]) {
    const BLOCK: usize = 512;
    let mut at = 0;
    while let Some(block) = data.get_mut(at..at + BLOCK) {
        at += BLOCK;
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut extended = block[156] == b'S' && block[482] != 0;
        let size = match block[156] {
            b'1'..=b'6' => 0,
            _ => size_field(&block[124..136]),
        };
        while extended {
            let Some(ext) = data.get(at..at + BLOCK) else {
                return;
            };
            extended = ext[504] != 0;
            at += BLOCK;
        }
        let Some(next) = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_next_multiple_of(BLOCK))
            .and_then(|s| at.checked_add(s))
        else {
            return;
        };
        at = next;
    }
}

/// Octal, or base-256 when the high bit of the first byte is set; 0 when
/// unreadable.
fn size_field(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        return field[1..].iter().fold(0u64, |n, &b| {
            n.saturating_mul(256).saturating_add(u64::from(b))
        });
    }
    let digits = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b));
    digits.fold(0u64, |n, b| {
        n.saturating_mul(8).saturating_add(u64::from(b - b'0'))
    })
}
