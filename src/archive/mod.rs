//! Applying an image layer (a tar stream, optionally gzip or zstd
//! compressed) onto a snapshot directory, with the OCI image-spec and
//! containerd semantics: whiteouts, opaque directories, hardlinks, devices,
//! PAX/GNU extensions, sparse files and ownership/mode/xattr/time metadata.
//!
//! Every path is resolved inside the root through directory fds, never
//! following a symlink out of it (see `safe.rs`).

mod apply;
mod compression;
mod index;
mod index_tree;
mod reader;
mod safe;
mod whiteout;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::digest::Digest;

pub use index::{
    INDEX_MEMORY, IndexBelow, LAYER_IMAGE, LAYER_TAR, index_layer, index_layer_within,
    reindex_layer,
};

/// Size of the read buffers and of file copies.
const BUF_SIZE: usize = 128 * 1024;

/// How the layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Applied into a plain tree (native snapshotter): whiteouts delete lower entries.
    Plain,
    /// Applied straight into an overlay upperdir: whiteouts become overlay whiteouts
    /// (char device 0:0) and opaque dirs get the opaque xattr
    /// (`trusted.overlay.opaque=y`, or `user.overlay.opaque=y` when userxattr);
    /// `lowers` (newest first) are the parent layers' trees, read to copy up
    /// missing parent directories' metadata and hardlink targets.
    Overlay {
        userxattr: bool,
        lowers: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOptions {
    pub whiteouts: WhiteoutMode,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            whiteouts: WhiteoutMode::Plain,
        }
    }
}

/// What applying a layer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// sha256 of the whole uncompressed stream.
    pub diff_id: Digest,
    /// Length of the whole uncompressed stream.
    pub uncompressed_size: u64,
    /// Tar entries seen (PAX/GNU extension headers not counted; whiteouts
    /// and skipped entries counted).
    pub entries: u64,
    /// Directories the layer needed but did not list and no lower had,
    /// made 0755 root (relative to the root). Applied without its lowers,
    /// a layer hands these to [`adopt_lower_metadata`] once they exist.
    /// Empty for an indexed layer: [`reindex_layer`] redoes it whole.
    pub implicit_dirs: Vec<PathBuf>,
    /// Applied without its lowers, the result depends on them: the rebase
    /// must fix it up ([`adopt_lower_metadata`], [`reindex_layer`]).
    pub needs_lowers: bool,
}

/// The rebase half of a parallel unpack: `root` was applied with no
/// lowers; now that `lowers` (newest first) are committed, the directories
/// it made implicitly take their metadata from them, as a sequential apply
/// would have given it.
pub fn adopt_lower_metadata(
    root: &Path,
    dirs: &[PathBuf],
    lowers: Vec<PathBuf>,
    userxattr: bool,
) -> Result<(), ArchiveError> {
    use std::os::unix::ffi::OsStrExt;
    let mut applier = apply::Applier::new(root, &WhiteoutMode::Overlay { userxattr, lowers })?;
    let dirs: Vec<Vec<u8>> = dirs
        .iter()
        .map(|d| d.as_os_str().as_bytes().to_vec())
        .collect();
    applier.adopt_lower_metadata(&dirs)
}

