//! Streams one blob from the registry into a content-store ingest: the
//! network side is async, the writer runs on a blocking thread fed through a
//! bounded channel, so a layer is never held in memory. The same bytes can
//! go to the layer's apply as they arrive (a [`FeedSender`]), so a layer
//! streams once.
//!
//! An interrupted download resumes from where it is with `Range`; a
//! registry that ignores the range sends the whole blob again, and the part
//! already stored is skipped. A layer that dominates its image can be
//! fetched as parallel range requests, handed on in order.

use super::feed::FeedSender;
use super::progress::{Progress, State};
use super::{Error, Result, blocking};
use crate::content::{Error as ContentError, IoContext, Labels, Store, Writer};
use crate::descriptor::Descriptor;
use crate::metadata::ContentStore;
use crate::remote::client::{Repository, backoff, error_chain};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::{Response, StatusCode};
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

enum Command {
    Write(Bytes),
    Commit(Labels),
}

/// Why a download stopped early.
enum Stop {
    /// The ingest writer failed; its own error is the one to report.
    Writer,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<crate::remote::Error> for Stop {
    fn from(e: crate::remote::Error) -> Self {
        Stop::Failed(e.into())
    }
}

/// One blob to fetch into `store` under the ingest ref `key`.
pub struct BlobFetch<'a> {
    pub repo: &'a Repository,
    pub store: &'a ContentStore,
    pub desc: &'a Descriptor,
    pub key: &'a str,
    pub labels: Labels,
    pub progress: &'a Progress,
    /// Download slots; a blob already stored needs none.
    pub downloads: &'a Semaphore,
    /// Where the bytes also go as they arrive. It goes live only for a blob
    /// downloaded from its first byte; otherwise it is dropped unused.
    pub feed: Option<FeedSender>,
    /// Fetch in parallel parts (`RemoteOptions::ranged`), when the registry
    /// honours ranges.
    pub ranged: bool,
    /// Where the bytes downloaded are counted, for the pull's metrics.
    pub fetched: &'a AtomicU64,
}

/// Where downloaded bytes go, in order: the ingest, the feed, the progress.
struct Sink<'a> {
    tx: mpsc::Sender<Command>,
    feed: Option<FeedSender>,
    offset: u64,
    key: &'a str,
    progress: &'a Progress,
    fetched: &'a AtomicU64,
}

impl Sink<'_> {
    async fn deliver(&mut self, chunk: Bytes) -> Result<(), Stop> {
        self.offset += chunk.len() as u64;
        self.fetched
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if let Some(feed) = &self.feed {
            // An apply that has gone (it failed) no longer wants the bytes;
            // the blob still has to reach the store.
            if !feed.send(chunk.clone()).await {
                self.feed = None;
            }
        }
        self.tx
            .send(Command::Write(chunk))
            .await
            .map_err(|_| Stop::Writer)?;
        self.progress.advance(self.key, self.offset);
        Ok(())
    }
}

