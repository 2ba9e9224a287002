//! Disk usage of a tree, counted like `du`: allocated blocks, each inode once.

use super::{Result, Usage, io_err};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(format!("stat {}", path.display()))(e)),
        };
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += meta.blocks() * 512;
        }
        if meta.is_dir() {
            for entry in
                std::fs::read_dir(&path).map_err(io_err(format!("listing {}", path.display())))?
            {
                stack.push(
                    entry
                        .map_err(io_err(format!("listing {}", path.display())))?
                        .path(),
                );
            }
        }
    }
    Ok(usage)
}
