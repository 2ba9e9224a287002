//! Manifest, index and image config bodies: `sniff_media_type`,
//! `parse_manifest` and `parse_index` under each descriptor media type that
//! leads to them, `parse_config`, and the helpers a pull runs on what they
//! return (media-type kinds, GC labels, platform matching, chain IDs).
//! No panic, and no body reads as both a manifest and an index.
#![no_main]

use hoist::descriptor::Descriptor;
use hoist::digest::Digest;
use hoist::images::{self, Kind, platform};
use libfuzzer_sys::fuzz_target;

const WANTED: [&str; 4] = [
    "linux/amd64",
    "linux/arm64/v8",
    "linux/arm/v6",
    "windows/amd64",
];

fuzz_target!(|data: &[u8]| {
    let digest = Digest::of(data);
    let size = data.len() as u64;
    let sniffed = images::sniff_media_type(data);
    let desc = |media_type: &str| Descriptor::new(media_type, digest.clone(), size);

    let mut manifest_types = vec![images::OCI_MANIFEST, images::DOCKER_MANIFEST];
    let mut index_types = vec![images::OCI_INDEX, images::DOCKER_LIST];
    if let Some(mt) = sniffed.as_deref() {
        manifest_types.push(mt);
        index_types.push(mt);
    }

    let mut is_manifest = false;
    for mt in manifest_types {
        let Ok(manifest) = images::parse_manifest(&desc(mt), data) else {
            continue;
        };
        is_manifest = true;
        let mut children = vec![manifest.config.clone()];
        children.extend(manifest.layers.iter().cloned());
        for child in &children {
            let _ = images::kind(child);
        }
        let labels = images::gc_child_labels(Kind::Manifest, &children);
        assert!(labels.len() <= children.len());
    }

    let mut is_index = false;
    for mt in index_types {
        let Ok(index) = images::parse_index(&desc(mt), data) else {
            continue;
        };
        is_index = true;
        for wanted in WANTED {
            let wanted = platform::parse(wanted).expect("a valid platform");
            if let Some(chosen) = platform::best_match(&wanted, &index.manifests) {
                let labels =
                    images::gc_index_labels(&index.manifests, std::slice::from_ref(chosen));
                assert_eq!(labels.len(), 1);
            }
        }
        for m in &index.manifests {
            let _ = images::is_attestation(m);
            if let Some(p) = &m.platform {
                let _ = images::platform_string(p);
                let _ = platform::normalize(p.clone());
            }
        }
        let labels = images::gc_child_labels(Kind::Index, &index.manifests);
        assert!(labels.len() <= index.manifests.len());
    }
    assert!(
        !(is_manifest && is_index),
        "a body read as both a manifest and an index"
    );

    if let Ok(config) = images::parse_config(&desc(images::OCI_CONFIG), data) {
        let found = config.platform();
        let _ = images::platform_string(&found);
        let chains = images::chain_ids(&config.rootfs.diff_ids);
        assert_eq!(chains.len(), config.rootfs.diff_ids.len());
        let manifest = desc(images::OCI_MANIFEST);
        for wanted in WANTED {
            let wanted = platform::parse(wanted).expect("a valid platform");
            let _ = images::check_config_platform(&manifest, &manifest, &config, &wanted);
        }
    }
});
