//! The bytes of the content store, on disk:
//!
//! ```text
//! blobs/sha256/<hex>        committed, read-only
//! ingest/<sha256(ref)>/     data, ref, total, startedat of an unfinished write
//! ```
//!
//! An ingest's `data` file is `flock`ed by its writer, which is what makes a
//! second writer (in this process or another) fail with [`Error::Locked`].
//! Labels kept here live in memory only: persistent labels are the metadata
//! database's job.

use super::{
    Blob, Error, Info, IoContext, Labels, Result, Status, Store, Writer, apply_label_update,
};
use crate::descriptor::Descriptor;
use crate::digest::{Digest, Digester};
use crate::filters::Filter;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type LabelMap = Arc<Mutex<HashMap<Digest, (Labels, SystemTime)>>>;

pub struct LocalStore {
    root: PathBuf,
    labels: LabelMap,
}

/// One ingest found on disk.
#[derive(Debug, Clone)]
pub struct IngestEntry {
    pub reference: String,
    pub dir: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        // Blobs are private layers: nobody but hoist reads them.
        crate::root::private_dir(&root, crate::root::PRIVATE_DIR_MODE)
            .context(|| format!("creating {}", root.display()))?;
        for dir in [root.join("blobs/sha256"), root.join("ingest")] {
            fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        }
        Ok(LocalStore {
            root,
            labels: LabelMap::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A scratch file on the store's filesystem, without a name (so no
    /// listing ever sees it, and nothing is left of it after a crash): the
    /// place for bytes that wait their turn, not in memory.
    pub fn spool(&self) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(self.spool_dir())
    }

    /// Where [`LocalStore::spool`] files are.
    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn ingest_dir(&self, reference: &str) -> PathBuf {
        self.root
            .join("ingest")
            .join(Digest::of(reference.as_bytes()).hex())
    }

    /// Size of a committed blob, or `None` when it is absent.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(|| format!("stat {}", path.display())),
        }
    }

    /// Every committed blob with its size.
    pub fn blobs(&self) -> Result<Vec<(Digest, u64)>> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            // Anything that is not a digest-named file is not ours to report.
            let Some(digest) = name.to_str().and_then(|n| Digest::from_hex(n).ok()) else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Collected since the listing: no longer there to report.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).context(|| format!("stat {}", entry.path().display())),
            };
            out.push((digest, meta.len()));
        }
        Ok(out)
    }

    /// Removes a blob's bytes; returns the bytes freed (0 when already gone).
    pub fn delete_blob(&self, digest: &Digest) -> Result<u64> {
        self.labels.lock().remove(digest);
        let path = self.blob_path(digest);
        let size = self.blob_size(digest)?.unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e).context(|| format!("removing {}", path.display())),
        }
    }

    /// Every ingest on disk, whether or not a writer holds it.
    pub fn ingests(&self) -> Result<Vec<IngestEntry>> {
        let dir = self.root.join("ingest");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            match fs::read_to_string(path.join("ref")) {
                Ok(reference) => out.push(IngestEntry {
                    reference,
                    dir: path,
                }),
                // A crash between mkdir and writing `ref` leaves a nameless
                // ingest; report it under its directory name so GC removes it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => out.push(IngestEntry {
                    reference: String::new(),
                    dir: path,
                }),
                Err(e) => return Err(e).context(|| format!("reading {}/ref", path.display())),
            }
        }
        Ok(out)
    }

    /// Removes an ingest unless a writer holds it; returns whether it was removed.
    pub fn remove_ingest_if_unlocked(&self, ingest: &IngestEntry) -> Result<bool> {
        match OpenOptions::new().read(true).open(ingest.dir.join("data")) {
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(_held) => {
                    remove_dir(&ingest.dir)?;
                    Ok(true)
                }
                Err((_, Errno::EWOULDBLOCK)) => Ok(false),
                Err((_, errno)) => Err(io::Error::from(errno))
                    .context(|| format!("locking {}/data", ingest.dir.display())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                remove_dir(&ingest.dir)?;
                Ok(true)
            }
            Err(e) => Err(e).context(|| format!("opening {}/data", ingest.dir.display())),
        }
    }

    fn status_of(&self, reference: &str) -> Result<Status> {
        let dir = self.ingest_dir(reference);
        let data = dir.join("data");
        let meta = match fs::metadata(&data) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("ingest {reference:?}")));
            }
            Err(e) => return Err(e).context(|| format!("stat {}", data.display())),
        };
        Ok(Status {
            reference: reference.to_string(),
            offset: meta.len(),
            total: read_u64(&dir.join("total"))?.unwrap_or(0),
            expected: fs::read_to_string(dir.join("expected"))
                .ok()
                .and_then(|s| s.parse().ok()),
            started_at: read_time(&dir.join("startedat"))?.unwrap_or(UNIX_EPOCH),
            updated_at: meta.modified().unwrap_or(UNIX_EPOCH),
        })
    }
}

