//! The pull pipeline: resolve, fetch the descriptor tree into the content
//! store under a lease, then record the image. Used by both the CLI and the
//! CRI service.

pub mod feed;
pub mod fetch;
pub mod progress;
pub mod unpack;

use crate::content::{Error as ContentError, Labels, Store};
use crate::descriptor::{Descriptor, Platform};
use crate::digest::Digest;
use crate::images::{self, Kind, platform};
use crate::metadata::images::Image;
use crate::metadata::leases::expire_label;
use crate::metadata::{ContentStore, Db};
use crate::reference::{Reference, ReferenceError};
use crate::remote::client::Repository;
use crate::remote::{Credentials, RegistryClient};
use crate::snapshot::{SnapshotRoot, Snapshots};
use futures_util::future::try_join_all;
use parking_lot::Mutex;
use progress::{Progress, State};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;

impl Error {
    /// Whether a layer was refused for what it holds (a path too long,
    /// xattrs beyond what the kernel keeps): applying it again elsewhere
    /// cannot succeed.
    pub fn refuses_layer(&self) -> bool {
        matches!(
            self,
            Error::Apply(crate::diff::Error::Archive {
                source: crate::archive::ArchiveError::Refused { .. },
                ..
            })
        )
    }

    /// Whether a layer's tar itself is at fault: an entry malformed,
    /// hostile, or beyond what hoist applies. The same layer fails the same
    /// way on every try; the registry served what the digest names.
    pub fn is_invalid_layer(&self) -> bool {
        use crate::archive::ArchiveError as A;
        matches!(
            self,
            Error::Apply(crate::diff::Error::Archive {
                source: A::Malformed { .. }
                    | A::Refused { .. }
                    | A::Breakout { .. }
                    | A::UnsupportedType { .. }
                    | A::InvalidWhiteout { .. }
                    | A::Hardlink { .. }
                    | A::NotADirectory { .. },
                ..
            })
        )
    }

