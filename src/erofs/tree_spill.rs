//! A layer's tree on disk: an SQLite database beside the layer, private to
//! one index and removed with it. Its page cache is bounded, so a tree of
//! any size costs the same memory. Nothing in it needs to survive a crash
//! (the index is made again), so it has no journal and is never synced.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::tree::{Data, Entry, Error, Inode, Memory, NodeId, Placed, Result};

/// Memory SQLite may keep of the database, in KiB.
const CACHE_KIB: i64 = 4096;

const SCHEMA: &str = "
    CREATE TABLE node (
        id INTEGER PRIMARY KEY,
        mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
        mtime INTEGER NOT NULL, nsec INTEGER NOT NULL, size INTEGER NOT NULL,
        major INTEGER NOT NULL, minor INTEGER NOT NULL,
        xattrs BLOB,
        kind INTEGER NOT NULL, num INTEGER NOT NULL, bytes BLOB,
        marked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE entry (
        dir INTEGER NOT NULL, name BLOB NOT NULL, child INTEGER NOT NULL,
        PRIMARY KEY (dir, name)
    ) WITHOUT ROWID;
    CREATE TABLE placed (
        id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE, parent INTEGER NOT NULL,
        nlink INTEGER NOT NULL, pos INTEGER NOT NULL, size INTEGER NOT NULL
    );
";

const INSERT_NODE: &str = "INSERT INTO node
    (id, mode, uid, gid, mtime, nsec, size, major, minor, xattrs, kind, num, bytes)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";
const UPDATE_NODE: &str = "UPDATE node SET mode = ?2, uid = ?3, gid = ?4, mtime = ?5,
    nsec = ?6, size = ?7, major = ?8, minor = ?9, xattrs = ?10, kind = ?11, num = ?12,
    bytes = ?13 WHERE id = ?1";

const ENTRIES_FIRST: &str =
    "SELECT e.name, e.child, n.mode, p.seq, p.parent, p.nlink, p.pos, p.size
    FROM entry e JOIN node n ON n.id = e.child LEFT JOIN placed p ON p.id = e.child
    WHERE e.dir = ?1 ORDER BY e.name LIMIT ?2";
const ENTRIES_AFTER: &str =
    "SELECT e.name, e.child, n.mode, p.seq, p.parent, p.nlink, p.pos, p.size
    FROM entry e JOIN node n ON n.id = e.child LEFT JOIN placed p ON p.id = e.child
    WHERE e.dir = ?1 AND e.name > ?3 ORDER BY e.name LIMIT ?2";

/// A placement from columns `at..at + 5` of `row`.
fn placed_at(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<Placed>> {
    Ok(match row.get::<_, Option<u32>>(at)? {
        Some(seq) => Some(Placed {
            seq,
            parent: row.get(at + 1)?,
            nlink: row.get(at + 2)?,
            pos: row.get::<_, i64>(at + 3)? as u64,
            size: row.get::<_, i64>(at + 4)? as u64,
        }),
        None => None,
    })
}

fn entry_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let placed = placed_at(row, 3)?;
    Ok(Entry {
        name: row.get(0)?,
        id: row.get(1)?,
        mode: row.get(2)?,
        placed,
    })
}

/// The columns [`node_row`] reads, of `node n`.
macro_rules! node_columns {
    () => {
        "n.mode, n.uid, n.gid, n.mtime, n.nsec, n.size, n.major, n.minor, n.xattrs, n.kind, \
         n.num, n.bytes"
    };
}

/// An inode's fixed fields, and its xattrs and data still encoded.
type NodeRow = (Inode, Option<Vec<u8>>, i64, i64, Option<Vec<u8>>);

/// [`node_columns`] from column `at` of `r` on.
fn node_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<NodeRow> {
    Ok((
        Inode {
            mode: r.get(at)?,
            uid: r.get(at + 1)?,
            gid: r.get(at + 2)?,
            mtime: r.get(at + 3)?,
            mtime_nsec: r.get(at + 4)?,
            size: r.get::<_, i64>(at + 5)? as u64,
            major: r.get(at + 6)?,
            minor: r.get(at + 7)?,
            xattrs: Vec::new(),
            data: Data::None,
        },
        r.get(at + 8)?,
        r.get(at + 9)?,
        r.get(at + 10)?,
        r.get(at + 11)?,
    ))
}

pub(super) struct Spilled {
    conn: Connection,
    path: PathBuf,
    len: u32,
    /// The directory last linked into (inodes never change type).
    last_dir: Cell<Option<NodeId>>,
}

/// The data of an inode as its `kind`, `num` and `bytes` columns.
fn encode_data(data: &Data) -> (i64, i64, Option<Vec<u8>>) {
    match data {
        Data::None => (0, 0, None),
        Data::Symlink(t) => (1, 0, Some(t.clone())),
        Data::Tar { offset } => (2, *offset as i64, None),
        Data::Staged { chunkbits, chunks } => {
            let mut b = Vec::with_capacity(chunks.len() * 8);
            for c in chunks {
                b.extend_from_slice(&c.unwrap_or(u64::MAX).to_le_bytes());
            }
            (3, i64::from(*chunkbits), Some(b))
        }
    }
}

fn decode_data(kind: i64, num: i64, bytes: Option<Vec<u8>>) -> Option<Data> {
    Some(match kind {
        0 => Data::None,
        1 => Data::Symlink(bytes?),
        2 => Data::Tar { offset: num as u64 },
        3 => Data::Staged {
            chunkbits: u8::try_from(num).ok()?,
            chunks: bytes?
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    Some(u64::from_le_bytes(a)).filter(|&v| v != u64::MAX)
                })
                .collect(),
        },
        _ => return None,
    })
}