impl Store for LocalStore {
    fn info(&self, digest: &Digest) -> Result<Info> {
        let path = self.blob_path(digest);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(digest.to_string()));
            }
            Err(e) => return Err(e).context(|| format!("stat {}", path.display())),
        };
        let created_at = meta.modified().unwrap_or(UNIX_EPOCH);
        let (labels, updated_at) = self
            .labels
            .lock()
            .get(digest)
            .cloned()
            .unwrap_or((Labels::new(), created_at));
        Ok(Info {
            digest: digest.clone(),
            size: meta.len(),
            created_at,
            updated_at,
            labels,
        })
    }

    fn update(&self, info: Info, fieldpaths: &[&str]) -> Result<Info> {
        let mut current = self.info(&info.digest)?;
        apply_label_update(&mut current.labels, info.labels, fieldpaths)?;
        current.updated_at = SystemTime::now();
        self.labels.lock().insert(
            current.digest.clone(),
            (current.labels.clone(), current.updated_at),
        );
        Ok(current)
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        for (digest, _) in self.blobs()? {
            let info = match self.info(&digest) {
                Ok(info) => info,
                // Deleted while walking.
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if filter.matches(&info) {
                f(info)?;
            }
        }
        Ok(())
    }

    fn delete(&self, digest: &Digest) -> Result<()> {
        if self.blob_size(digest)?.is_none() {
            return Err(Error::NotFound(digest.to_string()));
        }
        self.delete_blob(digest).map(drop)
    }

    fn reader_at(&self, digest: &Digest) -> Result<Blob> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(digest.to_string()));
            }
            Err(e) => return Err(e).context(|| format!("opening {}", path.display())),
        };
        let size = file
            .metadata()
            .context(|| format!("stat {}", path.display()))?
            .len();
        Ok(Blob::new(file, size))
    }

    fn writer(&self, reference: &str, expected: Option<&Descriptor>) -> Result<Box<dyn Writer>> {
        Ok(Box::new(LocalWriter::open(self, reference, expected)?))
    }

    fn status(&self, reference: &str) -> Result<Status> {
        self.status_of(reference)
    }

    fn list_statuses(&self, filter: &Filter) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for ingest in self.ingests()? {
            match self.status_of(&ingest.reference) {
                Ok(s) if filter.matches(&s) => out.push(s),
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn abort(&self, reference: &str) -> Result<()> {
        let dir = self.ingest_dir(reference);
        if !dir.exists() {
            return Err(Error::NotFound(format!("ingest {reference:?}")));
        }
        let entry = IngestEntry {
            reference: reference.to_string(),
            dir,
        };
        if self.remove_ingest_if_unlocked(&entry)? {
            Ok(())
        } else {
            Err(Error::Locked(reference.to_string()))
        }
    }
}

/// A writer into `ingest/<key>/data`, holding its `flock` while open.
pub struct LocalWriter {
    reference: String,
    dir: PathBuf,
    blob_dir: PathBuf,
    data: Flock<File>,
    digester: Digester,
    offset: u64,
    total: u64,
    expected: Option<Digest>,
    started_at: SystemTime,
    labels: LabelMap,
}

impl LocalWriter {
    fn open(store: &LocalStore, reference: &str, expected: Option<&Descriptor>) -> Result<Self> {
        if reference.is_empty() {
            return Err(Error::InvalidArgument("an ingest needs a ref".to_string()));
        }
        if let Some(desc) = expected
            && store.blob_size(&desc.digest)?.is_some()
        {
            return Err(Error::AlreadyExists(desc.digest.to_string()));
        }
        let dir = store.ingest_dir(reference);
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let data_path = dir.join("data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .context(|| format!("opening {}", data_path.display()))?;
        let mut data = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Err(Error::Locked(reference.to_string())),
            Err((_, errno)) => {
                return Err(io::Error::from(errno))
                    .context(|| format!("locking {}", data_path.display()));
            }
        };
        write_file(&dir.join("ref"), reference.as_bytes())?;
        let started_at = match read_time(&dir.join("startedat"))? {
            Some(t) => t,
            None => {
                let now = SystemTime::now();
                write_file(
                    &dir.join("startedat"),
                    &unix_nanos(now).to_string().into_bytes(),
                )?;
                now
            }
        };
        let mut total = read_u64(&dir.join("total"))?.unwrap_or(0);
        let mut expected_digest = None;
        if let Some(desc) = expected {
            total = desc.size;
            expected_digest = Some(desc.digest.clone());
            write_file(&dir.join("total"), total.to_string().as_bytes())?;
            write_file(&dir.join("expected"), desc.digest.to_string().as_bytes())?;
        }
        // Resume: rehash whatever is on disk, which may have been cut or grown
        // behind our back; the digest check at commit catches anything else.
        let mut digester = Digester::new();
        let mut offset = hash_prefix(&mut data, u64::MAX, &mut digester)
            .context(|| format!("rehashing {}", data_path.display()))?;
        if total > 0 && offset > total {
            data.set_len(0)
                .context(|| format!("truncating {}", data_path.display()))?;
            digester = Digester::new();
            offset = 0;
        }
        data.seek(SeekFrom::Start(offset))
            .context(|| format!("seeking {}", data_path.display()))?;
        Ok(LocalWriter {
            reference: reference.to_string(),
            dir,
            blob_dir: store.root.join("blobs/sha256"),
            data,
            digester,
            offset,
            total,
            expected: expected_digest,
            started_at,
            labels: store.labels.clone(),
        })
    }

    fn discard(&self) {
        if let Err(e) = remove_dir(&self.dir) {
            tracing::warn!(reference = %self.reference, error = %e, "could not discard ingest");
        }
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::failpoint!("ingest-write");
        // Callers name the ingest; only the writer knows the file, which a
        // full disk's error must name. The kind (StorageFull) is kept.
        let n = self.data.write(buf).map_err(|e| {
            let path = self.dir.join("data");
            io::Error::new(e.kind(), format!("{}: {e}", path.display()))
        })?;
        self.digester.update(&buf[..n]);
        self.offset += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.data.flush()
    }
}

impl Writer for LocalWriter {
    fn status(&self) -> Result<Status> {
        Ok(Status {
            reference: self.reference.clone(),
            offset: self.offset,
            total: self.total,
            expected: self.expected.clone(),
            started_at: self.started_at,
            updated_at: SystemTime::now(),
        })
    }

    fn digest(&self) -> Digest {
        self.digester.current()
    }

    fn truncate(&mut self, size: u64) -> Result<()> {
        if size > self.offset {
            return Err(Error::InvalidArgument(format!(
                "cannot truncate ingest {:?} to {size} bytes: it holds {}",
                self.reference, self.offset
            )));
        }
        let path = self.dir.join("data");
        self.data
            .set_len(size)
            .context(|| format!("truncating {}", path.display()))?;
        self.digester = Digester::new();
        self.offset = hash_prefix(&mut self.data, size, &mut self.digester)
            .context(|| format!("rehashing {}", path.display()))?;
        self.data
            .seek(SeekFrom::Start(self.offset))
            .context(|| format!("seeking {}", path.display()))?;
        Ok(())
    }

    fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<&Digest>,
        labels: Labels,
    ) -> Result<Digest> {
        let data_path = self.dir.join("data");
        crate::failpoint!("ingest-fsync");
        self.data
            .sync_all()
            .context(|| format!("syncing {}", data_path.display()))?;
        if size > 0 && size != self.offset {
            self.discard();
            return Err(Error::SizeMismatch {
                what: format!("ingest {:?}", self.reference),
                expected: size,
                actual: self.offset,
            });
        }
        let actual = self.digester.current();
        if let Some(want) = expected.or(self.expected.as_ref())
            && *want != actual
        {
            self.discard();
            return Err(Error::DigestMismatch {
                reference: self.reference.clone(),
                expected: want.clone(),
                actual,
            });
        }
        let target = self.blob_dir.join(actual.hex());
        if target.exists() {
            self.discard();
            return Err(Error::AlreadyExists(actual.to_string()));
        }
        fs::set_permissions(&data_path, fs::Permissions::from_mode(0o444))
            .context(|| format!("chmod {}", data_path.display()))?;
        fs::rename(&data_path, &target)
            .context(|| format!("renaming {} to {}", data_path.display(), target.display()))?;
        crate::failpoint!("ingest-rename");
        sync_dir(&self.blob_dir)?;
        self.discard();
        if !labels.is_empty() {
            self.labels
                .lock()
                .insert(actual.clone(), (labels, SystemTime::now()));
        }
        Ok(actual)
    }
}

