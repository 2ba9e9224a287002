//! Leases: named holds on resources (content, ingests, snapshots) that keep
//! garbage collection away from what an operation is still building. A lease
//! labelled `containerd.io/gc.expire=<RFC 3339 time>` stops holding anything
//! after that time, and GC deletes it.

use super::{Db, Error, Labels, Result, from_nanos, load_all_labels, replace_labels, to_nanos};
use crate::digest::Digest;
use rusqlite::{Connection, params};
use std::time::{Duration, SystemTime};

pub const LABEL_EXPIRE: &str = "containerd.io/gc.expire";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub labels: Labels,
    pub created_at: SystemTime,
}

impl Lease {
    /// When the lease stops holding its resources, if it ever does.
    pub fn expires_at(&self) -> Option<SystemTime> {
        let value = self.labels.get(LABEL_EXPIRE)?;
        match humantime::parse_rfc3339_weak(value) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(lease = %self.id, value, error = %e, "ignoring an unreadable lease expiry");
                None
            }
        }
    }

    /// Whether the lease has stopped holding anything by `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at().is_some_and(|t| t <= now)
    }
}

/// Something a lease holds. `kind` is `content`, `ingests` or
/// `snapshots/<snapshotter>`, as in containerd.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    pub kind: String,
    pub id: String,
}

impl Resource {
    pub fn content(digest: &Digest) -> Self {
        Resource {
            kind: "content".to_string(),
            id: digest.to_string(),
        }
    }

    pub fn ingest(reference: &str) -> Self {
        Resource {
            kind: "ingests".to_string(),
            id: reference.to_string(),
        }
    }

    pub fn snapshot(snapshotter: &str, key: &str) -> Self {
        Resource {
            kind: format!("snapshots/{snapshotter}"),
            id: key.to_string(),
        }
    }
}

/// The label value that makes a lease expire `ttl` from now.
pub fn expire_label(ttl: Duration) -> (String, String) {
    (
        LABEL_EXPIRE.to_string(),
        humantime::format_rfc3339_seconds(SystemTime::now() + ttl).to_string(),
    )
}

pub(crate) fn add_resource_tx(
    conn: &Connection,
    namespace: &str,
    lease: &str,
    resource: &Resource,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO lease_resources (namespace, lease, kind, resource)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![namespace, lease, resource.kind, resource.id])?;
    Ok(())
}

pub(crate) fn remove_resource_tx(
    conn: &Connection,
    namespace: &str,
    lease: &str,
    resource: &Resource,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM lease_resources WHERE namespace = ?1 AND lease = ?2 AND kind = ?3 AND resource = ?4",
    )?
    .execute(params![namespace, lease, resource.kind, resource.id])?;
    Ok(())
}

/// Every lease in every namespace, as (namespace, lease).
pub(crate) fn all_leases(conn: &Connection) -> rusqlite::Result<Vec<(String, Lease)>> {
    let mut labels = load_all_labels(conn, "lease_labels", None)?;
    let mut stmt = conn.prepare_cached("SELECT namespace, id, created_at FROM leases")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (ns, id, created): (String, String, i64) = row?;
        let lease = Lease {
            labels: labels.remove(&(ns.clone(), id.clone())).unwrap_or_default(),
            id,
            created_at: from_nanos(created),
        };
        out.push((ns, lease));
    }
    Ok(out)
}