/// Removes the tree at `path` (nothing if it is missing) without following
/// symlinks, recursing, or holding more than one directory fd open: a
/// snapshot may hold a tree deeper than a thread's stack or the fd limit.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no directory entry to remove", path.display()),
        ));
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = safe::open_root(parent)?;
    safe::remove_all_at(std::os::fd::AsFd::as_fd(&dir), name.as_bytes()).map(drop)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error("reading {compression} layer stream: {source}")]
    Stream {
        compression: Compression,
        #[source]
        source: io::Error,
    },
    #[error("malformed tar entry {path:?}: {reason}")]
    Malformed { path: String, reason: String },
    #[error("truncated layer at tar entry {path:?}: {reason}")]
    Truncated { path: String, reason: String },
    /// A well-formed entry beyond what hoist applies (path length, xattr
    /// count or size): refused without reading the rest of the layer.
    #[error("tar entry {path:?} refused: {reason}")]
    Refused { path: String, reason: String },
    #[error("tar entry {path:?} escapes the root: {reason}")]
    Breakout { path: String, reason: String },
    #[error("tar entry {path:?} has unsupported type {typeflag:?}")]
    UnsupportedType { path: String, typeflag: char },
    #[error("invalid whiteout {path:?}: {reason}")]
    InvalidWhiteout { path: String, reason: String },
    #[error("hardlink {path:?} to {target:?}: {reason}")]
    Hardlink {
        path: String,
        target: String,
        reason: String,
    },
    #[error("tar entry {path:?}: {component} is not a directory")]
    NotADirectory { path: String, component: String },
    #[error("{op} for tar entry {path:?}: {source}")]
    Io {
        op: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("opening {what} {path:?}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The layer's index (EROFS) failed: its spill file could not be
    /// written or read.
    #[error(transparent)]
    Index(Box<crate::erofs::tree::Error>),
}

impl From<crate::erofs::tree::Error> for ArchiveError {
    fn from(e: crate::erofs::tree::Error) -> Self {
        ArchiveError::Index(Box::new(e))
    }
}

fn drain(mut rest: impl Read, compression: Compression) -> Result<(), ArchiveError> {
    io::copy(&mut rest, &mut io::sink())
        .map(|_| ())
        .map_err(|e| {
            compression::stream_error(e, compression).unwrap_or_else(|e| ArchiveError::Io {
                op: "draining the layer after the end of the archive".into(),
                path: String::new(),
                source: e,
            })
        })
}

/// Reads the tar in `buffered` to its end, handing each entry to `each`
/// (then calling `finish`), and drains what follows the archive so the
/// digest covers it.
fn read_layer<B: BufRead, S>(
    buffered: B,
    seek: Option<reader::Seek<B>>,
    compression: Compression,
    state: &mut S,
    mut each: impl FnMut(&mut S, &reader::Entry, &mut reader::TarReader<B>) -> Result<(), ArchiveError>,
    finish: impl FnOnce(&mut S) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let mut tar = reader::TarReader::new(buffered, compression);
    if let Some(seek) = seek {
        tar = tar.with_seek(seek);
    }
    let applied = (|| {
        while let Some(entry) = tar.next_entry()? {
            each(state, &entry, &mut tar)?;
        }
        finish(state)
    })();
    let structural = matches!(
        applied,
        Err(ArchiveError::Malformed { .. }
            | ArchiveError::Truncated { .. }
            | ArchiveError::UnsupportedType { .. })
    );
    // The digest covers whatever follows the end-of-archive blocks too.
    let drained = if applied.is_ok() || (structural && compression != Compression::None) {
        drain(tar.into_inner(), compression)
    } else {
        Ok(())
    };
    if let Err(e) = applied {
        // Garbage out of a damaged compressed stream looks like a broken
        // tar; the decompressor's own verdict (e.g. a CRC mismatch at
        // the end) names the real cause.
        return Err(match drained {
            Err(stream @ ArchiveError::Stream { .. }) => {
                tracing::debug!(error = %e, "tar error caused by a damaged layer stream");
                stream
            }
            _ => e,
        });
    }
    drained
}

/// Decompresses `layer`, hashes the whole uncompressed stream (including the tar's trailing padding: drain the reader to EOF after the archive ends), and applies the tar into `root`.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    compression: Compression,
    opts: &ApplyOptions,
) -> Result<Applied, ArchiveError> {
    let decoded = compression::decoder(layer, compression)?;
    let mut hashed = compression::HashingReader::new(decoded);
    let mut applier = apply::Applier::new(root, &opts.whiteouts)?;
    read_layer(
        BufReader::with_capacity(BUF_SIZE, &mut hashed),
        None,
        compression,
        &mut applier,
        |a, entry, tar| a.apply(entry, tar),
        |a| a.finish(),
    )?;
    let (diff_id, uncompressed_size) = hashed.finish();
    let implicit_dirs: Vec<PathBuf> = {
        use std::os::unix::ffi::OsStrExt;
        applier
            .implicit
            .iter()
            .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
            .collect()
    };
    Ok(Applied {
        diff_id,
        uncompressed_size,
        entries: applier.entries(),
        needs_lowers: !implicit_dirs.is_empty(),
        implicit_dirs,
    })
}