/// Hashes the first `limit` bytes of `file` into `digester`; returns how many there were.
fn hash_prefix(file: &mut File, limit: u64, digester: &mut Digester) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    let mut reader = file.take(limit);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(done);
        }
        digester.update(&buf[..n]);
        done += n as u64;
    }
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    fs::write(path, contents).context(|| format!("writing {}", path.display()))
}

fn read_u64(path: &Path) -> Result<Option<u64>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context(|| format!("reading {}", path.display())),
    }
}

fn read_time(path: &Path) -> Result<Option<SystemTime>> {
    Ok(read_u64(path)?.map(|n| UNIX_EPOCH + Duration::from_nanos(n)))
}

pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context(|| format!("removing {}", dir.display())),
    }
}

/// Makes a rename inside `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("content")).unwrap();
        (dir, store)
    }

    crate::content_store_conformance!(|| {
        let (dir, store) = store();
        let reopen_root = store.root().to_path_buf();
        crate::content::testsuite::Harness {
            store: Box::new(store),
            reopen: Box::new(move || Box::new(LocalStore::open(&reopen_root).unwrap())),
            guard: Box::new(dir),
        }
    });

    #[test]
    fn ingest_extended_behind_our_back_restarts() {
        let (_dir, store) = store();
        let desc = Descriptor::new("x", Digest::of(b"hello"), 5);
        let mut w = store.writer("r", Some(&desc)).unwrap();
        w.write_all(b"hel").unwrap();
        drop(w);
        let data = store.ingest_dir("r").join("data");
        fs::write(&data, b"hello world, too long").unwrap();
        let w = store.writer("r", Some(&desc)).unwrap();
        assert_eq!(w.status().unwrap().offset, 0);
    }
}
