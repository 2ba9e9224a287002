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
//!
//! In parallel, a layer this pull downloads applies as its bytes arrive
//! (a live feed from the fetch), so it streams once and is never read back
//! from the store; a layer already stored applies from the store.

use super::feed::{FeedReader, FeedReceiver};
use super::progress::{Progress, State};
use super::{Error, Result, blocking};
use crate::archive::Applied;
use crate::content::{Labels, Store};
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::images;
use crate::metadata::ContentStore;
use crate::snapshot::{Error as SnapshotError, Snapshots, Snapshotter};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OwnedMutexGuard, Semaphore, oneshot, watch};

pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

static EXTRACT_SEQ: AtomicU64 = AtomicU64::new(0);

/// What one unpack did.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub chain_id: Digest,
    pub layers_applied: usize,
    pub parallel: bool,
    /// Layers applied from their download as it happened, never read back
    /// from the store.
    pub streamed: usize,
    pub duration: Duration,
}

/// Which layers are in the content store (the config is, before any
/// unpack starts); the fetch side marks them in the sender [`arrivals`]
/// returns.
#[derive(Clone)]
pub struct Arrivals(watch::Receiver<Vec<bool>>);

/// A board of `n` layers, none stored yet.
pub fn arrivals(n: usize) -> (watch::Sender<Vec<bool>>, Arrivals) {
    let (tx, rx) = watch::channel(vec![false; n]);
    (tx, Arrivals(rx))
}

impl Arrivals {
    async fn wait(&self, i: usize) -> Result<()> {
        let mut rx = self.0.clone();
        rx.wait_for(|stored| stored.get(i).copied().unwrap_or(false))
            .await
            .map(drop)
            .map_err(|_| Error::Internal("fetch ended before the layer arrived".into()))
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

/// What an unpack will do, settled once the config is stored and before
/// the layers download, so that the layers to apply can be fed live.
///
/// Each chain ID has a lock, so that two unpacks never apply the same
/// layer at once. A parallel unpack takes the locks it can get at once and
/// applies those layers; a layer whose lock another unpack holds is left to
/// that one, and waited for at commit. Every lock is given up as soon as its
/// layer is committed, so an unpack waits for a lock only while holding
/// none below it, and two unpacks sharing a base cannot wait on each other.
pub struct Plan {
    layers: Vec<Layer>,
    /// Layers below this were committed already.
    start: usize,
    top: Digest,
    parallel: bool,
    locks: Vec<Arc<Mutex<()>>>,
    /// The locks this unpack took while planning, by layer: only in
    /// parallel, only at or above `start`, and those are the layers it
    /// applies.
    held: Vec<Option<OwnedMutexGuard<()>>>,
}

impl Plan {
    /// Whether this unpack applies layer `i` in parallel, as it downloads
    /// (in order, none is).
    pub fn applies_live(&self, i: usize) -> bool {
        self.held[i].is_some()
    }

    /// Layer `i`'s lock: the one taken while planning, or a wait for it.
    async fn lock(&mut self, i: usize) -> OwnedMutexGuard<()> {
        match self.held[i].take() {
            Some(held) => held,
            None => self.locks[i].clone().lock_owned().await,
        }
    }
}

/// Reads the (stored) config, computes the chain, takes the locks it can
/// and finds what is committed already.
pub async fn plan(
    puller: &super::Puller,
    store: &ContentStore,
    snapshots: &Snapshots,
    config: &Descriptor,
    layers: &[Descriptor],
    sequential: bool,
) -> Result<Plan> {
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
    let layers: Vec<Layer> = layers
        .iter()
        .enumerate()
        .map(|(i, desc)| Layer {
            desc: desc.clone(),
            diff_id: diff_ids[i].clone(),
            chain_id: chain[i].clone(),
            parent: i.checked_sub(1).map(|p| chain[p].to_string()),
        })
        .collect();
    // A committed chain ID means everything below it is committed too; the
    // topmost one is held (and its parents with it) as it is found.
    let mut start = layers.len();
    while start > 0 && !hold_committed(snapshots, &layers[start - 1].chain_id).await? {
        start -= 1;
    }
    let parallel = !sequential && snapshots.root().rebases();
    let locks: Vec<_> = chain
        .iter()
        .map(|c| puller.chain_lock(snapshots.namespace_name(), c))
        .collect();
    // Only the layers to apply: a lock held below `start` would never be
    // given up before the unpack ends, and could close a cycle of waits.
    let held = locks
        .iter()
        .enumerate()
        .map(|(i, l)| match parallel && i >= start {
            true => l.clone().try_lock_owned().ok(),
            false => None,
        })
        .collect();
    Ok(Plan {
        layers,
        start,
        top,
        parallel,
        locks,
        held,
    })
}

/// Unpacks the layers of one manifest as `plan` says. `arrivals` tells when
/// each descriptor is stored; `feeds[i]` is layer i's live feed, where
/// [`Plan::streams`] wanted one.
pub async fn unpack(
    mut plan: Plan,
    store: &ContentStore,
    snapshots: &Snapshots,
    config: &Descriptor,
    arrivals: Arrivals,
    feeds: Vec<Option<FeedReceiver>>,
    progress: &Progress,
) -> Result<Unpacked> {
    let started = Instant::now();
    let (all, start) = (plan.layers.clone(), plan.start);
    let todo = &all[start..];
    // One progress line: the compressed bytes of the layers committed so far.
    let key = format!("unpack-{}", config.digest);
    let size = |layers: &[Layer]| {
        layers
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.desc.size))
    };
    let (total, done_before) = (size(&all), size(&all[..start]));
    progress.set(&key, State::Unpacking, total);
    progress.advance(&key, done_before);
    let tick = |k: usize| progress.advance(&key, done_before.saturating_add(size(&todo[..=k])));
    let (applied, streamed) = if plan.parallel {
        unpack_parallel(&mut plan, store, snapshots, &arrivals, feeds, &tick).await?
    } else {
        let mut applied = 0;
        for (k, layer) in todo.iter().enumerate() {
            let _lock = plan.lock(start + k).await;
            arrivals.wait(start + k).await?;
            if apply_sequential(store, snapshots, layer).await? {
                applied += 1;
            }
            tick(k);
        }
        (applied, 0)
    };
    progress.set(&key, State::Done, total);

