//! What the tar fuzz targets share: checksums fixed up so mutated headers
//! get past the reader's check, and a listing of a tree to compare.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Every entry below `top`: its path, mode, owner, link count, device and
/// content (a symlink's target).
pub type Listing = Vec<(PathBuf, u32, u32, u64, u64, Vec<u8>)>;

pub fn listing(top: &Path) -> Listing {
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
                if meta.is_dir() {
                    todo.push(path.clone());
                }
                Vec::new()
            };
            out.push((
                path,
                meta.mode(),
                meta.uid(),
                meta.nlink(),
                meta.rdev(),
                content,
            ));
        }
    }
    out.sort();
    out
}

/// Walks the blocks as the reader will, header to header, and rewrites each
/// header's checksum: header-only types skip no data, an old GNU sparse
/// header its extension blocks, anything else its size field's worth (a PAX
/// `size` record is not looked at, so a header after such an entry keeps its
/// checksum, right or wrong). Zero blocks stay zero.
pub fn fix_checksums(data: &mut [u8]) {
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
