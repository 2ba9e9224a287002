//! Reading an image back out of the content store: the platform manifest of
//! a stored index, its config and its chain IDs.

use super::{Error as ImageError, ImageConfig, Kind, Manifest, platform};
use crate::content::{Error as ContentError, Store};
use crate::descriptor::{Descriptor, Platform};
use crate::digest::Digest;
use std::io::Read;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// One platform's view of a stored image.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest_desc: Descriptor,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
}

impl StoredImage {
    pub fn chain_ids(&self) -> Vec<Digest> {
        super::chain_ids(&self.config.rootfs.diff_ids)
    }

    /// containerd's image size: manifest config plus layers.
    pub fn size(&self) -> u64 {
        self.manifest.config.size + self.manifest.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

pub fn read_all(store: &dyn Store, digest: &Digest) -> Result<Vec<u8>, ContentError> {
    let mut blob = store.reader_at(digest)?;
    let mut out = Vec::with_capacity(blob.size() as usize);
    blob.read_to_end(&mut out)
        .map_err(|source| ContentError::Io {
            context: format!("reading {digest}"),
            source,
        })?;
    Ok(out)
}

/// The manifest of `target` for `wanted` (this machine's when `None`).
pub fn platform_image(
    store: &dyn Store,
    target: &Descriptor,
    wanted: Option<&Platform>,
) -> Result<StoredImage, Error> {
    let manifest_desc = match super::kind(target)? {
        Kind::Manifest => target.clone(),
        Kind::Index => {
            let index = super::parse_index(target, &read_all(store, &target.digest)?)?;
            let wanted = wanted.cloned().unwrap_or_else(platform::host);
            index
                .manifests
                .iter()
                .filter(|m| !super::is_attestation(m))
                .filter(|m| store.info(&m.digest).is_ok())
                .filter_map(|m| Some((platform::rank(&wanted, m.platform.as_ref()?)?, m)))
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, m)| m.clone())
                .ok_or_else(|| ImageError::NoMatchingPlatform {
                    wanted: super::platform_string(&wanted),
                    digest: target.digest.to_string(),
                    available: "none stored".to_string(),
                })?
        }
        other => {
            return Err(Error::Image(ImageError::Invalid {
                what: "image",
                digest: target.digest.to_string(),
                message: format!("the image points at a {}", other.name()),
            }));
        }
    };
    let manifest = super::parse_manifest(&manifest_desc, &read_all(store, &manifest_desc.digest)?)?;
    let config_bytes = read_all(store, &manifest.config.digest)?;
    let config = super::parse_config(&manifest.config, &config_bytes)?;
    Ok(StoredImage {
        manifest_desc,
        manifest,
        config_bytes,
        config,
    })
}
