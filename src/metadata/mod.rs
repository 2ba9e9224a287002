//! The metadata database: which content, images, leases and snapshots exist in
//! which namespace, with which labels. SQLite in WAL mode at `<root>/meta.db`.
//!
//! All calls block; async callers run them on blocking threads. One connection
//! serialises writers, and `gc_lock` keeps garbage collection from running
//! between a blob's rename into place and the row that records it.

pub mod content;
pub mod gc;
pub mod images;
pub mod leases;
mod schema;

use crate::content::local::LocalStore;
use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use content::ContentStore;

pub type Labels = BTreeMap<String, String>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Namespace the CRI service uses, as in containerd.
pub const NAMESPACE_CRI: &str = "k8s.io";
/// Namespace of the command line.
pub const NAMESPACE_DEFAULT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    #[error("metadata database: {}", describe_db_error(.0))]
    Database(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "metadata database {path}: schema version {found} is newer than this hoist knows ({known})"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

pub struct Db {
    conn: Mutex<Connection>,
    gc_lock: RwLock<()>,
    content: LocalStore,
    root: PathBuf,
    watcher: std::sync::OnceLock<Watcher>,
}

/// A change made through this `Db`, as its [`Watcher`] hears of it.
#[derive(Debug, Clone)]
pub enum Change {
    ImageCreated {
        namespace: String,
        name: String,
        target: crate::digest::Digest,
    },
    ImageUpdated {
        namespace: String,
        name: String,
        target: crate::digest::Digest,
    },
    ImageRemoved {
        namespace: String,
        name: String,
    },
    Collected(gc::GcReport),
}

/// Called after each change is committed, on the thread that made it: the
/// daemon's event bus, which must not block.
pub type Watcher = Box<dyn Fn(Change) + Send + Sync>;

impl Db {
    /// Opens the database and content store under `root`, migrating the schema.
    pub fn open(root: &Path) -> Result<Arc<Db>> {
        let io = |context: String| move |source| Error::Io { context, source };
        crate::root::prepare_root(root).map_err(io(format!("preparing {}", root.display())))?;
        let content = LocalStore::open(root.join("content"))?;
        let path = root.join("meta.db");
        // SQLite creates its -wal and -shm files with the database's mode, so
        // the database exists 0600 before SQLite first opens it.
        crate::root::private_file(&path, crate::root::PRIVATE_FILE_MODE)
            .map_err(io(format!("creating {}", path.display())))?;
        for suffix in ["-wal", "-shm"] {
            let side = root.join(format!("meta.db{suffix}"));
            crate::root::tighten(&side, crate::root::PRIVATE_FILE_MODE)
                .map_err(io(format!("securing {}", side.display())))?;
        }
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Turning a new database to WAL needs it alone, and SQLite answers
        // "busy" at once, without waiting, while another process opening
        // the same new root does the same: take turns.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                done => break done?,
            }
        }
        // FULL: a committed row survives power loss, so it never outlives the
        // files it describes in the other direction either.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrate(&mut conn, &path)?;
        Ok(Arc::new(Db {
            conn: Mutex::new(conn),
            gc_lock: RwLock::new(()),
            content,
            root: root.to_path_buf(),
            watcher: std::sync::OnceLock::new(),
        }))
    }

    /// Tells `watcher` of every change from now on (one watcher per `Db`;
    /// false when one is set already).
    pub fn watch(&self, watcher: Watcher) -> bool {
        self.watcher.set(watcher).is_ok()
    }

    pub(crate) fn notify(&self, change: impl FnOnce() -> Change) {
        if let Some(w) = self.watcher.get() {
            w(change());
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The bytes underneath every namespace's content store.
    pub fn local_content(&self) -> &LocalStore {
        &self.content
    }

    /// The content store of one namespace; writes are not held by any lease.
    pub fn content_store(self: &Arc<Self>, namespace: &str) -> ContentStore {
        ContentStore::new(self.clone(), namespace, None)
    }

    /// Runs `f` inside one transaction. It takes the write lock when it
    /// begins (IMMEDIATE), so another process writing the same root makes it
    /// wait out the busy timeout; a deferred one would fail at once with
    /// "database is locked" when it tried to write after the other's commit.
    pub(crate) fn transaction<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Holds off garbage collection while an operation makes new objects visible.
    pub(crate) fn mutation_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.gc_lock.read()
    }

    /// What garbage collection holds while it runs: no operation in this
    /// process makes objects visible meanwhile (`hoist check --repair`).
    pub(crate) fn collection_guard(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.gc_lock.write()
    }
}

/// A database error as a message, a full disk said as one: SQLite calls
/// it "database or disk is full".
pub fn describe_db_error(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            format!("No space left on device writing meta.db ({e})")
        }
        _ => e.to_string(),
    }
}

pub fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

/// The labels tables share one shape: (namespace, owner, key, value).
pub(crate) fn load_labels(
    conn: &Connection,
    table: &str,
    namespace: &str,
    owner: &str,
) -> rusqlite::Result<Labels> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT key, value FROM {table} WHERE namespace = ?1 AND owner = ?2"
    ))?;
    stmt.query_map(params![namespace, owner], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// Every label of every owner in `namespace` (`None`: all namespaces), keyed
/// by (namespace, owner): one query instead of one per object.
pub(crate) fn load_all_labels(
    conn: &Connection,
    table: &str,
    namespace: Option<&str>,
) -> rusqlite::Result<BTreeMap<(String, String), Labels>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT namespace, owner, key, value FROM {table} WHERE ?1 IS NULL OR namespace = ?1"
    ))?;
    let mut out: BTreeMap<(String, String), Labels> = BTreeMap::new();
    let rows = stmt.query_map(params![namespace], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get(2)?,
            r.get(3)?,
        ))
    })?;
    for row in rows {
        let (ns, owner, k, v) = row?;
        out.entry((ns, owner)).or_default().insert(k, v);
    }
    Ok(out)
}

pub(crate) fn replace_labels(
    conn: &Connection,
    table: &str,
    namespace: &str,
    owner: &str,
    labels: &Labels,
) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "DELETE FROM {table} WHERE namespace = ?1 AND owner = ?2"
    ))?
    .execute(params![namespace, owner])?;
    let mut insert = conn.prepare_cached(&format!(
        "INSERT INTO {table} (namespace, owner, key, value) VALUES (?1, ?2, ?3, ?4)"
    ))?;
    for (k, v) in labels {
        insert.execute(params![namespace, owner, k, v])?;
    }
    Ok(())
}

pub(crate) fn exists(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row(args, |_| Ok(()))
        .optional()?
        .is_some())
}
