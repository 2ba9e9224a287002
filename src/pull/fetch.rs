//! Streams one blob from the registry into a content-store ingest: the
//! network side is async, the writer runs on a blocking thread fed through a
//! bounded channel, so a layer is never held in memory. An interrupted
//! download resumes from the ingest's offset with `Range`.

use super::progress::{Progress, State};
use super::{Error, Result};
use crate::content::{Error as ContentError, IoContext, Labels, Store};
use crate::descriptor::Descriptor;
use crate::metadata::ContentStore;
use crate::remote::client::{Repository, backoff, error_chain};
use bytes::Bytes;
use std::io::Write;
use tokio::sync::{mpsc, oneshot};

enum Command {
    Write(Bytes),
    /// The registry ignored our `Range`: start the ingest over.
    Restart,
    Commit(Labels),
}

/// Fetches `desc` into `store` under the ingest ref `key`, unless it exists.
pub async fn fetch_blob(
    repo: &Repository,
    store: &ContentStore,
    desc: &Descriptor,
    key: &str,
    labels: Labels,
    progress: &Progress,
) -> Result<State> {
    let (offset_tx, offset_rx) = oneshot::channel();
    let (tx, mut rx) = mpsc::channel::<Command>(16);
    let writer_store = store.clone();
    let writer_desc = desc.clone();
    let writer_key = key.to_string();
    let writer = tokio::task::spawn_blocking(move || -> crate::content::Result<bool> {
        let mut w = match writer_store.writer(&writer_key, Some(&writer_desc)) {
            Ok(w) => w,
            Err(ContentError::AlreadyExists(_)) => {
                let _ = offset_tx.send(None);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let _ = offset_tx.send(Some(w.status()?.offset));
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Write(b) => w
                    .write_all(&b)
                    .context(|| format!("writing ingest {writer_key}"))?,
                Command::Restart => w.truncate(0)?,
                Command::Commit(labels) => {
                    return match w.commit(writer_desc.size, Some(&writer_desc.digest), labels) {
                        Ok(_) | Err(ContentError::AlreadyExists(_)) => Ok(true),
                        Err(e) => Err(e),
                    };
                }
            }
        }
        // Dropped without commit: the ingest stays for a later resume.
        Ok(false)
    });
    let Ok(Some(mut offset)) = offset_rx.await else {
        // Either the blob exists or opening the writer failed; the task says which.
        return match writer.await {
            Ok(Ok(_)) => Ok(State::Exists),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(Error::Internal(format!("ingest writer: {e}"))),
        };
    };
    let timeout = repo_timeout(repo);
    let attempts = repo_attempts(repo);
    let mut attempt = 0;
    let failure = 'download: loop {
        attempt += 1;
        if offset == desc.size {
            break 'download None;
        }
        progress.set(key, State::Downloading, desc.size);
        progress.advance(key, offset);
        let mut response = match repo.blob(desc, offset).await {
            Ok(r) => r,
            Err(e) => break 'download Some(Error::from(e)),
        };
        if offset > 0 && response.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            tracing::info!(%key, offset, "registry ignored Range; starting the blob over");
            if tx.send(Command::Restart).await.is_err() {
                break 'download None;
            }
            offset = 0;
        }
        loop {
            match tokio::time::timeout(timeout, response.chunk()).await {
                Err(_) => {
                    break 'download Some(Error::Remote(crate::remote::Error::NoProgress {
                        what: format!("blob {}", desc.digest),
                        timeout,
                    }));
                }
                Ok(Ok(Some(chunk))) => {
                    offset += chunk.len() as u64;
                    if offset > desc.size {
                        break 'download Some(Error::Remote(crate::remote::Error::Protocol {
                            registry: repo.registry().to_string(),
                            what: format!("blob {}", desc.digest),
                            message: format!(
                                "more than the {} bytes its descriptor says",
                                desc.size
                            ),
                        }));
                    }
                    if tx.send(Command::Write(chunk)).await.is_err() {
                        break 'download None;
                    }
                    progress.advance(key, offset);
                }
                Ok(Ok(None)) if offset == desc.size => break 'download None,
                // Early EOF or a dropped connection: resume from where we are.
                Ok(Ok(None)) | Ok(Err(_)) if attempt < attempts => {
                    tracing::info!(%key, offset, attempt, "blob download interrupted; resuming");
                    tokio::time::sleep(backoff(attempt, None)).await;
                    continue 'download;
                }
                Ok(Ok(None)) => {
                    break 'download Some(Error::Remote(crate::remote::Error::Unavailable {
                        registry: repo.registry().to_string(),
                        message: format!(
                            "blob {}: stream ended at {offset} of {} bytes",
                            desc.digest, desc.size
                        ),
                    }));
                }
                Ok(Err(e)) => {
                    break 'download Some(Error::Remote(crate::remote::Error::Unavailable {
                        registry: repo.registry().to_string(),
                        message: format!("blob {}: {}", desc.digest, error_chain(&e)),
                    }));
                }
            }
        }
    };
    if let Some(e) = failure {
        drop(tx);
        let _ = writer.await;
        progress.set(key, State::Failed, desc.size);
        return Err(e);
    }
    // The writer may already have failed; its error is the one to report.
    let _ = tx.send(Command::Commit(labels)).await;
    drop(tx);
    match writer.await {
        Ok(Ok(true)) => Ok(State::Done),
        Ok(Ok(false)) => Err(Error::Internal(format!(
            "ingest {key} closed before commit"
        ))),
        Ok(Err(e)) => {
            progress.set(key, State::Failed, desc.size);
            Err(e.into())
        }
        Err(e) => Err(Error::Internal(format!("ingest writer: {e}"))),
    }
}

fn repo_timeout(repo: &Repository) -> std::time::Duration {
    repo.options().progress_timeout
}

fn repo_attempts(repo: &Repository) -> u32 {
    repo.options().attempts.max(1)
}
