//! Snapshot records in SQLite, over a [`Backend`] that keeps the trees.
//!
//! Every snapshot lives in `<root>/<id>/` where `id` is its row id: a new one
//! is built in `new-<id>` and renamed into place, a removed one is renamed to
//! `removing-<id>` before it is deleted, so a crash leaves either a whole
//! snapshot or a directory GC recognises as garbage.

use super::usage::disk_usage;
use super::{Backend, Error, Info, Kind, Result, Snapshotter, Usage, io_err};
use crate::content::apply_label_update;
use crate::filters::Filter;
use crate::metadata::gc::{SnapshotCollector, SnapshotNode};
use crate::metadata::leases::{Resource, add_resource_tx, remove_resource_tx};
use crate::metadata::{
    Db, Labels, from_nanos, load_all_labels, load_labels, replace_labels, to_nanos,
};
use crate::mount::Mount;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// One snapshotter's directory and records, shared by every namespace.
pub struct SnapshotRoot {
    db: Arc<Db>,
    backend: Box<dyn Backend>,
    root: PathBuf,
}

/// One namespace's snapshots, optionally held by a lease.
#[derive(Clone)]
pub struct Snapshots {
    root: Arc<SnapshotRoot>,
    namespace: String,
    lease: Option<String>,
}

/// A snapshot record as stored, its kind unparsed: what `hoist check`
/// holds against the directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: i64,
    pub namespace: String,
    pub key: String,
    pub parent: Option<String>,
    pub kind: String,
}

#[derive(Debug, Clone)]
struct Row {
    id: i64,
    key: String,
    parent: Option<String>,
    kind: Kind,
    created_at: i64,
    updated_at: i64,
    size: i64,
    inodes: i64,
}

const COLUMNS: &str = "id, key, parent, kind, created_at, updated_at, size, inodes";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let kind: String = r.get(3)?;
    Ok(Row {
        id: r.get(0)?,
        key: r.get(1)?,
        parent: r.get(2)?,
        kind: Kind::parse(&kind).unwrap_or(Kind::Committed),
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        size: r.get(6)?,
        inodes: r.get(7)?,
    })
}

impl SnapshotRoot {
    pub fn new(db: Arc<Db>, backend: Box<dyn Backend>) -> Result<Arc<Self>> {
        let snapshots = db.root().join("snapshots");
        let root = snapshots.join(backend.name());
        super::private_dir(&snapshots)?;
        super::private_dir(&root)?;
        Ok(Arc::new(SnapshotRoot { db, backend, root }))
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn name(&self) -> &'static str {
        self.backend.name()
    }

    /// Whether snapshots here can be built before their parent exists.
    pub fn rebases(&self) -> bool {
        self.backend.rebases()
    }

    pub fn namespace(self: &Arc<Self>, namespace: &str) -> Snapshots {
        Snapshots {
            root: self.clone(),
            namespace: namespace.to_string(),
            lease: None,
        }
    }

