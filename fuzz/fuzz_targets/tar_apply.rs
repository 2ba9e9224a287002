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
use std::path::Path;

use hoist::archive::{ApplyOptions, Compression, WhiteoutMode, apply_layer, remove_tree};
use libfuzzer_sys::fuzz_target;

#[path = "../common/tar.rs"]
mod tar;
use tar::{fix_checksums, listing};

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
