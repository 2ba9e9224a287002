//! EROFS images of layers in tar index mode: a layer is its uncompressed
//! tar plus a small metadata image (superblock, inodes, directories,
//! xattrs) whose regular files are chunk-indexed into the tar, the image's
//! second device. The kernel mounts the pair read-only, file-backed.
//!
//! [`tree`] is the layer's tree in memory (built from the tar headers by
//! `archive::index_layer`), [`writer`] lays it out in the on-disk
//! [`format`], [`mount`] mounts it.

pub mod format;
pub mod mount;
pub mod tree;
mod tree_spill;
pub mod writer;

/// Whether the kernel says it has what hoist's images need (file-backed
/// mounts aside): where it does, a test that finds the backend unusable
/// fails instead of skipping.
pub fn kernel_lists_features() -> bool {
    std::fs::read_dir("/sys/fs/erofs/features")
        .map(|entries| {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ["device_table", "chunked_file"]
                .iter()
                .all(|f| names.iter().any(|n| n == f))
        })
        .unwrap_or(false)
}