    /// The directory of the snapshot whose row id is `id`.
    pub fn dir(&self, id: i64) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Every record of this snapshotter, with its kind as stored, for
    /// `hoist check` to hold against the directories.
    pub fn records(&self) -> Result<Vec<Record>> {
        Ok(self.db.transaction(|tx| {
            tx.prepare(
                "SELECT id, namespace, key, parent, kind FROM snapshots WHERE snapshotter = ?1
                 ORDER BY id",
            )?
            .query_map(params![self.name()], |r| {
                Ok(Record {
                    id: r.get(0)?,
                    namespace: r.get(1)?,
                    key: r.get(2)?,
                    parent: r.get(3)?,
                    kind: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?)
    }

    /// Removes a snapshot that cannot be used (its tree or its parent is
    /// gone), children or not: the caller removes those too, holding off
    /// garbage collection as a repair does.
    pub fn remove_broken(&self, namespace: &str, key: &str) -> Result<u64> {
        self.remove_in(namespace, key, true)
    }

    fn get(&self, conn: &Connection, namespace: &str, key: &str) -> rusqlite::Result<Option<Row>> {
        conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE snapshotter = ?1 AND namespace = ?2 AND key = ?3"
        ))?
        .query_row(params![self.name(), namespace, key], row)
        .optional()
    }

    /// The `fs` directories of `parent` and its ancestors, newest first.
    fn parent_dirs(
        &self,
        conn: &Connection,
        namespace: &str,
        parent: Option<&str>,
    ) -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        let mut next = parent.map(str::to_string);
        while let Some(key) = next {
            let r = self
                .get(conn, namespace, &key)?
                .ok_or_else(|| Error::NotFound(key.clone()))?;
            dirs.push(self.dir(r.id).join("fs"));
            next = r.parent;
        }
        Ok(dirs)
    }

    /// Readies the trees `fs_dirs` (as [`SnapshotRoot::parent_dirs`] gives
    /// them) before they are handed out: mounts a restart took away.
    fn ready(&self, fs_dirs: &[PathBuf]) -> Result<()> {
        for fs in fs_dirs {
            if let Some(dir) = fs.parent() {
                self.backend.ready(dir)?;
            }
        }
        Ok(())
    }

    fn has_children(
        &self,
        conn: &Connection,
        namespace: &str,
        key: &str,
    ) -> rusqlite::Result<bool> {
        crate::metadata::exists(
            conn,
            "SELECT 1 FROM snapshots WHERE snapshotter = ?1 AND namespace = ?2 AND parent = ?3",
            params![self.name(), namespace, key],
        )
    }

    /// Deletes a snapshot's record and tree; returns the bytes freed.
    /// Unless `broken`, a snapshot with children stays.
    fn remove_in(&self, namespace: &str, key: &str, broken: bool) -> Result<u64> {
        let r = self.db.transaction(|tx| -> Result<Row> {
            let r = self
                .get(tx, namespace, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            if !broken && self.has_children(tx, namespace, key)? {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children"
                )));
            }
            tx.execute("DELETE FROM snapshots WHERE id = ?1", params![r.id])?;
            tx.execute(
                "DELETE FROM snapshot_labels WHERE namespace = ?1 AND owner = ?2",
                params![namespace, r.id.to_string()],
            )?;
            Ok(r)
        })?;
        let dir = self.dir(r.id);
        self.backend.release(&dir)?;
        let size = match r.kind {
            Kind::Committed => r.size as u64,
            _ => disk_usage(&dir).map(|u| u.size).unwrap_or(0),
        };
        let doomed = self.root.join(format!("removing-{}", r.id));
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => crate::archive::remove_tree(&doomed)
                .map_err(io_err(format!("removing {}", doomed.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("renaming {}", dir.display()))(e)),
        }
        Ok(size)
    }

    /// What every snapshot uses: recorded for committed ones, measured for
    /// the rest.
    pub fn total_usage(&self) -> Result<Usage> {
        let rows: Vec<Row> = self.db.transaction(|tx| {
            tx.prepare(&format!(
                "SELECT {COLUMNS} FROM snapshots WHERE snapshotter = ?1"
            ))?
            .query_map(params![self.name()], row)?
            .collect::<rusqlite::Result<_>>()
        })?;
        let mut total = Usage::default();
        for r in rows {
            let u = match r.kind {
                Kind::Committed => Usage {
                    size: r.size as u64,
                    inodes: r.inodes as u64,
                },
                _ => disk_usage(&self.dir(r.id).join("fs"))?,
            };
            total.size += u.size;
            total.inodes += u.inodes;
        }
        Ok(total)
    }

    /// Directories no record owns: half-built or half-removed snapshots
    /// from a crash, which garbage collection removes.
    pub fn orphan_dirs(&self) -> Result<Vec<PathBuf>> {
        let ids: std::collections::HashSet<String> = self.db.transaction(|tx| {
            tx.prepare("SELECT id FROM snapshots WHERE snapshotter = ?1")?
                .query_map(params![self.name()], |r| {
                    Ok(r.get::<_, i64>(0)?.to_string())
                })?
                .collect::<rusqlite::Result<_>>()
        })?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .map_err(io_err(format!("listing {}", self.root.display())))?
        {
            let entry = entry.map_err(io_err(format!("listing {}", self.root.display())))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let orphan = name.starts_with("removing-")
                || name.starts_with("new-")
                || (name.chars().all(|c| c.is_ascii_digit()) && !ids.contains(&name));
            if orphan {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the records of snapshots whose tree never got into place:
    /// a crash between a snapshot's row and the rename of its directory
    /// leaves an active snapshot (or view) without one, which its lease
    /// would keep for nothing. Only garbage collection calls this, and no
    /// snapshot is being made meanwhile (making one holds off collection,
    /// in this process and, through the root lock, in others).
    fn sweep_unbuilt(&self) -> Result<()> {
        for r in self.records()? {
            let dir = self.dir(r.id);
            let present = dir
                .try_exists()
                .map_err(io_err(format!("stat {}", dir.display())))?;
            if r.kind != Kind::Committed.as_str() && !present {
                tracing::warn!(key = %r.key, namespace = %r.namespace, "removing a snapshot whose tree a crash left unbuilt");
                self.remove_in(&r.namespace, &r.key, true)?;
            }
        }
        Ok(())
    }

    /// Removes [`SnapshotRoot::orphan_dirs`]; returns the bytes freed.
    fn sweep_orphan_dirs(&self) -> Result<u64> {
        let mut freed = 0;
        for path in self.orphan_dirs()? {
            self.backend.release(&path)?;
            freed += disk_usage(&path).map(|u| u.size).unwrap_or(0);
            crate::archive::remove_tree(&path)
                .map_err(io_err(format!("removing {}", path.display())))?;
        }
        Ok(freed)
    }
}

impl SnapshotCollector for SnapshotRoot {
    fn snapshotter(&self) -> &str {
        self.name()
    }

    fn snapshots(&self) -> crate::metadata::Result<Vec<SnapshotNode>> {
        Ok(self
            .db
            .transaction(|tx| -> rusqlite::Result<Vec<SnapshotNode>> {
                let mut labels = load_all_labels(tx, "snapshot_labels", None)?;
                let mut stmt = tx.prepare(
                    "SELECT id, namespace, key, parent FROM snapshots WHERE snapshotter = ?1",
                )?;
                let rows = stmt.query_map(params![self.name()], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                    ))
                })?;
                let mut out = Vec::new();
                for r in rows {
                    let (id, namespace, key, parent) = r?;
                    out.push(SnapshotNode {
                        labels: labels
                            .remove(&(namespace.clone(), id.to_string()))
                            .unwrap_or_default(),
                        namespace,
                        key,
                        parent,
                    });
                }
                Ok(out)
            })?)
    }

    fn remove(&self, namespace: &str, key: &str) -> crate::metadata::Result<u64> {
        match self.remove_in(namespace, key, false) {
            Ok(freed) => Ok(freed),
            // Removed since the mark (a failed pull cleaning up after itself,
            // in this process or another): what GC wanted is done.
            Err(Error::NotFound(_)) => Ok(0),
            Err(Error::Metadata(m)) => Err(m),
            Err(other) => Err(crate::metadata::Error::FailedPrecondition(
                other.to_string(),
            )),
        }
    }

    fn sweep_leftovers(&self) -> crate::metadata::Result<u64> {
        self.sweep_unbuilt()
            .and_then(|()| self.sweep_orphan_dirs())
            .map_err(|e| crate::metadata::Error::FailedPrecondition(e.to_string()))
    }
}

impl Snapshots {
    /// The namespace these snapshots belong to.
    pub fn namespace_name(&self) -> &str {
        &self.namespace
    }