    // Layers below an already committed chain were never waited for; their
    // blobs must be in this namespace before they are labelled.
    for i in 0..all.len() {
        arrivals.wait(i).await?;
    }
    for layer in &all {
        crate::failpoint!("label-uncompressed");
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
    crate::failpoint!("label-gc-snapshot");
    let (st, digest) = (store.clone(), config.digest.clone());
    let label = (
        format!("containerd.io/gc.ref.snapshot.{}", snapshots.name()),
        plan.top.to_string(),
    );
    blocking(move || super::merge_labels(&st, &digest, [label].into())).await??;
    Ok(Unpacked {
        chain_id: plan.top.clone(),
        layers_applied: applied,
        parallel: plan.parallel,
        streamed,
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

/// Where a layer's bytes come from.
enum Source {
    /// The stored blob.
    Store,
    /// The download, as it happens.
    Live(FeedReader),
}

/// Prepares `key` on `parent` and applies the layer, checking its diff ID;
/// on any error the active snapshot is removed.
fn prepare_and_apply(
    s: &Snapshots,
    store: &ContentStore,
    layer: &Layer,
    key: &str,
    parent: Option<&str>,
    source: Source,
) -> Result<Applied> {
    s.prepare(key, parent, Labels::new())?;
    let started = Instant::now();
    let below = match (parent, &layer.parent) {
        (None, Some(_)) => crate::diff::Parent::AtRebase,
        _ => crate::diff::Parent::Known,
    };
    let applied = match source {
        Source::Store => store
            .reader_at(&layer.desc.digest)
            .map_err(crate::diff::Error::from)
            .and_then(|blob| {
                let blob = std::io::BufReader::with_capacity(256 * 1024, blob);
                crate::diff::apply_below(blob, &layer.desc, s, key, below)
            }),
        Source::Live(feed) => crate::diff::apply_below(feed, &layer.desc, s, key, below),
    };
    let result = applied.map_err(Error::from).and_then(|applied| {
        if applied.diff_id == layer.diff_id {
            crate::metrics::layer_applied(applied.uncompressed_size, started.elapsed());
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
    let adopted = match rebase {
        Some(applied) if applied.needs_lowers => (|| {
            let (fs, _) = s.apply_dirs(key)?;
            let lowers = s.tree_dirs(layer.parent.as_deref())?;
            let userxattr = s.overlay_upper().unwrap_or(false);
            let fixed = match (s.indexes_layers(), fs.parent()) {
                (true, Some(dir)) => crate::archive::reindex_layer(dir, lowers, userxattr),
                _ => crate::archive::adopt_lower_metadata(
                    &fs,
                    &applied.implicit_dirs,
                    lowers,
                    userxattr,
                ),
            };
            fixed.map_err(|source| crate::diff::Error::Archive {
                layer: layer.desc.digest.to_string(),
                dir: fs.clone(),
                source,
            })?;
            Ok::<_, Error>(())
        })(),
        _ => Ok(()),
    };
    let attempt = || match rebase {
        None => s.commit(&name, key, Labels::new()),
        Some(_) => s.commit_rebased(&name, key, layer.parent.as_deref(), Labels::new()),
    };
    let result = adopted.and_then(|()| match attempt() {
        // Another unpack's commit serves, held before ours goes; if GC took
        // it since ours failed, ours stands in after all.
        Err(SnapshotError::AlreadyExists(_)) => match s.hold_committed(&name)? {
            true => Ok(false),
            false => Ok(attempt().map(|()| true)?),
        },
        other => Ok(other.map(|()| true)?),
    });
    if !matches!(result, Ok(true)) {
        remove_quietly(s, key);
    }
    result
}

fn remove_quietly(s: &Snapshots, key: &str) {
    // The failed apply's files go first: on a full disk they are the room
    // the database needs to record the removal.
    if let Ok((fs, _)) = s.apply_dirs(key) {
        // An indexed layer's `fs` is empty, or its image mounted read-only.
        if !s.indexes_layers()
            && let Ok(entries) = std::fs::read_dir(&fs)
        {
            for entry in entries.flatten() {
                let _ = crate::archive::remove_tree(&entry.path());
            }
        }
        if let Some(dir) = fs.parent() {
            for name in [crate::archive::LAYER_TAR, crate::archive::LAYER_IMAGE] {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
    }
    if let Err(e) = s.remove(key) {
        tracing::warn!(key, error = %e, "could not remove an active snapshot");
    }
}

async fn apply_sequential(
    store: &ContentStore,
    snapshots: &Snapshots,
    layer: &Layer,
) -> Result<bool> {
    if hold_committed(snapshots, &layer.chain_id).await? {
        // Another unpack's: this pull's lease keeps it from here on.
        return Ok(false);
    }
    let (s, st, l) = (snapshots.clone(), store.clone(), layer.clone());
    blocking(move || {
        let key = extract_key(&l.chain_id);
        prepare_and_apply(&s, &st, &l, &key, l.parent.as_deref(), Source::Store)?;
        commit(&s, &l, &key, None)
    })
    .await?
}

/// An active snapshot a parallel apply made, removed when dropped unless
/// it was handed on to be committed: a result nobody receives (the unpack
/// failed or was cancelled) leaves nothing behind.
struct Extracted {
    snapshots: Snapshots,
    key: Option<String>,
}

impl Extracted {
    fn into_key(mut self) -> String {
        self.key.take().unwrap_or_default()
    }
}

impl Drop for Extracted {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let s = self.snapshots.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || remove_quietly(&s, &key))),
            Err(_) => remove_quietly(&s, &key),
        }
    }
}

/// A parallel apply's snapshot, what it applied, and whether it applied
/// from the download.
type ParallelResult = Result<(Extracted, Applied, bool)>;

/// Applies each layer this unpack took the lock of into a parentless
/// snapshot, live as it downloads where it has a feed, else from the store
/// once stored; then commits every layer in chain order, waiting for the
/// ones other unpacks hold (and applying them in order if those failed).
async fn unpack_parallel(
    plan: &mut Plan,
    store: &ContentStore,
    snapshots: &Snapshots,
    arrivals: &Arrivals,
    mut feeds: Vec<Option<FeedReceiver>>,
    tick: &(dyn Fn(usize) + Sync),
) -> Result<(usize, usize)> {
    let start = plan.start;
    let todo = plan.layers[start..].to_vec();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    // Applies from the store share the cores; live ones are already bounded
    // by the download limit, and waiting would stall their downloads.
    let limit = Arc::new(Semaphore::new(cores));
    let mut results = Vec::with_capacity(todo.len());
    for (k, layer) in todo.iter().enumerate() {
        let index = start + k;
        if !plan.applies_live(index) {
            results.push(None);
            continue;
        }
        let feed = feeds.get_mut(index).and_then(Option::take);
        let (mut tx, rx) = oneshot::channel::<ParallelResult>();
        results.push(Some(rx));
        let (s, st, l, limit, arrivals) = (
            snapshots.clone(),
            store.clone(),
            layer.clone(),
            limit.clone(),
            arrivals.clone(),
        );
        tokio::spawn(async move {
            // Its source: the download as it happens, or the stored blob
            // and a share of the cores.
            let ready = async {
                if let Some(feed) = feed
                    && let Some(reader) = feed.start().await
                {
                    return Ok((Source::Live(reader), None));
                }
                arrivals.wait(index).await?;
                let permit = limit
                    .acquire_owned()
                    .await
                    .map_err(|e| Error::Internal(format!("unpack limiter: {e}")))?;
                Ok::<_, Error>((Source::Store, Some(permit)))
            };
            // An unpack that has failed meanwhile wants nothing more: no
            // snapshot is prepared for it.
            let ready = tokio::select! {
                ready = ready => ready,
                () = tx.closed() => return,
            };
            let result = match ready {
                Ok((source, _permit)) => {
                    let live = matches!(source, Source::Live(_));
                    blocking(move || {
                        let key = extract_key(&l.chain_id);
                        prepare_and_apply(&s, &st, &l, &key, None, source).map(|a| {
                            let extracted = Extracted {
                                snapshots: s.clone(),
                                key: Some(key),
                            };
                            (extracted, a, live)
                        })
                    })
                    .await
                    .and_then(|r| r)
                }
                Err(e) => Err(e),
            };
            // Not received, it is dropped, and so is its snapshot.
            let _ = tx.send(result);
        });
    }
    let (mut applied, mut streamed) = (0, 0);
    for (k, rx) in results.into_iter().enumerate() {
        let (index, layer) = (start + k, &todo[k]);
        let _lock = plan.lock(index).await;
        let outcome = match rx {
            Some(rx) => Some(rx.await.map_err(|_| {
                Error::Internal(format!(
                    "the parallel apply of layer {} ended without a result",
                    layer.desc.digest
                ))
            })?),
            None => None,
        };
        // A layer is committed only once its blob is stored, digest checked.
        arrivals.wait(index).await?;
        let (s, l) = (snapshots.clone(), layer.clone());
        let committed = match outcome {
            Some(Ok((extracted, a, live))) => {
                let key = extracted.into_key();
                let committed = blocking(move || commit(&s, &l, &key, Some(&a))).await??;
                streamed += usize::from(committed && live);
                committed
            }
            // A layer refused for what it holds fails wherever it applies,
            // and one that filled the disk would fill it again.
            Some(Err(e)) if e.refuses_layer() || e.is_out_of_space() => return Err(e),
            Some(Err(e)) => {
                // Applied on its own it could not be (a hardlink into a
                // lower, say): apply it the sequential way, now that its
                // parent is committed. A real fault fails again there.
                tracing::info!(layer = %layer.desc.digest, error = %e, "parallel apply failed; applying sequentially");
                apply_sequential(store, snapshots, layer).await?
            }
            // Another unpack held it: committed by now, or (if that one
            // failed) applied here.
            None => apply_sequential(store, snapshots, layer).await?,
        };
        if committed {
            applied += 1;
        }
        tick(k);
    }
    Ok((applied, streamed))
}

/// Whether `chain_id` is committed, held by the unpack's lease if so.
async fn hold_committed(snapshots: &Snapshots, chain_id: &Digest) -> Result<bool> {
    let (s, name) = (snapshots.clone(), chain_id.to_string());
    Ok(blocking(move || s.hold_committed(&name)).await??)
}
