//! A namespace's view of the content store: rows in `content` say which blobs
//! the namespace has and with which labels; the bytes live in the shared
//! [`LocalStore`](crate::content::local::LocalStore). Blobs are shared between
//! namespaces, as with containerd's "shared" content policy.

use super::leases::{Resource, add_resource_tx, remove_resource_tx};
use super::{Db, exists, from_nanos, load_all_labels, load_labels, replace_labels, to_nanos};
use crate::content::{
    Blob, Error, Info, Labels, Result, Status, Store, Writer, apply_label_update,
};
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::filters::Filter;
use rusqlite::{Connection, OptionalExtension, params};
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Clone)]
pub struct ContentStore {
    db: Arc<Db>,
    namespace: String,
    lease: Option<String>,
}

impl ContentStore {
    pub(super) fn new(db: Arc<Db>, namespace: &str, lease: Option<String>) -> Self {
        ContentStore {
            db,
            namespace: namespace.to_string(),
            lease,
        }
    }

    /// The same store, with every new ingest and blob held by `lease`.
    pub fn with_lease(&self, lease: &str) -> Self {
        ContentStore::new(self.db.clone(), &self.namespace, Some(lease.to_string()))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A nameless scratch file beside the ingests (see
    /// [`crate::content::local::LocalStore::spool`]).
    pub fn spool(&self) -> io::Result<std::fs::File> {
        self.db.local_content().spool()
    }

    pub fn spool_dir(&self) -> std::path::PathBuf {
        self.db.local_content().spool_dir()
    }

    /// Ingest refs are namespaced on disk, so two namespaces never share one.
    fn backend_ref(&self, reference: &str) -> String {
        format!("{}/{}", self.namespace, reference)
    }

    fn strip(&self, mut status: Status) -> Option<Status> {
        let prefix = format!("{}/", self.namespace);
        status.reference = status.reference.strip_prefix(&prefix)?.to_string();
        Some(status)
    }

    fn hold(&self, conn: &Connection, resource: Resource) -> rusqlite::Result<()> {
        match &self.lease {
            Some(lease) => add_resource_tx(conn, &self.namespace, lease, &resource),
            None => Ok(()),
        }
    }

    /// Records `digest` in this namespace; `Ok(false)` when it already was.
    pub(crate) fn record(&self, digest: &Digest, size: u64, labels: &Labels) -> Result<bool> {
        self.db.transaction(|tx| {
            let ns = &self.namespace;
            let key = digest.to_string();
            self.hold(tx, Resource::content(digest))?;
            if has_row(tx, ns, &key)? {
                return Ok(false);
            }
            let now = to_nanos(SystemTime::now());
            tx.prepare_cached(
                "INSERT INTO content (namespace, digest, size, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
            )?
            .execute(params![ns, key, size as i64, now])?;
            replace_labels(tx, "content_labels", ns, &key, labels)?;
            crate::failpoint!("content-row");
            Ok(true)
        })
    }
}

fn has_row(conn: &Connection, namespace: &str, digest: &str) -> rusqlite::Result<bool> {
    exists(
        conn,
        "SELECT 1 FROM content WHERE namespace = ?1 AND digest = ?2",
        params![namespace, digest],
    )
}

fn info_row(conn: &Connection, namespace: &str, digest: &Digest) -> Result<Info> {
    let key = digest.to_string();
    let row = conn
        .prepare_cached(
            "SELECT size, created_at, updated_at FROM content WHERE namespace = ?1 AND digest = ?2",
        )?
        .query_row(params![namespace, key], |r| {
            Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((size, created, updated)) = row else {
        return Err(Error::NotFound(key));
    };
    Ok(Info {
        digest: digest.clone(),
        size: size as u64,
        created_at: from_nanos(created),
        updated_at: from_nanos(updated),
        labels: load_labels(conn, "content_labels", namespace, &key)?,
    })
}

impl Store for ContentStore {
    fn info(&self, digest: &Digest) -> Result<Info> {
        self.db
            .transaction(|tx| info_row(tx, &self.namespace, digest))
    }

    fn update(&self, info: Info, fieldpaths: &[&str]) -> Result<Info> {
        self.db.transaction(|tx| {
            let mut current = info_row(tx, &self.namespace, &info.digest)?;
            apply_label_update(&mut current.labels, info.labels, fieldpaths)?;
            current.updated_at = SystemTime::now();
            let key = current.digest.to_string();
            tx.prepare_cached(
                "UPDATE content SET updated_at = ?3 WHERE namespace = ?1 AND digest = ?2",
            )?
            .execute(params![self.namespace, key, to_nanos(current.updated_at)])?;
            replace_labels(tx, "content_labels", &self.namespace, &key, &current.labels)?;
            Ok(current)
        })
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        let infos = self.db.transaction(|tx| -> Result<Vec<Info>> {
            let mut labels = load_all_labels(tx, "content_labels", Some(&self.namespace))?;
            let mut stmt = tx.prepare_cached(
                "SELECT digest, size, created_at, updated_at FROM content WHERE namespace = ?1",
            )?;
            let rows = stmt.query_map(params![self.namespace], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (key, size, created, updated) = row?;
                let Ok(digest) = key.parse::<Digest>() else {
                    tracing::warn!(digest = %key, "skipping a content row with a malformed digest");
                    continue;
                };
                out.push(Info {
                    labels: labels
                        .remove(&(self.namespace.clone(), key))
                        .unwrap_or_default(),
                    digest,
                    size: size as u64,
                    created_at: from_nanos(created),
                    updated_at: from_nanos(updated),
                });
            }
            Ok(out)
        })?;
        // The callback runs outside the transaction, so it may use the store.
        for info in infos.into_iter().filter(|i| filter.matches(i)) {
            f(info)?;
        }
        Ok(())
    }

    fn delete(&self, digest: &Digest) -> Result<()> {
        let _guard = self.db.mutation_guard();
        let key = digest.to_string();
        let shared = self.db.transaction(|tx| -> Result<bool> {
            let n = tx
                .prepare_cached("DELETE FROM content WHERE namespace = ?1 AND digest = ?2")?
                .execute(params![self.namespace, key])?;
            if n == 0 {
                return Err(Error::NotFound(key.clone()));
            }
            Ok(exists(
                tx,
                "SELECT 1 FROM content WHERE digest = ?1",
                params![key],
            )?)
        })?;
        if !shared {
            self.db.content.delete_blob(digest)?;
        }
        Ok(())
    }

    fn reader_at(&self, digest: &Digest) -> Result<Blob> {
        self.info(digest)?;
        self.db.content.reader_at(digest)
    }

    fn writer(&self, reference: &str, expected: Option<&Descriptor>) -> Result<Box<dyn Writer>> {
        if let Some(desc) = expected {
            let _guard = self.db.mutation_guard();
            if self.db.content.blob_size(&desc.digest)? == Some(desc.size) {
                // Shared with another namespace (or left by a crash before its
                // row was written): take it into this namespace as it is.
                self.record(&desc.digest, desc.size, &Labels::new())?;
                return Err(Error::AlreadyExists(desc.digest.to_string()));
            }
        }
        let backend = self.backend_ref(reference);
        // Until the writer holds its lock, only the lease entry keeps GC
        // from sweeping the ingest; both happen before GC can look.
        let _guard = self.db.mutation_guard();
        if let Some(lease) = &self.lease {
            self.db.transaction(|tx| {
                add_resource_tx(tx, &self.namespace, lease, &Resource::ingest(reference))
            })?;
        }
        let inner = match (self.db.content.writer(&backend, expected), expected) {
            (Ok(w), _) => w,
            // Another namespace committed the blob since the check above:
            // it is taken in as there, or this namespace would never know it.
            (Err(Error::AlreadyExists(d)), Some(desc))
                if self.db.content.blob_size(&desc.digest)? == Some(desc.size) =>
            {
                self.record(&desc.digest, desc.size, &Labels::new())?;
                return Err(Error::AlreadyExists(d));
            }
            (Err(e), _) => return Err(e),
        };
        Ok(Box::new(NamespacedWriter {
            inner,
            store: self.clone(),
            reference: reference.to_string(),
        }))
    }

    fn status(&self, reference: &str) -> Result<Status> {
        let status = self.db.content.status(&self.backend_ref(reference))?;
        self.strip(status)
            .ok_or_else(|| Error::NotFound(format!("ingest {reference:?}")))
    }

    fn list_statuses(&self, filter: &Filter) -> Result<Vec<Status>> {
        Ok(self
            .db
            .content
            .list_statuses(&Filter::default())?
            .into_iter()
            .filter_map(|s| self.strip(s))
            .filter(|s| filter.matches(s))
            .collect())
    }

    fn abort(&self, reference: &str) -> Result<()> {
        self.db.content.abort(&self.backend_ref(reference))?;
        if let Some(lease) = &self.lease {
            self.db.transaction(|tx| {
                remove_resource_tx(tx, &self.namespace, lease, &Resource::ingest(reference))
            })?;
        }
        Ok(())
    }
}

struct NamespacedWriter {
    inner: Box<dyn Writer>,
    store: ContentStore,
    reference: String,
}

impl io::Write for NamespacedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Writer for NamespacedWriter {
    fn status(&self) -> Result<Status> {
        let mut status = self.inner.status()?;
        status.reference = self.reference.clone();
        Ok(status)
    }

    fn digest(&self) -> Digest {
        self.inner.digest()
    }

    fn truncate(&mut self, size: u64) -> Result<()> {
        self.inner.truncate(size)
    }

    fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<&Digest>,
        labels: Labels,
    ) -> Result<Digest> {
        let store = self.store;
        let reference = self.reference;
        let _guard = store.db.mutation_guard();
        let written = self.inner.status()?.offset;
        let actual = self.inner.digest();
        // Labels live in the database; the local store need not hold them.
        match self.inner.commit(size, expected, Labels::new()) {
            Ok(_) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        let created = store.record(&actual, written, &labels)?;
        if let Some(lease) = &store.lease {
            store.db.transaction(|tx| {
                remove_resource_tx(tx, &store.namespace, lease, &Resource::ingest(&reference))
            })?;
        }
        if created {
            Ok(actual)
        } else {
            Err(Error::AlreadyExists(actual.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::NAMESPACE_DEFAULT;
    use std::io::Write;

    crate::content_store_conformance!(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let db = crate::metadata::Db::open(&root).unwrap();
        crate::content::testsuite::Harness {
            store: Box::new(db.content_store(crate::metadata::NAMESPACE_DEFAULT)),
            reopen: Box::new(move || {
                Box::new(
                    crate::metadata::Db::open(&root)
                        .unwrap()
                        .content_store(crate::metadata::NAMESPACE_DEFAULT),
                )
            }),
            guard: Box::new(dir),
        }
    });

    #[test]
    fn namespaces_share_bytes_not_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let a = db.content_store(NAMESPACE_DEFAULT);
        let b = db.content_store("k8s.io");
        let data = b"shared layer";
        let desc = Descriptor::new("x", Digest::of(data), data.len() as u64);
        let mut w = a.writer("w", Some(&desc)).unwrap();
        w.write_all(data).unwrap();
        w.commit(desc.size, None, Labels::new()).unwrap();
        assert!(matches!(b.info(&desc.digest), Err(Error::NotFound(_))));
        assert!(matches!(b.reader_at(&desc.digest), Err(Error::NotFound(_))));
        // Asking for it in the second namespace adopts the existing bytes.
        assert!(matches!(
            b.writer("w", Some(&desc)),
            Err(Error::AlreadyExists(_))
        ));
        assert_eq!(b.info(&desc.digest).unwrap().size, desc.size);
        // Deleting from one namespace keeps the bytes for the other.
        a.delete(&desc.digest).unwrap();
        assert!(b.reader_at(&desc.digest).is_ok());
        b.delete(&desc.digest).unwrap();
        assert_eq!(db.local_content().blob_size(&desc.digest).unwrap(), None);
    }

    /// Two namespaces writing one blob at once: whichever loses the race
    /// still has the blob recorded once its write returns.
    #[test]
    fn a_blob_written_in_two_namespaces_at_once_is_in_both() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        // Under leases, as pulls write: the lease's row widens the window.
        for ns in [NAMESPACE_DEFAULT, "k8s.io"] {
            db.create_lease(ns, "pull", Labels::new()).unwrap();
        }
        for round in 0..200u32 {
            let data = format!("manifest {round}").into_bytes();
            let desc = Descriptor::new("x", Digest::of(&data), data.len() as u64);
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let writers: Vec<_> = [NAMESPACE_DEFAULT, "k8s.io"]
                .into_iter()
                .map(|ns| {
                    let store = db.content_store(ns).with_lease("pull");
                    let (desc, data) = (desc.clone(), data.clone());
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        crate::content::write_blob(&store, "m", &data[..], &desc, Labels::new())
                            .and_then(|_| store.info(&desc.digest))
                            .map(|info| info.size)
                    })
                })
                .collect();
            for w in writers {
                assert_eq!(w.join().unwrap().unwrap(), desc.size, "round {round}");
            }
        }
    }

    #[test]
    fn ingests_are_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let a = db.content_store(NAMESPACE_DEFAULT);
        let b = db.content_store("k8s.io");
        let _wa = a.writer("same-ref", None).unwrap();
        let _wb = b.writer("same-ref", None).unwrap();
        assert_eq!(a.list_statuses(&Filter::default()).unwrap().len(), 1);
        assert_eq!(b.status("same-ref").unwrap().reference, "same-ref");
    }
}