    /// The same namespace, with every new snapshot held by `lease`.
    pub fn with_lease(&self, lease: &str) -> Self {
        Snapshots {
            lease: Some(lease.to_string()),
            ..self.clone()
        }
    }

    pub fn root(&self) -> &Arc<SnapshotRoot> {
        &self.root
    }

    fn info(&self, conn: &Connection, r: &Row) -> rusqlite::Result<Info> {
        Ok(Info {
            kind: r.kind,
            name: r.key.clone(),
            parent: r.parent.clone(),
            labels: load_labels(conn, "snapshot_labels", &self.namespace, &r.id.to_string())?,
            created_at: from_nanos(r.created_at),
            updated_at: from_nanos(r.updated_at),
        })
    }

    fn must_get(&self, conn: &Connection, key: &str) -> Result<Row> {
        self.root
            .get(conn, &self.namespace, key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }

    fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("a snapshot needs a key".to_string()));
        }
        let root = &self.root;
        let _guard = root.db.mutation_guard();
        let (id, parents) = root.db.transaction(|tx| -> Result<(i64, Vec<PathBuf>)> {
            if root.get(tx, &self.namespace, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            if let Some(p) = parent {
                let pr = root
                    .get(tx, &self.namespace, p)?
                    .ok_or_else(|| Error::NotFound(format!("parent {p}")))?;
                if pr.kind != Kind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "parent {p:?} is not committed"
                    )));
                }
            }
            let parents = root.parent_dirs(tx, &self.namespace, parent)?;
            let now = to_nanos(SystemTime::now());
            tx.execute(
                "INSERT INTO snapshots (snapshotter, namespace, key, parent, kind, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![root.name(), self.namespace, key, parent, kind.as_str(), now],
            )?;
            let id = tx.last_insert_rowid();
            replace_labels(tx, "snapshot_labels", &self.namespace, &id.to_string(), &labels)?;
            if let Some(lease) = &self.lease {
                add_resource_tx(tx, &self.namespace, lease, &Resource::snapshot(root.name(), key))?;
            }
            Ok((id, parents))
        })?;
        let dir = root.dir(id);
        let tmp = root.root.join(format!("new-{id}"));
        let parents_ready = root.ready(&parents);
        let built = parents_ready
            .and_then(|()| super::tree_dir(&tmp, crate::root::PRIVATE_DIR_MODE))
            .and_then(|()| root.backend.create(&tmp, &parents, kind))
            .and_then(|()| {
                std::fs::rename(&tmp, &dir).map_err(io_err(format!("renaming {}", tmp.display())))
            });
        if let Err(e) = built {
            let _ = crate::archive::remove_tree(&tmp);
            root.db
                .transaction(|tx| tx.execute("DELETE FROM snapshots WHERE id = ?1", params![id]))?;
            return Err(e);
        }
        Ok(root.backend.mounts(&dir, &parents, kind))
    }
}

