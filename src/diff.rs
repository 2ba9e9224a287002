//! The applier: a layer blob (from the content store or as it downloads),
//! decompressed, hashed and applied into an active snapshot. For overlay the tar goes straight into
//! the upper directory (as overlay whiteouts), without mounting anything.

use crate::archive::{self, Applied, ApplyOptions, IndexBelow, WhiteoutMode};
use crate::descriptor::Descriptor;
use crate::images::{self, Compression, Kind};
use crate::snapshot::{Snapshots, Snapshotter};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error(transparent)]
    Image(#[from] images::Error),
    /// `dir` is the snapshot tree written into, so that a full disk or a
    /// failing device names the filesystem it is on.
    #[error("applying layer {layer} into {}: {source}", dir.display())]
    Archive {
        layer: String,
        dir: std::path::PathBuf,
        #[source]
        source: archive::ArchiveError,
    },
}

/// Applies `blob`, the bytes of `layer`, into the active snapshot `key`;
/// returns what the tar held.
pub fn apply(
    blob: impl std::io::Read,
    layer: &Descriptor,
    snapshots: &Snapshots,
    key: &str,
) -> Result<Applied, Error> {
    apply_below(blob, layer, snapshots, key, Parent::Known)
}

/// Whether the active snapshot's parent is the layer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// It is (or the layer has none).
    Known,
    /// It was prepared without one, which a rebase gives it at commit.
    AtRebase,
}

/// [`apply`], for a snapshot whose parent may come only at its rebase.
pub fn apply_below(
    blob: impl std::io::Read,
    layer: &Descriptor,
    snapshots: &Snapshots,
    key: &str,
    parent: Parent,
) -> Result<Applied, Error> {
    let compression = match images::kind(layer)? {
        Kind::Layer(c) => c,
        other => {
            return Err(Error::Image(images::Error::Invalid {
                what: "layer",
                digest: layer.digest.to_string(),
                message: format!("a {} is not a layer", other.name()),
            }));
        }
    };
    let (dir, lowers) = snapshots.apply_dirs(key)?;
    crate::failpoint!("snapshot-apply");
    let compression = match compression {
        Compression::None => archive::Compression::None,
        Compression::Gzip => archive::Compression::Gzip,
        Compression::Zstd => archive::Compression::Zstd,
    };
    let fail = |source| Error::Archive {
        layer: layer.digest.to_string(),
        dir: dir.clone(),
        source,
    };
    if snapshots.indexes_layers() {
        // The tar and its image go beside `fs`, the layer's mount point.
        let snapshot_dir = dir.parent().unwrap_or(&dir);
        let below = match (parent, lowers.is_empty()) {
            (Parent::AtRebase, _) => IndexBelow::Unknown,
            (Parent::Known, true) => IndexBelow::Nothing,
            (Parent::Known, false) => IndexBelow::Lowers(lowers),
        };
        let userxattr = snapshots.overlay_upper().unwrap_or(false);
        return archive::index_layer(snapshot_dir, blob, compression, &below, userxattr)
            .map_err(fail);
    }
    let whiteouts = match snapshots.overlay_upper() {
        Some(userxattr) => WhiteoutMode::Overlay { userxattr, lowers },
        None => WhiteoutMode::Plain,
    };
    archive::apply_layer(&dir, blob, compression, &ApplyOptions { whiteouts }).map_err(fail)
}