impl BlobFetch<'_> {
    /// Fetches the blob unless the store has it (in any namespace: then it
    /// is taken into this one, under the pull's lease).
    pub async fn run(self) -> Result<State> {
        let (desc, key, progress) = (self.desc, self.key, self.progress);
        // The ingest is opened (and locked) in one short blocking call; its
        // writer thread starts only with a download slot, so blobs waiting
        // for one hold no thread.
        let (store, d, k) = (self.store.clone(), desc.clone(), key.to_string());
        let opened = blocking(move || match store.writer(&k, Some(&d)) {
            Ok(w) => w.status().map(|status| Some((w, status.offset))),
            Err(ContentError::AlreadyExists(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await??;
        let Some((ingest, offset)) = opened else {
            return Ok(State::Exists);
        };
        let _slot = self
            .downloads
            .acquire()
            .await
            .map_err(|e| Error::Internal(format!("download limiter: {e}")))?;
        let (tx, rx) = mpsc::channel::<Command>(16);
        let writer = spawn_writer(ingest, desc.clone(), key.to_string(), rx);
        progress.set(key, State::Downloading, desc.size);
        progress.advance(key, offset);
        let mut sink = Sink {
            tx,
            // Resuming an ingest: the apply reads the stored blob later.
            feed: self.feed.filter(|_| offset == 0),
            offset,
            key,
            progress,
            fetched: self.fetched,
        };
        let ranged = self.repo.options().ranged;
        let downloaded = if self.ranged && offset == 0 {
            download_in_parts(
                self.repo,
                desc,
                &mut sink,
                ranged.part_size,
                ranged.parts_at_once,
                self.store,
            )
            .await
        } else {
            download_rest(self.repo, desc, &mut sink, None).await
        };
        let Sink { tx, feed, .. } = sink;
        let failure = match downloaded {
            Ok(()) => None,
            Err(Stop::Writer) => Some(None),
            Err(Stop::Failed(e)) => Some(Some(e)),
        };
        if let Some(failure) = failure {
            drop(tx);
            let written = writer.await;
            progress.set(key, State::Failed, desc.size);
            let e = match (failure, written) {
                (Some(e), _) => e,
                (None, Ok(Err(e))) => e.into(),
                (None, Ok(Ok(_))) => Error::Internal(format!("ingest {key} closed before commit")),
                (None, Err(e)) => Error::Internal(format!("ingest {key} writer: {e}")),
            };
            if let Some(feed) = feed {
                feed.fail(e.to_string());
            }
            return Err(e);
        }
        // The writer may already have failed; its error is the one to report.
        let _ = tx.send(Command::Commit(self.labels)).await;
        drop(tx);
        let outcome = match writer.await {
            Ok(Ok(true)) => Ok(State::Done),
            Ok(Ok(false)) => Err(Error::Internal(format!(
                "ingest {key} closed before commit"
            ))),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(Error::Internal(format!("ingest {key} writer: {e}"))),
        };
        match (&outcome, feed) {
            (Ok(_), Some(feed)) => feed.done(),
            (Err(e), Some(feed)) => feed.fail(e.to_string()),
            _ => {}
        }
        if outcome.is_err() {
            progress.set(key, State::Failed, desc.size);
        }
        outcome
    }
}

/// The ingest writer on a blocking thread: it writes and commits what it
/// is sent; `Ok(true)` once committed.
fn spawn_writer(
    mut w: Box<dyn Writer>,
    desc: Descriptor,
    key: String,
    mut rx: mpsc::Receiver<Command>,
) -> tokio::task::JoinHandle<crate::content::Result<bool>> {
    tokio::task::spawn_blocking(move || {
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Write(b) => w
                    .write_all(&b)
                    .context(|| format!("writing ingest {key}"))?,
                Command::Commit(labels) => {
                    return match w.commit(desc.size, Some(&desc.digest), labels) {
                        Ok(_) | Err(ContentError::AlreadyExists(_)) => Ok(true),
                        Err(e) => Err(e),
                    };
                }
            }
        }
        // Dropped without commit: the ingest stays for a later resume.
        Ok(false)
    })
}

/// The rest of the blob, from the sink's offset, as one stream.
async fn download_rest(
    repo: &Repository,
    desc: &Descriptor,
    sink: &mut Sink<'_>,
    first: Option<Response>,
) -> Result<(), Stop> {
    let range = sink.offset..desc.size;
    download_range(repo, desc, range, first, Dest::Sink(sink)).await
}

/// The blob as consecutive parts, `at_once` requests in flight, each part
/// spooled to a nameless file of the store until its turn (in memory where
/// the filesystem has no such files); falls back to one stream when the
/// registry ignores the range of the first.
async fn download_in_parts(
    repo: &Repository,
    desc: &Descriptor,
    sink: &mut Sink<'_>,
    part_size: u64,
    at_once: usize,
    store: &ContentStore,
) -> Result<(), Stop> {
    let key = sink.key;
    let part_size = part_size.max(1);
    let probe = repo.blob(desc, 0..part_size.min(desc.size)).await?;
    if probe.status() != StatusCode::PARTIAL_CONTENT {
        tracing::info!(blob = %desc.digest, "registry ignored Range; fetching the blob as one stream");
        return download_rest(repo, desc, sink, Some(probe)).await;
    }
    tracing::debug!(blob = %desc.digest, part_size, at_once, "fetching in parallel parts");
    let mut probe = Some(probe);
    let room = Arc::new(Semaphore::new(at_once.max(1)));
    let parts = (0..desc.size.div_ceil(part_size))
        .map(|i| i * part_size..(i + 1).saturating_mul(part_size).min(desc.size))
        .map(|range| {
            let first = probe.take();
            let room = room.clone();
            async move {
                let held = room
                    .acquire_owned()
                    .await
                    .map_err(|e| Stop::Failed(Error::Internal(format!("part limiter: {e}"))))?;
                let mut part = Part::new(store, key, desc, range.end - range.start).await;
                download_range(repo, desc, range, first, Dest::Part(&mut part))
                    .await
                    .map(|()| (part, held))
            }
        });
    // Parts go on downloading while earlier ones are handed on (the apply
    // may be the slower side), handed on in pieces small enough for the
    // ingest channel and the feed. A part holds its room until it has been
    // handed on, so at most `at_once` parts wait; the channel has a place
    // for each, so a finished part never keeps the others from being
    // polled.
    let (ready_tx, mut ready_rx) =
        mpsc::channel::<Result<(Part, OwnedSemaphorePermit), Stop>>(at_once.max(1));
    let producer = async move {
        let mut parts = futures_util::stream::iter(parts).buffered(at_once.max(1));
        loop {
            let part = tokio::select! {
                part = parts.next() => part,
                () = ready_tx.closed() => return,
            };
            let Some(part) = part else { return };
            let failed = part.is_err();
            if ready_tx.send(part).await.is_err() || failed {
                return;
            }
        }
    };
    let consumer = async move {
        while let Some(part) = ready_rx.recv().await {
            let (part, _room) = part?;
            part.hand_on(sink).await?;
        }
        Ok(())
    };
    let ((), delivered) = tokio::join!(producer, consumer);
    delivered
}

/// The largest piece of a part handed on at once.
const PIECE: usize = 256 << 10;

/// Where a `206`'s `Content-Range: bytes START-END/SIZE` starts.
fn content_range_start(response: &Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    value
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A part of a ranged fetch, held until its turn.
enum Part {
    /// In a nameless file of the store; `what` says which, for errors.
    Spooled {
        file: tokio::fs::File,
        what: String,
    },
    Memory(BytesMut),
}

fn spool_error(what: &str, source: std::io::Error) -> Stop {
    Stop::Failed(Error::Content(ContentError::Io {
        context: what.to_string(),
        source,
    }))
}

impl Part {
    async fn new(store: &ContentStore, key: &str, desc: &Descriptor, len: u64) -> Part {
        let what = format!(
            "writing ingest {key}: a part of {} spooled in {}",
            desc.digest,
            store.spool_dir().display()
        );
        let store = store.clone();
        match blocking(move || store.spool()).await {
            Ok(Ok(file)) => Part::Spooled {
                file: tokio::fs::File::from_std(file),
                what,
            },
            failed => {
                tracing::debug!(?failed, "no spool file: the part waits in memory");
                Part::Memory(BytesMut::with_capacity(len as usize))
            }
        }
    }

    async fn put(&mut self, chunk: &[u8]) -> Result<(), Stop> {
        use tokio::io::AsyncWriteExt;
        match self {
            Part::Spooled { file, what } => file
                .write_all(chunk)
                .await
                .map_err(|e| spool_error(what, e)),
            Part::Memory(buf) => {
                buf.extend_from_slice(chunk);
                Ok(())
            }
        }
    }

    /// Hands the part on to `sink` in pieces.
    async fn hand_on(self, sink: &mut Sink<'_>) -> Result<(), Stop> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
        match self {
            Part::Memory(buf) => {
                let mut part = buf.freeze();
                while !part.is_empty() {
                    let piece = part.split_to(part.len().min(PIECE));
                    sink.deliver(piece).await?;
                }
            }
            Part::Spooled { mut file, what } => {
                let fail = |e| spool_error(&what, e);
                file.flush().await.map_err(fail)?;
                file.seek(std::io::SeekFrom::Start(0)).await.map_err(fail)?;
                loop {
                    let mut piece = BytesMut::with_capacity(PIECE);
                    while piece.len() < PIECE {
                        if file.read_buf(&mut piece).await.map_err(fail)? == 0 {
                            break;
                        }
                    }
                    if piece.is_empty() {
                        break;
                    }
                    sink.deliver(piece.freeze()).await?;
                }
            }
        }
        Ok(())
    }
}

/// Where [`download_range`] puts what it downloads.
enum Dest<'a, 'b> {
    /// Straight on, as it arrives.
    Sink(&'a mut Sink<'b>),
    /// Held for its turn (a part of a ranged fetch).
    Part(&'a mut Part),
}

impl Dest<'_, '_> {
    async fn put(&mut self, chunk: Bytes) -> Result<(), Stop> {
        match self {
            Dest::Sink(sink) => sink.deliver(chunk).await,
            Dest::Part(part) => part.put(&chunk).await,
        }
    }
}

/// Downloads `range` of the blob, each chunk to `into` in order. A
/// dropped connection resumes within the range; every read is bounded by
/// the progress timeout. `first` is a response already started for it.
async fn download_range(
    repo: &Repository,
    desc: &Descriptor,
    range: Range<u64>,
    mut first: Option<Response>,
    mut into: Dest<'_, '_>,
) -> Result<(), Stop> {
    let options = repo.options();
    let (timeout, attempts) = (options.progress_timeout, options.attempts.max(1));
    let want = range.end - range.start;
    let registry = repo.registry().to_string();
    let unavailable = |message: String| {
        Stop::Failed(Error::Remote(crate::remote::Error::Unavailable {
            registry: registry.clone(),
            message: format!("blob {}: {message}", desc.digest),
        }))
    };
    let protocol = |message: String| {
        Stop::Failed(Error::Remote(crate::remote::Error::Protocol {
            registry: registry.clone(),
            what: format!("blob {}", desc.digest),
            message,
        }))
    };
    let mut got = 0u64;
    let mut attempt = 0;
    // Attempts count failures in a row: an interrupted request that moved
    // bytes starts the count again, so a long download survives many drops.
    let mut got_before = 0u64;
    'request: loop {
        attempt = if got > got_before { 1 } else { attempt + 1 };
        got_before = got;
        if got == want {
            return Ok(());
        }
        let from = range.start + got;
        let mut response = match first.take() {
            Some(r) => r,
            None => repo.blob(desc, from..range.end).await?,
        };
        let from_host = crate::metrics::fetched_from(response.url());
        // Bytes of a whole-blob answer that come before the ones wanted; its
        // bytes after them are never read.
        let mut skip = 0;
        let whole = response.status() != StatusCode::PARTIAL_CONTENT;
        let asked_range = from > 0 || range.end < desc.size;
        if asked_range && whole {
            tracing::info!(blob = %desc.digest, from, "registry ignored Range; skipping to the bytes wanted");
            skip = from;
        } else if asked_range {
            match content_range_start(&response) {
                Some(start) if start != from => {
                    return Err(protocol(format!(
                        "answered a request for bytes from {from} with bytes from {start}"
                    )));
                }
                _ => {}
            }
        }
        loop {
            match tokio::time::timeout(timeout, response.chunk()).await {
                Err(_) => {
                    return Err(Stop::Failed(Error::Remote(
                        crate::remote::Error::NoProgress {
                            what: format!("blob {}", desc.digest),
                            timeout,
                        },
                    )));
                }
                Ok(Ok(Some(mut chunk))) => {
                    from_host.inc_by(chunk.len() as u64);
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64);
                        let _ = chunk.split_to(n as usize);
                        skip -= n;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    let rest = want - got;
                    if chunk.len() as u64 > rest {
                        if !(whole && range.end < desc.size) {
                            return Err(protocol(if range.end == desc.size {
                                format!("more than the {} bytes its descriptor says", desc.size)
                            } else {
                                format!("more than the {want} bytes asked for at {}", range.start)
                            }));
                        }
                        // A whole blob sent for a part: only the part is wanted.
                        chunk.truncate(rest as usize);
                    }
                    got += chunk.len() as u64;
                    into.put(chunk).await?;
                    if got == want && whole && range.end < desc.size {
                        return Ok(());
                    }
                }
                Ok(Ok(None)) if got == want => return Ok(()),
                // Early EOF or a dropped connection: resume from where we are.
                Ok(Ok(None)) | Ok(Err(_)) if attempt < attempts => {
                    tracing::info!(blob = %desc.digest, at = range.start + got, attempt, "blob download interrupted; resuming");
                    tokio::time::sleep(backoff(attempt, None)).await;
                    continue 'request;
                }
                Ok(Ok(None)) => {
                    return Err(unavailable(format!(
                        "stream ended at {} of {} bytes",
                        range.start + got,
                        desc.size
                    )));
                }
                Ok(Err(e)) => return Err(unavailable(error_chain(&e))),
            }
        }
    }
}
