//! Unpack: each layer becomes a committed snapshot named by its chain ID.
//!
//! Sequentially, layer i is prepared on its parent, applied with the lower
//! layers in view, and committed, as soon as layers 0..=i are stored. Where
//! the snapshotter's trees do not depend on their parents (overlay), layers
//! instead apply in parallel, each into a parentless snapshot, and are
//! committed in chain order with a rebase: directories a layer had to make
//! take the metadata the lowers have for them, which is all a sequential
//! apply would have done differently. A layer whose parallel apply fails
//! (a hardlink into a lower, say) is applied again sequentially.

use super::progress::{Progress, State};
use super::{Error, Result, blocking};
use crate::archive::Applied;
use crate::content::Labels;
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::images;
use crate::metadata::ContentStore;
use crate::snapshot::{Error as SnapshotError, Snapshots, Snapshotter};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

static EXTRACT_SEQ: AtomicU64 = AtomicU64::new(0);

/// What one unpack did.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub chain_id: Digest,
    pub layers_applied: usize,
    pub parallel: bool,
    pub duration: Duration,
}

/// Which descriptors (0: config, 1..: layers) are in the content store.
struct Arrivals {
    ready: mpsc::Receiver<usize>,
    arrived: HashSet<usize>,
}

impl Arrivals {
    async fn wait(&mut self, i: usize) -> Result<()> {
        while !self.arrived.contains(&i) {
            self.next().await?;
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<usize> {
        match self.ready.recv().await {
            Some(j) => {
                self.arrived.insert(j);
                Ok(j)
            }
            None => Err(Error::Internal(
                "fetch ended before the layer arrived".into(),
            )),
        }
    }
}

/// Everything about one layer an apply needs.
#[derive(Clone)]
struct Layer {
    desc: Descriptor,
    diff_id: Digest,
    chain_id: Digest,
    parent: Option<String>,
}

/// Unpacks the layers of one manifest. `ready` yields the index of each
/// descriptor (0: config, 1..: layers) once it is stored.
#[allow(clippy::too_many_arguments)]
pub async fn unpack(
    puller: &super::Puller,
    store: &ContentStore,
    snapshots: &Snapshots,
    config: &Descriptor,
    layers: &[Descriptor],
    ready: mpsc::Receiver<usize>,
    sequential: bool,
    progress: &Progress,
) -> Result<Unpacked> {
    let started = Instant::now();
    let mut arrivals = Arrivals {
        ready,
        arrived: HashSet::new(),
    };
    arrivals.wait(0).await?;
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
    let top = chain.last().cloned().ok_or_else(|| {
        Error::Image(images::Error::Invalid {
            what: "manifest",
            digest: config.digest.to_string(),
            message: "an image without layers cannot be unpacked".into(),
        })
    })?;
    let plan: Vec<Layer> = layers
        .iter()
        .enumerate()
        .map(|(i, desc)| Layer {
            desc: desc.clone(),
            diff_id: diff_ids[i].clone(),
            chain_id: chain[i].clone(),
            parent: i.checked_sub(1).map(|p| chain[p].to_string()),
        })
        .collect();

    // Unpacks of one chain ID run one at a time; taking the locks in chain
    // order keeps two unpacks of overlapping chains from deadlocking.
    let locks: Vec<_> = chain.iter().map(|c| puller.chain_lock(c)).collect();
    let mut _held = Vec::with_capacity(locks.len());
    for l in &locks {
        _held.push(l.lock().await);
    }
    // A committed chain ID means everything below it is committed too.
    let mut start = plan.len();
    while start > 0 && !committed(snapshots, &plan[start - 1].chain_id).await? {
        start -= 1;
    }
    if let Some(reused) = start.checked_sub(1) {
        let (s, name) = (snapshots.clone(), plan[reused].chain_id.to_string());
        blocking(move || s.hold(&name)).await??;
    }
    let todo = &plan[start..];
    // One progress line: the compressed bytes of the layers committed so far.
    let key = format!("unpack-{}", config.digest);
    let total: u64 = plan.iter().map(|l| l.desc.size).sum();
    let done_before: u64 = plan[..start].iter().map(|l| l.desc.size).sum();
    progress.set(&key, State::Unpacking, total);
    progress.advance(&key, done_before);
    let tick = |k: usize| {
        progress.advance(
            &key,
            done_before + todo[..=k].iter().map(|l| l.desc.size).sum::<u64>(),
        )
    };
    let parallel = !sequential && todo.len() > 1 && snapshots.root().rebases();
    let applied = if parallel {
        unpack_parallel(store, snapshots, todo, start, &mut arrivals, &tick).await?
    } else {
        let mut applied = 0;
        for (offset, layer) in todo.iter().enumerate() {
            arrivals.wait(start + offset + 1).await?;
            if apply_sequential(store, snapshots, layer).await? {
                applied += 1;
            }
            tick(offset);
        }
        applied
    };
    progress.set(&key, State::Done, total);
    drop(_held);

    // Layers below an already committed chain were never waited for; their
    // blobs must be in this namespace before they are labelled.
    for i in 1..=plan.len() {
        arrivals.wait(i).await?;
    }
    for layer in &plan {
        let (st, digest, diff) = (
            store.clone(),
            layer.desc.digest.clone(),
            layer.diff_id.clone(),
        );
        blocking(move || {
            super::merge_labels(
                &st,
                &digest,
                [(LABEL_UNCOMPRESSED.to_string(), diff.to_string())].into(),
            )
        })
        .await??;
    }
    let (st, digest) = (store.clone(), config.digest.clone());
    let label = (
        format!("containerd.io/gc.ref.snapshot.{}", snapshots.name()),
        top.to_string(),
    );
    blocking(move || super::merge_labels(&st, &digest, [label].into())).await??;
    Ok(Unpacked {
        chain_id: top,
        layers_applied: applied,
        parallel,
        duration: started.elapsed(),
    })
}

fn extract_key(chain_id: &Digest) -> String {
    format!(
        "extract-{}-{}-{} {chain_id}",
        crate::metadata::to_nanos(std::time::SystemTime::now()),
        std::process::id(),
        EXTRACT_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Prepares `key` on `parent` and applies the layer, checking its diff ID;
/// on any error the active snapshot is removed.
fn prepare_and_apply(
    s: &Snapshots,
    store: &ContentStore,
    layer: &Layer,
    key: &str,
    parent: Option<&str>,
) -> Result<Applied> {
    s.prepare(key, parent, Labels::new())?;
    let result = crate::diff::apply(store, &layer.desc, s, key)
        .map_err(Error::from)
        .and_then(|applied| {
            if applied.diff_id == layer.diff_id {
                Ok(applied)
            } else {
                Err(Error::Image(images::Error::Invalid {
                    what: "layer",
                    digest: layer.desc.digest.to_string(),
                    message: format!(
                        "uncompressed digest {} does not match the config's diff_id {}",
                        applied.diff_id, layer.diff_id
                    ),
                }))
            }
        });
    if result.is_err() {
        remove_quietly(s, key);
    }
    result
}

/// Commits (with `rebase`: onto the layer's parent, adopting lower metadata
/// for the directories the apply made); `false` when another unpack
/// committed the chain first and ours was dropped.
fn commit(s: &Snapshots, layer: &Layer, key: &str, rebase: Option<&Applied>) -> Result<bool> {
    let name = layer.chain_id.to_string();
    let result = match rebase {
        None => s.commit(&name, key, Labels::new()),
        Some(applied) => (|| {
            if !applied.implicit_dirs.is_empty() {
                let (fs, _) = s.apply_dirs(key)?;
                let lowers = s.tree_dirs(layer.parent.as_deref())?;
                let userxattr = s.overlay_upper().unwrap_or(false);
                crate::archive::adopt_lower_metadata(
                    &fs,
                    &applied.implicit_dirs,
                    lowers,
                    userxattr,
                )
                .map_err(|source| crate::diff::Error::Archive {
                    layer: layer.desc.digest.to_string(),
                    source,
                })?;
            }
            Ok::<_, Error>(s.commit_rebased(&name, key, layer.parent.as_deref(), Labels::new())?)
        })()
        .map_err(|e| match e {
            Error::Snapshot(inner) => inner,
            other => SnapshotError::FailedPrecondition(other.to_string()),
        }),
    };
    match result {
        Ok(()) => Ok(true),
        Err(SnapshotError::AlreadyExists(_)) => {
            remove_quietly(s, key);
            s.hold(&name)?;
            Ok(false)
        }
        Err(e) => {
            remove_quietly(s, key);
            Err(e.into())
        }
    }
}

fn remove_quietly(s: &Snapshots, key: &str) {
    if let Err(e) = s.remove(key) {
        tracing::warn!(key, error = %e, "could not remove an active snapshot");
    }
}

async fn apply_sequential(
    store: &ContentStore,
    snapshots: &Snapshots,
    layer: &Layer,
) -> Result<bool> {
    if committed(snapshots, &layer.chain_id).await? {
        return Ok(false);
    }
    let (s, st, l) = (snapshots.clone(), store.clone(), layer.clone());
    blocking(move || {
        let key = extract_key(&l.chain_id);
        prepare_and_apply(&s, &st, &l, &key, l.parent.as_deref())?;
        commit(&s, &l, &key, None)
    })
    .await?
}

/// A parallel apply's active snapshot key and what it applied.
type ParallelResult = Result<(String, Applied)>;

/// `todo` are the manifest's layers from index `offset` on: todo[k] is
/// descriptor `offset + k + 1` in the arrivals.
async fn unpack_parallel(
    store: &ContentStore,
    snapshots: &Snapshots,
    todo: &[Layer],
    offset: usize,
    arrivals: &mut Arrivals,
    tick: &(dyn Fn(usize) + Sync),
) -> Result<usize> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let limit = Arc::new(Semaphore::new(cores));
    let base = todo.len();
    let mut senders: Vec<Option<oneshot::Sender<ParallelResult>>> = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..base {
        let (tx, rx) = oneshot::channel();
        senders.push(Some(tx));
        receivers.push(rx);
    }
    let spawner = async {
        let mut pending: HashSet<usize> = (0..base).collect();
        // Layers that arrived before the config was read go first.
        let mut queue: Vec<usize> = arrivals
            .arrived
            .iter()
            .filter_map(|j| j.checked_sub(1 + offset))
            .filter(|k| *k < base)
            .collect();
        queue.sort();
        loop {
            for k in queue.drain(..) {
                if !pending.remove(&k) {
                    continue;
                }
                let Some(tx) = senders[k].take() else {
                    continue;
                };
                let (s, st, l, limit) = (
                    snapshots.clone(),
                    store.clone(),
                    todo[k].clone(),
                    limit.clone(),
                );
                let orphans = snapshots.clone();
                tokio::spawn(async move {
                    let result = match limit.acquire_owned().await {
                        Ok(_permit) => blocking(move || {
                            let key = extract_key(&l.chain_id);
                            prepare_and_apply(&s, &st, &l, &key, None).map(|a| (key, a))
                        })
                        .await
                        .and_then(|r| r),
                        Err(e) => Err(Error::Internal(format!("unpack limiter: {e}"))),
                    };
                    // Nobody will commit it once the unpack has failed.
                    if let Err(Ok((key, _))) = tx.send(result) {
                        let _ = blocking(move || remove_quietly(&orphans, &key)).await;
                    }
                });
            }
            if pending.is_empty() {
                return Ok::<_, Error>(());
            }
            let j = arrivals.next().await?;
            if let Some(k) = j.checked_sub(1 + offset).filter(|k| *k < base) {
                queue.push(k);
            }
        }
    };
    let committer = async {
        let mut applied = 0;
        for (k, rx) in receivers.into_iter().enumerate() {
            let layer = &todo[k];
            let outcome = rx
                .await
                .map_err(|_| Error::Internal("a parallel apply ended without a result".into()))?;
            let (s, l) = (snapshots.clone(), layer.clone());
            let committed = match outcome {
                Ok((key, a)) => blocking(move || commit(&s, &l, &key, Some(&a))).await??,
                Err(e) => {
                    // Applied on its own it could not be (a hardlink into a
                    // lower, say): apply it the sequential way, now that its
                    // parent is committed. A real fault fails again there.
                    tracing::info!(layer = %layer.desc.digest, error = %e, "parallel apply failed; applying sequentially");
                    apply_sequential(store, snapshots, layer).await?
                }
            };
            if committed {
                applied += 1;
            }
            tick(k);
        }
        Ok::<_, Error>(applied)
    };
    let ((), applied) = tokio::try_join!(spawner, committer)?;
    Ok(applied)
}

async fn committed(snapshots: &Snapshots, chain_id: &Digest) -> Result<bool> {
    let (s, name) = (snapshots.clone(), chain_id.to_string());
    match blocking(move || s.stat(&name)).await? {
        Ok(info) => Ok(info.kind == crate::snapshot::Kind::Committed),
        Err(SnapshotError::NotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