/// Xattrs as one blob: length-prefixed names and values.
fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
    if xattrs.is_empty() {
        return None;
    }
    let mut b = Vec::new();
    for (n, v) in xattrs {
        for part in [n, v] {
            b.extend_from_slice(&(part.len() as u32).to_le_bytes());
            b.extend_from_slice(part);
        }
    }
    Some(b)
}

fn decode_xattrs(blob: Option<Vec<u8>>) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let Some(blob) = blob else {
        return Some(Vec::new());
    };
    let mut rest = blob.as_slice();
    let mut take = || -> Option<Vec<u8>> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let part = tail.get(..len)?.to_vec();
        rest = &tail[len..];
        Some(part)
    };
    let mut out = Vec::new();
    while let Some(name) = take() {
        out.push((name, take()?));
    }
    Some(out)
}

impl Spilled {
    /// A new database at `path` (replacing any left there) holding `tree`.
    pub fn create(path: &Path, tree: Memory) -> Result<Self> {
        let at = |context: &'static str| {
            move |source| Error::Spill {
                path: path.to_path_buf(),
                context,
                source,
            }
        };
        let _ = std::fs::remove_file(path);
        let conn = Connection::open(path).map_err(at("creating"))?;
        // Plans never depend on bound values: no statement is prepared
        // again because a value changed.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )
        .map_err(at("creating"))?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
             PRAGMA locking_mode = EXCLUSIVE; PRAGMA temp_store = FILE;
             PRAGMA cache_size = -{CACHE_KIB}; {SCHEMA} BEGIN;"
        ))
        .map_err(at("creating"))?;
        let mut s = Spilled {
            conn,
            path: path.to_path_buf(),
            len: 0,
            last_dir: Cell::new(None),
        };
        let Memory {
            inodes,
            marks,
            dirs,
            placed,
            ..
        } = tree;
        for (id, inode) in inodes.into_iter().enumerate() {
            s.add(&inode)?;
            if marks.get(id).copied().unwrap_or(false) {
                s.mark(id as NodeId)?;
            }
        }
        for (dir, entries) in dirs {
            for (name, child) in entries {
                s.link(dir, &name, child)?;
            }
        }
        for (id, p) in placed.into_iter().enumerate() {
            if p.seq != u32::MAX {
                s.place(id as NodeId, p)?;
            }
        }
        Ok(s)
    }

    /// Says which call on the database failed.
    fn err(&self, context: &'static str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Spill {
            path: self.path.clone(),
            context,
            source,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn add(&mut self, inode: &Inode) -> Result<NodeId> {
        let id = self.len;
        if id == u32::MAX {
            return Err(Error::Full);
        }
        self.write("adding an inode", id, inode, INSERT_NODE)?;
        self.len += 1;
        Ok(id)
    }

    pub fn put(&mut self, id: NodeId, inode: &Inode) -> Result<()> {
        if id >= self.len {
            return Err(Error::NoInode(id));
        }
        self.write("changing an inode", id, inode, UPDATE_NODE)
    }

    fn write(&self, context: &'static str, id: NodeId, i: &Inode, sql: &str) -> Result<()> {
        let (kind, num, bytes) = encode_data(&i.data);
        self.conn
            .prepare_cached(sql)
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    i.mode,
                    i.uid,
                    i.gid,
                    i.mtime,
                    i.mtime_nsec,
                    i.size as i64,
                    i.major,
                    i.minor,
                    encode_xattrs(&i.xattrs),
                    kind,
                    num,
                    bytes
                ])
            })
            .map(drop)
            .map_err(self.err(context))
    }

    pub fn inode(&self, id: NodeId) -> Result<Inode> {
        let row = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                node_columns!(),
                " FROM node n WHERE n.id = ?1"
            ))
            .and_then(|mut st| st.query_row([id], |r| node_row(r, 0)).optional())
            .map_err(self.err("reading an inode"))?;
        self.decode(id, row.ok_or(Error::NoInode(id))?)
    }

    /// The inode of a row [`node_row`] read (only this module writes the
    /// columns: one it cannot read back is a damaged file).
    fn decode(&self, id: NodeId, row: NodeRow) -> Result<Inode> {
        let (mut inode, xattrs, kind, num, bytes) = row;
        let damaged = || Error::Spill {
            path: self.path.clone(),
            context: "reading an inode",
            source: rusqlite::Error::InvalidColumnType(
                0,
                format!("inode {id}"),
                rusqlite::types::Type::Blob,
            ),
        };
        inode.xattrs = decode_xattrs(xattrs).ok_or_else(damaged)?;
        inode.data = decode_data(kind, num, bytes).ok_or_else(damaged)?;
        Ok(inode)
    }

    pub fn child(&self, dir: NodeId, name: &[u8]) -> Result<Option<NodeId>> {
        self.conn
            .prepare_cached("SELECT child FROM entry WHERE dir = ?1 AND name = ?2")
            .and_then(|mut st| st.query_row(params![dir, name], |r| r.get(0)).optional())
            .map_err(self.err("looking up an entry"))
    }

    /// Puts `node` at `dir/name`; returns what was there.
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Result<Option<NodeId>> {
        // Entries come directory by directory: one check for a run.
        if self.last_dir.get() != Some(dir) {
            if !self.inode(dir)?.is_dir() {
                return Err(Error::NotADirectory(dir));
            }
            self.last_dir.set(Some(dir));
        }
        let added = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO entry (dir, name, child) VALUES (?1, ?2, ?3)")
            .and_then(|mut st| st.execute(params![dir, name, node]))
            .map_err(self.err("adding an entry"))?;
        if added == 1 {
            return Ok(None);
        }
        let old = self.child(dir, name)?;
        self.conn
            .prepare_cached("UPDATE entry SET child = ?3 WHERE dir = ?1 AND name = ?2")
            .and_then(|mut st| st.execute(params![dir, name, node]))
            .map_err(self.err("replacing an entry"))?;
        Ok(old)
    }

    pub fn entries(&self, dir: NodeId, after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        let fail = self.err("listing a directory");
        // Two statements, so that each seeks straight to its first row.
        let sql = match after {
            Some(_) => ENTRIES_AFTER,
            None => ENTRIES_FIRST,
        };
        let mut st = self.conn.prepare_cached(sql).map_err(&fail)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            Some(a) => st.query_map(params![dir, limit, a], entry_row),
            None => st.query_map(params![dir, limit], entry_row),
        }
        .map_err(&fail)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&fail)
    }

    pub fn mark(&mut self, id: NodeId) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE node SET marked = 1 WHERE id = ?1")
            .and_then(|mut st| st.execute([id]))
            .map_err(self.err("marking an inode"))
            .and_then(|n| {
                if n == 1 {
                    Ok(())
                } else {
                    Err(Error::NoInode(id))
                }
            })
    }

    pub fn marked(&self, id: NodeId) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT marked FROM node WHERE id = ?1")
            .and_then(|mut st| st.query_row([id], |r| r.get::<_, bool>(0)).optional())
            .map_err(self.err("reading a mark"))?
            .ok_or(Error::NoInode(id))
    }

    pub fn place(&mut self, id: NodeId, p: Placed) -> Result<()> {
        self.conn
            .prepare_cached(
                // An inode keeps its seq until the placements are
                // cleared: the seq index is left alone.
                "INSERT INTO placed (id, seq, parent, nlink, pos, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET parent = excluded.parent,
                     nlink = excluded.nlink, pos = excluded.pos, size = excluded.size",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    p.seq,
                    p.parent,
                    p.nlink,
                    p.pos as i64,
                    p.size as i64
                ])
            })
            .map(drop)
            .map_err(self.err("placing an inode"))
    }

    pub fn placed(&self, id: NodeId) -> Result<Option<Placed>> {
        self.conn
            .prepare_cached("SELECT seq, parent, nlink, pos, size FROM placed WHERE id = ?1")
            .and_then(|mut st| st.query_row([id], |r| placed_at(r, 0)).optional())
            .map_err(self.err("reading a placement"))
            .map(Option::flatten)
    }

    pub fn in_order(&self, from: u32, limit: usize) -> Result<Vec<(NodeId, Placed, Inode)>> {
        let fail = self.err("reading the image order");
        let mut st = self
            .conn
            .prepare_cached(concat!(
                "SELECT p.id, p.seq, p.parent, p.nlink, p.pos, p.size, ",
                node_columns!(),
                " FROM placed p JOIN node n ON n.id = p.id
                 WHERE p.seq >= ?1 ORDER BY p.seq LIMIT ?2"
            ))
            .map_err(&fail)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st
            .query_map(params![from, limit], |r| {
                let placed = placed_at(r, 1)?.unwrap_or_default();
                Ok((r.get::<_, NodeId>(0)?, placed, node_row(r, 6)?))
            })
            .map_err(&fail)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, placed, node) = row.map_err(&fail)?;
            out.push((id, placed, self.decode(id, node)?));
        }
        Ok(out)
    }

    pub fn clear_placements(&mut self) -> Result<()> {
        self.conn
            .execute("DELETE FROM placed", [])
            .map(drop)
            .map_err(self.err("clearing placements"))
    }
}

/// The file goes with the tree (the connection, closed next, keeps it
/// open until then).
impl Drop for Spilled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
