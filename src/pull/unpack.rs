//! Unpack: each layer becomes a committed snapshot named by its chain ID.
//! Layer i is applied as soon as layers 0..=i are in the content store.

use super::progress::Progress;
use super::{Error, Result, blocking};
use crate::content::Labels;
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::images;
use crate::metadata::ContentStore;
use crate::snapshot::{Error as SnapshotError, Snapshots, Snapshotter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

static EXTRACT_SEQ: AtomicU64 = AtomicU64::new(0);

/// What one unpack did.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub chain_id: Digest,
    pub layers_applied: usize,
    pub duration: Duration,
}

/// Unpacks the layers of one manifest. `ready` yields the index of each
/// descriptor (0: config, 1..: layers) once it is stored.
pub async fn unpack(
    puller: &super::Puller,
    store: &ContentStore,
    snapshots: &Snapshots,
    config: &Descriptor,
    layers: &[Descriptor],
    mut ready: mpsc::Receiver<usize>,
    _progress: &Progress,
) -> Result<Unpacked> {
    let started = Instant::now();
    // Indices can arrive out of order; remember which came.
    let mut arrived = std::collections::HashSet::new();
    let mut await_index = async |i: usize, ready: &mut mpsc::Receiver<usize>| -> Result<()> {
        while !arrived.contains(&i) {
            match ready.recv().await {
                Some(j) => {
                    arrived.insert(j);
                }
                None => {
                    return Err(Error::Internal(
                        "fetch ended before the layer arrived".into(),
                    ));
                }
            }
        }
        Ok(())
    };
    await_index(0, &mut ready).await?;
    let body = super::read_blob(store, &config.digest).await?;
    let image_config = images::parse_config(config, &body)?;
    let diff_ids = image_config.rootfs.diff_ids;
    if diff_ids.len() != layers.len() {
        return Err(Error::Image(images::Error::Invalid {
            what: "config",
            digest: config.digest.to_string(),
            message: format!("{} diff_ids for {} layers", diff_ids.len(), layers.len()),
        }));
    }
    let chain = images::chain_ids(&diff_ids);
    let mut applied = 0;
    for (i, layer) in layers.iter().enumerate() {
        let chain_id = chain[i].clone();
        let parent = i.checked_sub(1).map(|p| chain[p].to_string());
        let lock = puller.chain_lock(&chain_id);
        let _once = lock.lock().await;
        if committed(snapshots, &chain_id).await? {
            continue;
        }
        await_index(i + 1, &mut ready).await?;
        let key = format!(
            "extract-{}-{}-{} {chain_id}",
            crate::metadata::to_nanos(std::time::SystemTime::now()),
            std::process::id(),
            EXTRACT_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let (s, st, l, k) = (snapshots.clone(), store.clone(), layer.clone(), key.clone());
        let want = diff_ids[i].clone();
        let chain_name = chain_id.to_string();
        let outcome = blocking(move || -> Result<bool> {
            s.prepare(&k, parent.as_deref(), Labels::new())?;
            let result = (|| -> Result<bool> {
                let got = crate::diff::apply(&st, &l, &s, &k)?;
                if got.diff_id != want {
                    return Err(Error::Image(images::Error::Invalid {
                        what: "layer",
                        digest: l.digest.to_string(),
                        message: format!(
                            "uncompressed digest {} does not match the config's diff_id {want}",
                            got.diff_id
                        ),
                    }));
                }
                match s.commit(&chain_name, &k, Labels::new()) {
                    Ok(()) => Ok(true),
                    // Another unpack committed this chain first: ours is a duplicate.
                    Err(SnapshotError::AlreadyExists(_)) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            })();
            if !matches!(result, Ok(true))
                && let Err(e) = s.remove(&k)
            {
                tracing::warn!(key = %k, error = %e, "could not remove an active snapshot");
            }
            result
        })
        .await??;
        if outcome {
            applied += 1;
        }
        let (st, digest, diff) = (store.clone(), layer.digest.clone(), diff_ids[i].clone());
        blocking(move || {
            super::merge_labels(
                &st,
                &digest,
                [(LABEL_UNCOMPRESSED.to_string(), diff.to_string())].into(),
            )
        })
        .await??;
    }
    let top = chain.last().cloned().ok_or_else(|| {
        Error::Image(images::Error::Invalid {
            what: "manifest",
            digest: config.digest.to_string(),
            message: "an image without layers cannot be unpacked".into(),
        })
    })?;
    let (st, digest) = (store.clone(), config.digest.clone());
    let label = (
        format!("containerd.io/gc.ref.snapshot.{}", snapshots.name()),
        top.to_string(),
    );
    blocking(move || super::merge_labels(&st, &digest, [label].into())).await??;
    Ok(Unpacked {
        chain_id: top,
        layers_applied: applied,
        duration: started.elapsed(),
    })
}

async fn committed(snapshots: &Snapshots, chain_id: &Digest) -> Result<bool> {
    let (s, name) = (snapshots.clone(), chain_id.to_string());
    match blocking(move || s.stat(&name)).await? {
        Ok(info) => Ok(info.kind == crate::snapshot::Kind::Committed),
        Err(SnapshotError::NotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