impl Snapshotter for Snapshots {
    fn name(&self) -> &str {
        self.root.name()
    }

    fn stat(&self, key: &str) -> Result<Info> {
        self.root.db.transaction(|tx| {
            let r = self.must_get(tx, key)?;
            Ok(self.info(tx, &r)?)
        })
    }

    fn update(&self, info: Info, fieldpaths: &[&str]) -> Result<Info> {
        self.root.db.transaction(|tx| {
            let r = self.must_get(tx, &info.name)?;
            let mut current = self.info(tx, &r)?;
            apply_label_update(&mut current.labels, info.labels, fieldpaths)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            current.updated_at = SystemTime::now();
            tx.execute(
                "UPDATE snapshots SET updated_at = ?2 WHERE id = ?1",
                params![r.id, to_nanos(current.updated_at)],
            )?;
            replace_labels(
                tx,
                "snapshot_labels",
                &self.namespace,
                &r.id.to_string(),
                &current.labels,
            )?;
            Ok(current)
        })
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let r = self.root.db.transaction(|tx| self.must_get(tx, key))?;
        match r.kind {
            Kind::Committed => Ok(Usage {
                size: r.size as u64,
                inodes: r.inodes as u64,
            }),
            _ => disk_usage(&self.root.dir(r.id).join("fs")),
        }
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (r, parents) = self.root.db.transaction(|tx| -> Result<_> {
            let r = self.must_get(tx, key)?;
            let parents = self
                .root
                .parent_dirs(tx, &self.namespace, r.parent.as_deref())?;
            Ok((r, parents))
        })?;
        let dir = self.root.dir(r.id);
        self.root.ready(&parents)?;
        if r.kind == Kind::Committed {
            self.root.backend.ready(&dir)?;
        }
        Ok(self.root.backend.mounts(&dir, &parents, r.kind))
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        self.create(key, parent, labels, Kind::Active)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        self.create(key, parent, labels, Kind::View)
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.commit_inner(name, key, None, labels)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let _guard = self.root.db.mutation_guard();
        self.root.remove_in(&self.namespace, key, false).map(drop)
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        let infos = self.root.db.transaction(|tx| -> Result<Vec<Info>> {
            let rows: Vec<Row> = tx
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM snapshots WHERE snapshotter = ?1 AND namespace = ?2 ORDER BY id"
                ))?
                .query_map(params![self.root.name(), self.namespace], row)?
                .collect::<rusqlite::Result<_>>()?;
            rows.iter().map(|r| Ok(self.info(tx, r)?)).collect()
        })?;
        for info in infos.into_iter().filter(|i| filter.matches(i)) {
            f(info)?;
        }
        Ok(())
    }

    fn apply_dirs(&self, key: &str) -> Result<(PathBuf, Vec<PathBuf>)> {
        self.root
            .db
            .transaction(|tx| {
                let r = self.must_get(tx, key)?;
                if r.kind != Kind::Active {
                    return Err(Error::FailedPrecondition(format!(
                        "{key:?} is not an active snapshot"
                    )));
                }
                let parents = self
                    .root
                    .parent_dirs(tx, &self.namespace, r.parent.as_deref())?;
                Ok((self.root.dir(r.id).join("fs"), parents))
            })
            .and_then(|(fs, parents)| {
                self.root.ready(&parents)?;
                Ok((fs, parents))
            })
    }
}

