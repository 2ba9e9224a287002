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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::local::LocalStore;
    use crate::images::{OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};

    fn put(store: &LocalStore, media_type: &str, body: &[u8]) -> Descriptor {
        let desc = Descriptor::new(media_type, Digest::of(body), body.len() as u64);
        crate::content::write_blob(store, "test", body, &desc, Default::default()).unwrap();
        desc
    }

    /// A manifest already in the store is checked again when it is read
    /// back: one that also lists manifests is refused, naming it.
    #[test]
    fn a_stored_ambiguous_manifest_is_refused_on_reading() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("content")).unwrap();
        let config = put(
            &store,
            OCI_CONFIG,
            br#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        let plain = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [],
        });
        let plain = put(&store, OCI_MANIFEST, plain.to_string().as_bytes());
        let image = platform_image(&store, &plain, None).unwrap();
        assert_eq!(image.manifest.config.digest, config.digest);

        let ambiguous = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [],
            "manifests": [plain],
        });
        let ambiguous = put(&store, OCI_MANIFEST, ambiguous.to_string().as_bytes());
        let err = platform_image(&store, &ambiguous, None).unwrap_err();
        assert!(
            matches!(err, Error::Image(ImageError::MediaTypeMismatch { .. })),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&ambiguous.digest.to_string()),
            "{err}"
        );

        // An index that also carries layers, read back as the image's target.
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [plain], "layers": [],
        });
        let index = put(&store, OCI_INDEX, index.to_string().as_bytes());
        let err = platform_image(&store, &index, None).unwrap_err();
        assert!(err.to_string().contains(&index.digest.to_string()), "{err}");
        assert!(err.to_string().contains("`layers`"), "{err}");
    }
}
