//! The content store: immutable blobs addressed by digest, and resumable ingests
//! that become blobs once their size and digest are verified.
//!
//! [`Store`] is the interface; [`local::LocalStore`] keeps the bytes on disk
//! (`blobs/` and `ingest/`), and `metadata::ContentStore` adds namespaces, labels
//! and leases on top of it. Both pass the conformance suite in [`testsuite`].

pub mod local;
#[cfg(test)]
pub mod testsuite;

use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::filters::{Adaptor, Filter};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

pub type Labels = BTreeMap<String, String>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("content {0} not found")]
    NotFound(String),
    #[error("content {0} already exists")]
    AlreadyExists(String),
    #[error("ingest {0:?} is locked: another writer holds it")]
    Locked(String),
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("digest mismatch for ingest {reference:?}: expected {expected}, got {actual}")]
    DigestMismatch {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("content database: {}", crate::metadata::describe_db_error(.0))]
    Database(#[from] rusqlite::Error),
}

/// Adds what was being done to an I/O error, so that it names the file.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

/// What the store knows of one committed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub digest: Digest,
    pub size: u64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub labels: Labels,
}

impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "digest" => Some(self.digest.to_string()),
            [f] if f == "size" => Some(self.size.to_string()),
            [f, key] if f == "labels" => self.labels.get(key).cloned(),
            _ => None,
        }
    }
}

/// The progress of one ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub reference: String,
    pub offset: u64,
    pub total: u64,
    pub expected: Option<Digest>,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
}

impl Adaptor for Status {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "ref" => Some(self.reference.clone()),
            [f] if f == "expected" => self.expected.as_ref().map(Digest::to_string),
            _ => None,
        }
    }
}

/// Random access to a committed blob, plus a sequential [`io::Read`].
#[derive(Debug)]
pub struct Blob {
    file: File,
    size: u64,
    pos: u64,
}

impl Blob {
    pub(crate) fn new(file: File, size: u64) -> Self {
        Blob { file, size, pos: 0 }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
}

impl io::Read for Blob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// An open ingest. Dropping it without commit keeps the data on disk, so that
/// a later writer for the same ref resumes where this one stopped.
pub trait Writer: io::Write + Send {
    fn status(&self) -> Result<Status>;
    /// The digest of the bytes written so far.
    fn digest(&self) -> Digest;
    /// Cuts the ingest back to `size` bytes (0 restarts it).
    fn truncate(&mut self, size: u64) -> Result<()>;
    /// Verifies `size` (0: any) and `expected` (or the digest given when the
    /// writer was opened), then makes the blob visible. A mismatch discards the
    /// ingest, so a retry starts clean.
    fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<&Digest>,
        labels: Labels,
    ) -> Result<Digest>;
}

pub trait Store: Send + Sync {
    fn info(&self, digest: &Digest) -> Result<Info>;
    /// Updates the labels named by `fieldpaths` (`labels` for all of them,
    /// `labels.<key>` for one; an empty value removes it). No field paths
    /// replaces all labels.
    fn update(&self, info: Info, fieldpaths: &[&str]) -> Result<Info>;
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()>;
    fn delete(&self, digest: &Digest) -> Result<()>;
    fn reader_at(&self, digest: &Digest) -> Result<Blob>;
    /// Opens (or resumes) the ingest `reference`. With an `expected`
    /// descriptor whose blob exists, fails with [`Error::AlreadyExists`].
    fn writer(&self, reference: &str, expected: Option<&Descriptor>) -> Result<Box<dyn Writer>>;
    fn status(&self, reference: &str) -> Result<Status>;
    fn list_statuses(&self, filter: &Filter) -> Result<Vec<Status>>;
    fn abort(&self, reference: &str) -> Result<()>;
}

/// Applies containerd's label field paths to `current`.
pub fn apply_label_update(current: &mut Labels, update: Labels, fieldpaths: &[&str]) -> Result<()> {
    if fieldpaths.is_empty() || fieldpaths.contains(&"labels") {
        *current = update;
        return Ok(());
    }
    for path in fieldpaths {
        let Some(key) = path.strip_prefix("labels.") else {
            return Err(Error::InvalidArgument(format!(
                "cannot update field {path:?}: only labels are mutable"
            )));
        };
        match update.get(key) {
            Some(v) if !v.is_empty() => {
                current.insert(key.to_string(), v.clone());
            }
            _ => {
                current.remove(key);
            }
        }
    }
    Ok(())
}

/// Copies a whole stream into a new blob; the convenience most callers want.
pub fn write_blob(
    store: &dyn Store,
    reference: &str,
    mut data: impl io::Read,
    expected: &Descriptor,
    labels: Labels,
) -> Result<Digest> {
    let mut w = match store.writer(reference, Some(expected)) {
        Ok(w) => w,
        Err(Error::AlreadyExists(_)) => return Ok(expected.digest.clone()),
        Err(e) => return Err(e),
    };
    // A resumed ingest already holds a prefix of the data.
    let offset = w.status()?.offset;
    io::copy(&mut io::Read::take(&mut data, offset), &mut io::sink())
        .context(|| format!("skipping {offset} resumed bytes of {reference}"))?;
    io::copy(&mut data, &mut w).context(|| format!("writing ingest {reference}"))?;
    match w.commit(expected.size, Some(&expected.digest), labels) {
        Err(Error::AlreadyExists(_)) => Ok(expected.digest.clone()),
        other => other,
    }
}