    /// Whether the pull failed for want of disk space (or quota), in a
    /// file or in the database: freeing space and pulling again can finish it.
    pub fn is_out_of_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && (matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
            {
                return true;
            }
            if let Some(rusqlite::Error::SqliteFailure(f, _)) = e.downcast_ref::<rusqlite::Error>()
                && f.code == rusqlite::ErrorCode::DiskFull
            {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Remote(#[from] crate::remote::Error),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
    #[error(transparent)]
    Image(#[from] images::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error(transparent)]
    Apply(#[from] crate::diff::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Platforms to fetch; empty means this machine's.
    pub platforms: Vec<Platform>,
    pub all_platforms: bool,
    pub credentials: Option<Credentials>,
    /// Fetch only; by default every fetched manifest is unpacked.
    pub no_unpack: bool,
    /// Apply layers one after another even where they could apply in parallel.
    pub sequential_unpack: bool,
}

/// What a pull produced.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub name: String,
    pub target: Descriptor,
    /// The platform manifests fetched, with their configs.
    pub manifests: Vec<PulledManifest>,
}

#[derive(Debug, Clone)]
pub struct PulledManifest {
    pub platform: Option<Platform>,
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    pub unpacked: Option<unpack::Unpacked>,
}

/// Long-lived pull machinery: the download limit and the per-digest locks
/// that make each blob download once however many pulls want it.
pub struct Puller {
    db: Arc<Db>,
    client: Arc<RegistryClient>,
    downloads: Arc<Semaphore>,
    blob_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    snapshotter: Option<Arc<SnapshotRoot>>,
    chain_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

static LEASE_SEQ: AtomicU64 = AtomicU64::new(0);

/// A lease outlives a crashed or cancelled pull by this much, so its ingests
/// can be resumed before GC takes them.
const PULL_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

impl Puller {
    /// Without a snapshotter, pulls fetch only.
    pub fn new(
        db: Arc<Db>,
        client: Arc<RegistryClient>,
        max_concurrent_downloads: usize,
        snapshotter: Option<Arc<SnapshotRoot>>,
    ) -> Arc<Self> {
        Arc::new(Puller {
            db,
            client,
            downloads: Arc::new(Semaphore::new(max_concurrent_downloads.max(1))),
            blob_locks: Mutex::new(HashMap::new()),
            snapshotter,
            chain_locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn snapshotter(&self) -> Option<&Arc<SnapshotRoot>> {
        self.snapshotter.as_ref()
    }

    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Pulls `reference` into `namespace` and records it as an image.
    pub async fn pull(
        self: &Arc<Self>,
        namespace: &str,
        reference: &str,
        options: &PullOptions,
        progress: &Progress,
    ) -> Result<Pulled> {
        let timer = crate::metrics::pull_started();
        let pulled = self
            .pull_counted(namespace, reference, options, progress, timer.bytes())
            .await;
        let outcome = pulled
            .as_ref()
            .map_or_else(crate::metrics::pull_outcome, |_| "success");
        timer.finish(outcome);
        pulled
    }

    /// [`Puller::pull`], adding the bytes it fetches to `fetched`.
    async fn pull_counted(
        self: &Arc<Self>,
        namespace: &str,
        reference: &str,
        options: &PullOptions,
        progress: &Progress,
        fetched: &AtomicU64,
    ) -> Result<Pulled> {
        let reference = Reference::parse(reference)?;
        let name = reference.to_string();
        let repo = self
            .client
            .repository(&reference, options.credentials.as_ref())?;
        progress.set(&name, State::Resolving, 0);
        let target = repo.resolve(&reference).await?;
        fetched.fetch_add(target.size, Ordering::Relaxed);
        progress.set(&name, State::Resolved, 0);
        tracing::info!(image = %name, digest = %target.digest, "resolved");

        let lease = format!(
            "hoist-pull-{}-{}-{}",
            crate::metadata::to_nanos(SystemTime::now()),
            std::process::id(),
            LEASE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let db = self.db.clone();
        let (ns, id) = (namespace.to_string(), lease.clone());
        blocking(move || db.create_lease(&ns, &id, [expire_label(PULL_LEASE_TTL)].into()))
            .await??;
        let store = self.db.content_store(namespace).with_lease(&lease);
        let snapshots = match (&self.snapshotter, options.no_unpack) {
            (Some(root), false) => Some(root.namespace(namespace).with_lease(&lease)),
            _ => None,
        };

        let job = Job {
            puller: self.clone(),
            repo: &repo,
            store: &store,
            snapshots: snapshots.as_ref(),
            options,
            progress,
            fetched,
        };
        let outcome = async {
            let manifests = job.fetch_root(&target).await?;
            let db = self.db.clone();
            let (ns, image) = (
                namespace.to_string(),
                Image::new(name.clone(), target.clone()),
            );
            blocking(move || record_image(&db, &ns, image)).await??;
            Ok::<_, Error>(Pulled {
                name: name.clone(),
                target: target.clone(),
                manifests,
            })
        }
        .await;
        // Success or failure, the pull's hold ends here; after a failure GC
        // removes what it fetched. (A cancelled pull never gets here, and its
        // lease keeps the ingests until it expires, for a resume.) A pull
        // that ran out of disk space keeps its lease as a cancelled one does:
        // once space is freed, pulling again resumes its partial downloads
        // and reuses the blobs it stored.
        if let Err(e) = &outcome
            && e.is_out_of_space()
        {
            tracing::warn!(%lease, "out of disk space: the pull's downloads stay for a retry until its lease expires");
            return outcome;
        }
        let db = self.db.clone();
        let ns = namespace.to_string();
        match blocking(move || db.delete_lease(&ns, &lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the pull lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the pull lease"),
        }
        outcome
    }

    fn blob_lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        lock_for(&self.blob_locks, digest)
    }

    /// Unpacks of one chain ID in one namespace's snapshots run one at a
    /// time (namespaces have snapshots of their own).
    pub(crate) fn chain_lock(
        &self,
        namespace: &str,
        chain_id: &Digest,
    ) -> Arc<tokio::sync::Mutex<()>> {
        let key = Digest::of(format!("{namespace}\0{chain_id}").as_bytes());
        lock_for(&self.chain_locks, &key)
    }
}

/// Points `image.name` at its target. A name already pointing there keeps
/// its labels (the CRI service's id, size and user); a new or moved name
/// starts without them.
fn record_image(db: &Db, namespace: &str, image: Image) -> crate::metadata::Result<()> {
    match db.image(namespace, &image.name) {
        Ok(existing) if existing.target.digest == image.target.digest => Ok(()),
        Ok(_) | Err(crate::metadata::Error::NotFound(_)) => {
            db.put_image(namespace, image).map(drop)
        }
        Err(e) => Err(e),
    }
}

/// The lock for `digest` in `locks`, forgetting locks nobody holds so the
/// map stays as small as the work in flight.
fn lock_for(
    locks: &Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    digest: &Digest,
) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = locks.lock();
    locks.retain(|_, l| Arc::strong_count(l) > 1);
    locks.entry(digest.clone()).or_default().clone()
}

struct Job<'a> {
    puller: Arc<Puller>,
    repo: &'a Repository,
    store: &'a ContentStore,
    snapshots: Option<&'a Snapshots>,
    options: &'a PullOptions,
    progress: &'a Progress,
    /// Bytes this pull fetched from registries.
    fetched: &'a AtomicU64,
}

/// A manifest picked from an index, and the platforms it was picked for.
struct Chosen {
    manifest: Descriptor,
    wanted: Vec<Platform>,
}

fn progress_key(kind: Kind, digest: &Digest) -> String {
    format!("{}-{digest}", kind.name())
}

impl Job<'_> {
    async fn fetch_root(&self, target: &Descriptor) -> Result<Vec<PulledManifest>> {
        match images::kind(target)? {
            Kind::Index => {
                let body = self.manifest_bytes(target).await?;
                let index = images::parse_index(target, &body)?;
                let chosen = self.choose(target, &index.manifests)?;
                let manifests: Vec<Descriptor> =
                    chosen.iter().map(|c| c.manifest.clone()).collect();
                let labels = images::gc_index_labels(&index.manifests, &manifests);
                self.store_manifest(target, Kind::Index, labels, body)
                    .await?;
                let fetched =
                    try_join_all(chosen.iter().map(|c| self.fetch_manifest_tree(c))).await?;
                Ok(fetched)
            }
            Kind::Manifest => {
                let root = Chosen {
                    manifest: target.clone(),
                    wanted: Vec::new(),
                };
                Ok(vec![self.fetch_manifest_tree(&root).await?])
            }
            other => Err(Error::Image(images::Error::Invalid {
                what: "image",
                digest: target.digest.to_string(),
                message: format!(
                    "the reference points at a {}, not a manifest or index",
                    other.name()
                ),
            })),
        }
    }

    /// The manifests of an index this pull wants, each with the platforms
    /// it was chosen for (none when every platform is wanted).
    fn choose(&self, index: &Descriptor, manifests: &[Descriptor]) -> Result<Vec<Chosen>> {
        let candidates: Vec<&Descriptor> = manifests
            .iter()
            .filter(|m| !images::is_attestation(m))
            .collect();
        if self.options.all_platforms {
            return Ok(candidates
                .into_iter()
                .map(|m| Chosen {
                    manifest: m.clone(),
                    wanted: Vec::new(),
                })
                .collect());
        }
        let wanted = if self.options.platforms.is_empty() {
            vec![platform::host()]
        } else {
            self.options.platforms.clone()
        };
        let mut chosen: Vec<Chosen> = Vec::new();
        for w in &wanted {
            let Some(m) = platform::best_match(w, candidates.iter().copied()) else {
                let available: Vec<String> = candidates
                    .iter()
                    .filter_map(|m| m.platform.as_ref().map(images::platform_string))
                    .collect();
                return Err(Error::Image(images::Error::NoMatchingPlatform {
                    wanted: images::platform_string(w),
                    digest: index.digest.to_string(),
                    available: available.join(", "),
                }));
            };
            match chosen.iter_mut().find(|c| c.manifest.digest == m.digest) {
                Some(c) => c.wanted.push(w.clone()),
                None => chosen.push(Chosen {
                    manifest: m.clone(),
                    wanted: vec![w.clone()],
                }),
            }
        }
        Ok(chosen)
    }

    /// Fails unless the manifest's config is for each platform it was
    /// chosen for: an index entry's platform (or its lack of one) is only
    /// a claim.
    async fn check_config(&self, chosen: &Chosen, config: &Descriptor) -> Result<()> {
        if chosen.wanted.is_empty() {
            return Ok(());
        }
        let body = read_blob(self.store, &config.digest).await?;
        let parsed = images::parse_config(config, &body)?;
        for w in &chosen.wanted {
            images::check_config_platform(&chosen.manifest, config, &parsed, w)?;
        }
        Ok(())
    }

    async fn fetch_manifest_tree(&self, chosen: &Chosen) -> Result<PulledManifest> {
        let desc = &chosen.manifest;
        match images::kind(desc)? {
            Kind::Manifest => {}
            other => {
                return Err(Error::Image(images::Error::Invalid {
                    what: "manifest",
                    digest: desc.digest.to_string(),
                    message: format!("expected a manifest, found a {}", other.name()),
                }));
            }
        }
        let body = self.manifest_bytes(desc).await?;
        let manifest = images::parse_manifest(desc, &body)?;
        let mut children = vec![manifest.config.clone()];
        children.extend(manifest.layers.iter().cloned());
        for child in &children {
            match images::kind(child)? {
                Kind::Config | Kind::Layer(_) => {}
                other => {
                    return Err(Error::Image(images::Error::Invalid {
                        what: "manifest",
                        digest: desc.digest.to_string(),
                        message: format!("child {} is a {}", child.digest, other.name()),
                    }));
                }
            }
        }
        let labels = images::gc_child_labels(Kind::Manifest, &children);
        self.store_manifest(desc, Kind::Manifest, labels, body)
            .await?;
        // The config first: it says which layers need applying, and those
        // are fed to their applies as they download.
        let config = &manifest.config;
        self.fetch_data_blob(config, None, false).await?;
        self.check_config(chosen, config).await?;
        let (arrived, arrivals) = unpack::arrivals(manifest.layers.len());
        let plan = match self.snapshots {
            Some(snapshots) => Some(
                unpack::plan(
                    &self.puller,
                    self.store,
                    snapshots,
                    config,
                    &manifest.layers,
                    self.options.sequential_unpack,
                )
                .await?,
            ),
            None => None,
        };
        // Sizes come from the manifest: no sum of them may overflow.
        let total = manifest
            .layers
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.size));
        let ranged = self.repo.options().ranged;
        let mut feeds = Vec::with_capacity(manifest.layers.len());
        let fetches: Vec<_> = manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let (tx, rx) = match &plan {
                    Some(p) if p.applies_live(i) => {
                        let (tx, rx) = feed::feed(feed::FEED_BUDGET);
                        (Some(tx), Some(rx))
                    }
                    _ => (None, None),
                };
                feeds.push(rx);
                let arrived = &arrived;
                let in_parts = ranged.applies(layer.size, total);
                async move {
                    self.fetch_data_blob(layer, tx, in_parts).await?;
                    arrived.send_modify(|stored| stored[i] = true);
                    Ok::<_, Error>(())
                }
            })
            .collect();
        let unpacking = async {
            match (plan, self.snapshots) {
                (Some(plan), Some(snapshots)) => {
                    let u = unpack::unpack(
                        plan,
                        self.store,
                        snapshots,
                        config,
                        arrivals,
                        feeds,
                        self.progress,
                    );
                    u.await.map(Some)
                }
                _ => Ok(None),
            }
        };
        let (_, unpacked) = tokio::try_join!(try_join_all(fetches), unpacking)?;
        Ok(PulledManifest {
            platform: desc.platform.clone(),
            manifest: desc.clone(),
            config: manifest.config,
            layers: manifest.layers,
            unpacked,
        })
    }

    /// A manifest or index: from the store when present, else the registry.
    async fn manifest_bytes(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let key = progress_key(images::kind(desc)?, &desc.digest);
        match read_blob(self.store, &desc.digest).await {
            Ok(body) if Digest::of(&body) == desc.digest => {
                self.progress.set(&key, State::Exists, desc.size);
                return Ok(body);
            }
            Ok(_) | Err(Error::Content(ContentError::NotFound(_))) => {}
            Err(e) => return Err(e),
        }
        self.progress.set(&key, State::Downloading, desc.size);
        let body = self.repo.fetch_manifest(desc).await?;
        self.fetched.fetch_add(body.len() as u64, Ordering::Relaxed);
        self.progress.set(&key, State::Done, desc.size);
        Ok(body.to_vec())
    }

    /// Writes a manifest or index with its GC labels (merged into an existing blob's).
    async fn store_manifest(
        &self,
        desc: &Descriptor,
        kind: Kind,
        mut labels: Labels,
        body: Vec<u8>,
    ) -> Result<()> {
        let (k, v) = images::distribution_source_label(self.repo.registry(), self.repo.path());
        labels.insert(k, v);
        let store = self.store.clone();
        let desc = desc.clone();
        let key = progress_key(kind, &desc.digest);
        blocking(move || -> crate::content::Result<()> {
            crate::content::write_blob(&store, &key, body.as_slice(), &desc, labels.clone())?;
            merge_labels(&store, &desc.digest, labels)
        })
        .await??;
        Ok(())
    }

    /// A config or layer, streamed; each digest downloads once at a time.
    /// `feed` gets the bytes as they arrive, if this pull downloads them.
    async fn fetch_data_blob(
        &self,
        desc: &Descriptor,
        feed: Option<feed::FeedSender>,
        in_parts: bool,
    ) -> Result<()> {
        let key = progress_key(images::kind(desc)?, &desc.digest);
        self.progress.set(&key, State::Waiting, desc.size);
        let lock = self.puller.blob_lock(&desc.digest);
        let _once = lock.lock().await;
        let (k, v) = images::distribution_source_label(self.repo.registry(), self.repo.path());
        let labels: Labels = [(k, v)].into();
        let state = fetch::BlobFetch {
            repo: self.repo,
            store: self.store,
            desc,
            key: &key,
            labels: labels.clone(),
            progress: self.progress,
            downloads: &self.puller.downloads,
            feed,
            ranged: in_parts,
            fetched: self.fetched,
        }
        .run()
        .await?;
        if state == State::Exists {
            let (store, digest) = (self.store.clone(), desc.digest.clone());
            blocking(move || merge_labels(&store, &digest, labels)).await??;
        }
        self.progress.set(&key, state, desc.size);
        Ok(())
    }
}

/// A small blob (manifest, config) read whole, off the async runtime.
pub(crate) async fn read_blob(store: &ContentStore, digest: &Digest) -> Result<Vec<u8>> {
    let (store, digest) = (store.clone(), digest.clone());
    Ok(blocking(move || -> crate::content::Result<Vec<u8>> {
        let mut blob = store.reader_at(&digest)?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut blob, &mut out).map_err(|source| ContentError::Io {
            context: format!("reading {digest}"),
            source,
        })?;
        Ok(out)
    })
    .await??)
}

/// Adds `labels` to a blob's labels, keeping the others.
pub(crate) fn merge_labels(
    store: &ContentStore,
    digest: &Digest,
    labels: Labels,
) -> crate::content::Result<()> {
    let mut info = store.info(digest)?;
    if labels.iter().all(|(k, v)| info.labels.get(k) == Some(v)) {
        return Ok(());
    }
    let paths: Vec<String> = labels.keys().map(|k| format!("labels.{k}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    info.labels = labels;
    store.update(info, &paths)?;
    Ok(())
}

/// Runs blocking work (SQLite, file I/O) off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task: {e}")))
}