impl Db {
    /// Creates a lease; fails with AlreadyExists when the id is taken.
    pub fn create_lease(&self, namespace: &str, id: &str, labels: Labels) -> Result<Lease> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("a lease needs an id".to_string()));
        }
        let created_at = SystemTime::now();
        self.transaction(|tx| {
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO leases (namespace, id, created_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![namespace, id, to_nanos(created_at)])?;
            if n == 0 {
                return Err(Error::AlreadyExists(format!("lease {id:?}")));
            }
            replace_labels(tx, "lease_labels", namespace, id, &labels)?;
            Ok(Lease {
                id: id.to_string(),
                labels,
                created_at,
            })
        })
    }

    /// Deletes a lease; what it held is left to the next garbage collection.
    pub fn delete_lease(&self, namespace: &str, id: &str) -> Result<()> {
        crate::failpoint!("lease-release");
        let n = self.transaction(|tx| {
            tx.prepare_cached("DELETE FROM leases WHERE namespace = ?1 AND id = ?2")?
                .execute(params![namespace, id])
        })?;
        if n == 0 {
            return Err(Error::NotFound(format!("lease {id:?}")));
        }
        Ok(())
    }

    pub fn leases(&self, namespace: &str) -> Result<Vec<Lease>> {
        Ok(self
            .transaction(|tx| all_leases(tx))?
            .into_iter()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, lease)| lease)
            .collect())
    }

    pub fn add_lease_resource(
        &self,
        namespace: &str,
        lease: &str,
        resource: &Resource,
    ) -> Result<()> {
        self.transaction(|tx| {
            if !super::exists(
                tx,
                "SELECT 1 FROM leases WHERE namespace = ?1 AND id = ?2",
                params![namespace, lease],
            )? {
                return Err(Error::NotFound(format!("lease {lease:?}")));
            }
            Ok(add_resource_tx(tx, namespace, lease, resource)?)
        })
    }

    pub fn remove_lease_resource(
        &self,
        namespace: &str,
        lease: &str,
        resource: &Resource,
    ) -> Result<()> {
        Ok(self.transaction(|tx| remove_resource_tx(tx, namespace, lease, resource))?)
    }

    pub fn lease_resources(&self, namespace: &str, lease: &str) -> Result<Vec<Resource>> {
        Ok(self.transaction(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT kind, resource FROM lease_resources WHERE namespace = ?1 AND lease = ?2
                 ORDER BY kind, resource",
            )?;
            stmt.query_map(params![namespace, lease], |r| {
                Ok(Resource {
                    kind: r.get(0)?,
                    id: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::NAMESPACE_DEFAULT as NS;

    #[test]
    fn lease_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let labels: Labels = [expire_label(Duration::from_secs(3600))].into();
        let lease = db.create_lease(NS, "pull-1", labels).unwrap();
        let expires = lease.expires_at().unwrap();
        assert!(expires > SystemTime::now() + Duration::from_secs(3500));
        assert!(matches!(
            db.create_lease(NS, "pull-1", Labels::new()),
            Err(Error::AlreadyExists(_))
        ));
        let r = Resource::content(&Digest::of(b"x"));
        db.add_lease_resource(NS, "pull-1", &r).unwrap();
        db.add_lease_resource(NS, "pull-1", &r).unwrap();
        db.add_lease_resource(NS, "pull-1", &Resource::ingest("ref"))
            .unwrap();
        assert_eq!(db.lease_resources(NS, "pull-1").unwrap().len(), 2);
        assert!(matches!(
            db.add_lease_resource(NS, "nope", &r),
            Err(Error::NotFound(_))
        ));
        assert!(db.leases("other").unwrap().is_empty());
        db.remove_lease_resource(NS, "pull-1", &r).unwrap();
        assert_eq!(
            db.lease_resources(NS, "pull-1").unwrap(),
            vec![Resource::ingest("ref")]
        );
        db.delete_lease(NS, "pull-1").unwrap();
        assert!(db.leases(NS).unwrap().is_empty());
        assert!(db.lease_resources(NS, "pull-1").unwrap().is_empty());
        assert!(matches!(
            db.delete_lease(NS, "pull-1"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn unreadable_expiry_never_expires() {
        let lease = Lease {
            id: "x".into(),
            labels: [(LABEL_EXPIRE.to_string(), "tomorrow".to_string())].into(),
            created_at: SystemTime::now(),
        };
        assert_eq!(lease.expires_at(), None);
    }
}