impl Snapshots {
    /// Commits a snapshot that was prepared without a parent onto `parent`:
    /// the rebase of a parallel unpack. Only backends whose trees do not
    /// depend on their parents allow it.
    pub fn commit_rebased(
        &self,
        name: &str,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<()> {
        if !self.root.backend.rebases() {
            return Err(Error::FailedPrecondition(format!(
                "the {} snapshotter cannot change a snapshot's parent",
                self.root.name()
            )));
        }
        crate::failpoint!("snapshot-rebase");
        self.commit_inner(name, key, Some(parent), labels)
    }
    /// Commits `key` as `name`; with `rebase`, first sets its parent (which
    /// must be committed) for a snapshot prepared without one.
    fn commit_inner(
        &self,
        name: &str,
        key: &str,
        rebase: Option<Option<&str>>,
        labels: Labels,
    ) -> Result<()> {
        let root = &self.root;
        let _guard = root.db.mutation_guard();
        let r = root.db.transaction(|tx| self.must_get(tx, key))?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "cannot commit {key:?}: it is {}, not Active",
                r.kind.as_str()
            )));
        }
        let usage = root.backend.seal(&root.dir(r.id))?;
        root.db.transaction(|tx| -> Result<()> {
            if root.get(tx, &self.namespace, name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            if let Some(parent) = rebase {
                if let Some(p) = parent {
                    let pr = root
                        .get(tx, &self.namespace, p)?
                        .ok_or_else(|| Error::NotFound(format!("parent {p}")))?;
                    if pr.kind != Kind::Committed {
                        return Err(Error::FailedPrecondition(format!("parent {p:?} is not committed")));
                    }
                }
                tx.execute("UPDATE snapshots SET parent = ?2 WHERE id = ?1", params![r.id, parent])?;
            }
            // A committed snapshot is a new object, as in containerd: it is
            // created (and last updated) now.
            tx.execute(
                "UPDATE snapshots SET key = ?2, kind = 'Committed', size = ?3, inodes = ?4, created_at = ?5, updated_at = ?5
                 WHERE id = ?1",
                params![r.id, name, usage.size as i64, usage.inodes as i64, to_nanos(SystemTime::now())],
            )?;
            if !labels.is_empty() {
                replace_labels(tx, "snapshot_labels", &self.namespace, &r.id.to_string(), &labels)?;
            }
            if let Some(lease) = &self.lease {
                add_resource_tx(tx, &self.namespace, lease, &Resource::snapshot(root.name(), name))?;
                remove_resource_tx(tx, &self.namespace, lease, &Resource::snapshot(root.name(), key))?;
            }
            Ok(())
        })
    }

    /// Whether `key` is a committed snapshot, adding it to this handle's
    /// lease (if any) when it is: an unpack that reuses a snapshot must keep
    /// it until its image points at it. One step under the mutation guard,
    /// so a collection runs wholly before it (and the snapshot is gone) or
    /// wholly after (and sees the lease): GC's mark and sweep never straddle
    /// it, as they could a look followed by a separate hold.
    pub fn hold_committed(&self, key: &str) -> Result<bool> {
        let root = &self.root;
        let _guard = root.db.mutation_guard();
        root.db.transaction(|tx| -> Result<bool> {
            match root.get(tx, &self.namespace, key)? {
                Some(r) if r.kind == Kind::Committed => {
                    if let Some(lease) = &self.lease {
                        let res = Resource::snapshot(root.name(), key);
                        add_resource_tx(tx, &self.namespace, lease, &res)?;
                    }
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    /// The tree directories of committed snapshot `name` and its ancestors,
    /// newest first: the lowers of a layer rebased onto it.
    pub fn tree_dirs(&self, name: Option<&str>) -> Result<Vec<PathBuf>> {
        let dirs = self
            .root
            .db
            .transaction(|tx| self.root.parent_dirs(tx, &self.namespace, name))?;
        self.root.ready(&dirs)?;
        Ok(dirs)
    }

    /// Whether a layer applied into [`Snapshotter::apply_dirs`] must be
    /// written as an overlay upper (and with `userxattr`).
    pub fn overlay_upper(&self) -> Option<bool> {
        self.root.backend.overlay_upper()
    }

    /// Whether an unpack indexes each layer's tar beside the active
    /// snapshot's `fs` instead of applying it there.
    pub fn indexes_layers(&self) -> bool {
        self.root.backend.indexes_layers()
    }
}
