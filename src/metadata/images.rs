//! Image records: a name, unique per namespace, pointing at a target descriptor.

use super::{
    Db, Error, Labels, Result, from_nanos, load_all_labels, load_labels, replace_labels, to_nanos,
};
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::filters::{Adaptor, Filter};
use rusqlite::{Connection, params};
use std::time::SystemTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub target: Descriptor,
    pub labels: Labels,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

impl Image {
    pub fn new(name: impl Into<String>, target: Descriptor) -> Self {
        let now = SystemTime::now();
        Image {
            name: name.into(),
            target,
            labels: Labels::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

impl Adaptor for Image {
    fn field(&self, path: &[String]) -> Option<String> {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        match path.as_slice() {
            ["name"] => Some(self.name.clone()),
            ["target", "digest"] => Some(self.target.digest.to_string()),
            ["target", "mediatype"] => Some(self.target.media_type.clone()),
            ["labels", key] => self.labels.get(*key).cloned(),
            _ => None,
        }
    }
}

/// Every image of `namespace` (`None`: all), with (namespace, image);
/// with `name`, only that one.
pub(crate) fn all_images(
    conn: &Connection,
    namespace: Option<&str>,
) -> rusqlite::Result<Vec<(String, Image)>> {
    select_images(conn, namespace, None)
}

fn select_images(
    conn: &Connection,
    namespace: Option<&str>,
    name: Option<&str>,
) -> rusqlite::Result<Vec<(String, Image)>> {
    // One image needs only its own labels, not the namespace's.
    let mut labels = match (namespace, name) {
        (Some(ns), Some(n)) => [(
            (ns.to_string(), n.to_string()),
            load_labels(conn, "image_labels", ns, n)?,
        )]
        .into(),
        _ => load_all_labels(conn, "image_labels", namespace)?,
    };
    let mut stmt = conn.prepare_cached(
        "SELECT namespace, name, media_type, digest, size, created_at, updated_at
         FROM images WHERE (?1 IS NULL OR namespace = ?1) AND (?2 IS NULL OR name = ?2)
         ORDER BY namespace, name",
    )?;
    let rows = stmt.query_map(params![namespace, name], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (ns, name, media_type, digest, size, created, updated) = row?;
        let Ok(digest) = digest.parse::<Digest>() else {
            tracing::warn!(image = %name, digest, "skipping an image with a malformed target digest");
            continue;
        };
        let image = Image {
            labels: labels
                .remove(&(ns.clone(), name.clone()))
                .unwrap_or_default(),
            name,
            target: Descriptor::new(media_type, digest, size as u64),
            created_at: from_nanos(created),
            updated_at: from_nanos(updated),
        };
        out.push((ns, image));
    }
    Ok(out)
}

fn name_taken(tx: &rusqlite::Transaction<'_>, namespace: &str, name: &str) -> Result<bool> {
    super::exists(
        tx,
        "SELECT 1 FROM images WHERE namespace = ?1 AND name = ?2",
        params![namespace, name],
    )
    .map_err(Into::into)
}

/// Points `name` at `target`; a name already taken keeps its creation time.
fn upsert(
    tx: &rusqlite::Transaction<'_>,
    namespace: &str,
    name: &str,
    target: &Descriptor,
    (created_at, updated_at): (i64, i64),
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO images (namespace, name, media_type, digest, size, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (namespace, name) DO UPDATE SET media_type = excluded.media_type,
         digest = excluded.digest, size = excluded.size, updated_at = excluded.updated_at",
    )?
    .execute(params![
        namespace,
        name,
        target.media_type,
        target.digest.to_string(),
        target.size as i64,
        created_at,
        updated_at
    ])?;
    Ok(())
}

/// How a write treats a name that is, or is not, already taken.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// Only a new name.
    Create,
    /// Only an existing name.
    Update,
    /// Either.
    Put,
}

impl Db {
    pub fn image(&self, namespace: &str, name: &str) -> Result<Image> {
        self.transaction(|tx| select_images(tx, Some(namespace), Some(name)))?
            .pop()
            .map(|(_, image)| image)
            .ok_or_else(|| Error::NotFound(format!("image {name:?}")))
    }

    pub fn list_images(&self, namespace: &str, filter: &Filter) -> Result<Vec<Image>> {
        let images = self.transaction(|tx| all_images(tx, Some(namespace)))?;
        Ok(images
            .into_iter()
            .map(|(_, image)| image)
            .filter(|image| filter.matches(image))
            .collect())
    }

    /// Records a new image; AlreadyExists when the name is taken.
    pub fn create_image(&self, namespace: &str, image: Image) -> Result<Image> {
        self.write_image(namespace, image, Write::Create)
    }

    /// Points an existing name at a new target and labels; NotFound when absent.
    pub fn update_image(&self, namespace: &str, image: Image) -> Result<Image> {
        self.write_image(namespace, image, Write::Update)
    }

    /// Creates the image, or updates it when the name exists (keeping its
    /// creation time), in one transaction: a removal of the name between a
    /// create and an update would otherwise fail the update.
    pub fn put_image(&self, namespace: &str, image: Image) -> Result<Image> {
        self.write_image(namespace, image, Write::Put)
    }

    /// Writes `image` and reads it back in the same transaction, so a
    /// removal that follows cannot make a write that succeeded report
    /// the name as missing.
    fn write_image(&self, namespace: &str, mut image: Image, how: Write) -> Result<Image> {
        if image.name.is_empty() {
            return Err(Error::InvalidArgument("an image needs a name".to_string()));
        }
        let _guard = self.mutation_guard();
        image.updated_at = SystemTime::now();
        let (existed, written) = self.transaction(|tx| {
            let existed = name_taken(tx, namespace, &image.name)?;
            match (how, existed) {
                (Write::Update, false) => {
                    return Err(Error::NotFound(format!("image {:?}", image.name)));
                }
                (Write::Create, true) => {
                    return Err(Error::AlreadyExists(format!("image {:?}", image.name)));
                }
                _ => {}
            }
            let times = (to_nanos(image.created_at), to_nanos(image.updated_at));
            upsert(tx, namespace, &image.name, &image.target, times)?;
            replace_labels(tx, "image_labels", namespace, &image.name, &image.labels)?;
            crate::failpoint!("image-record");
            let written = select_images(tx, Some(namespace), Some(&image.name))?
                .pop()
                .map(|(_, image)| image)
                .ok_or_else(|| Error::NotFound(format!("image {:?}", image.name)))?;
            Ok((existed, written))
        })?;
        let (ns, name, target) = (namespace.to_string(), image.name, image.target.digest);
        self.notify(|| {
            let name = name.clone();
            if existed {
                super::Change::ImageUpdated {
                    namespace: ns,
                    name,
                    target,
                }
            } else {
                super::Change::ImageCreated {
                    namespace: ns,
                    name,
                    target,
                }
            }
        });
        Ok(written)
    }

    /// Points every name of `names` at `target`, with `labels`, in one
    /// transaction, provided `pulled` still points at `target`: a pull's
    /// image may be removed, and its content collected, between the pull
    /// and a caller's recording of more names, which would then point at
    /// nothing. `Ok(false)`, recording nothing, when it was removed.
    pub fn put_names_while_pulled(
        &self,
        namespace: &str,
        pulled: &str,
        target: &Descriptor,
        names: &[String],
        labels: &Labels,
    ) -> Result<bool> {
        let _guard = self.mutation_guard();
        let now = to_nanos(SystemTime::now());
        let written = self.transaction(|tx| -> Result<Option<Vec<(String, bool)>>> {
            let still = super::exists(
                tx,
                "SELECT 1 FROM images WHERE namespace = ?1 AND name = ?2 AND digest = ?3",
                params![namespace, pulled, target.digest.to_string()],
            )?;
            if !still {
                return Ok(None);
            }
            let mut written = Vec::new();
            for name in names {
                let existed = name_taken(tx, namespace, name)?;
                upsert(tx, namespace, name, target, (now, now))?;
                replace_labels(tx, "image_labels", namespace, name, labels)?;
                written.push((name.clone(), existed));
            }
            Ok(Some(written))
        })?;
        let Some(written) = written else {
            return Ok(false);
        };
        for (name, existed) in written {
            let (namespace, target) = (namespace.to_string(), target.digest.clone());
            self.notify(|| match existed {
                true => super::Change::ImageUpdated {
                    namespace,
                    name,
                    target,
                },
                false => super::Change::ImageCreated {
                    namespace,
                    name,
                    target,
                },
            });
        }
        Ok(true)
    }

    /// Removes an image name; its content stays until garbage collection.
    pub fn delete_image(&self, namespace: &str, name: &str) -> Result<()> {
        let n = self.transaction(|tx| {
            tx.prepare_cached("DELETE FROM images WHERE namespace = ?1 AND name = ?2")?
                .execute(params![namespace, name])
        })?;
        if n == 0 {
            return Err(Error::NotFound(format!("image {name:?}")));
        }
        self.notify(|| super::Change::ImageRemoved {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::NAMESPACE_DEFAULT as NS;

    fn target(data: &[u8]) -> Descriptor {
        Descriptor::new(
            "application/vnd.oci.image.manifest.v1+json",
            Digest::of(data),
            data.len() as u64,
        )
    }

    /// Two handles on one root stand for two processes (a daemon's root is
    /// exclusive, but commands share one): transactions that read, then
    /// write, wait for each other instead of failing with "database is
    /// locked".
    #[test]
    fn two_handles_on_one_root_write_without_busy_errors() {
        use crate::content::Store;
        let dir = tempfile::tempdir().unwrap();
        let desc = target(b"blob");
        let db = Db::open(dir.path()).unwrap();
        crate::content::write_blob(
            &db.content_store(NS),
            "k",
            &b"blob"[..],
            &desc,
            Labels::new(),
        )
        .unwrap();
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (root, desc) = (dir.path().to_path_buf(), desc.clone());
                std::thread::spawn(move || {
                    let db = Db::open(&root).unwrap();
                    let store = db.content_store(NS);
                    for i in 0..300 {
                        let mut info = store.info(&desc.digest).unwrap();
                        info.labels = [(format!("w{w}"), i.to_string())].into();
                        store.update(info, &[&format!("labels.w{w}")]).unwrap();
                        let name = format!("docker.io/library/app:{}", i % 10);
                        db.put_image(NS, Image::new(name, target(format!("{i}").as_bytes())))
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let labels = db.content_store(NS).info(&desc.digest).unwrap().labels;
        assert_eq!(labels.get("w0").map(String::as_str), Some("299"));
        assert_eq!(labels.get("w1").map(String::as_str), Some("299"));
        assert_eq!(db.list_images(NS, &Default::default()).unwrap().len(), 10);
    }

    /// A name removed while it is put again is either recorded or not, and
    /// the put never reports it missing (a pull's record raced removals so).
    #[test]
    fn putting_a_name_that_is_being_removed_never_finds_it_missing() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::sync::Arc::new(Db::open(dir.path()).unwrap());
        let name = "docker.io/library/raced:1";
        db.put_image(NS, Image::new(name, target(b"m"))).unwrap();
        let remover = {
            let db = db.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    match db.delete_image(NS, name) {
                        Ok(()) | Err(Error::NotFound(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        };
        for i in 0..2000 {
            let put = db.put_image(NS, Image::new(name, target(format!("{i}").as_bytes())));
            let put = put.unwrap_or_else(|e| panic!("put {i}: {e}"));
            assert_eq!(put.target.digest, Digest::of(format!("{i}").as_bytes()));
        }
        remover.join().unwrap();
    }

    /// Names recorded after a pull point where the pull's name does, or
    /// nowhere once that name is gone (its content may be collected).
    #[test]
    fn names_are_put_only_while_the_pulled_name_stands() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let t = target(b"m1");
        let names = ["a:1".to_string(), "a@x".to_string(), "id".to_string()];
        let labels: Labels = [("k".to_string(), "v".to_string())].into();
        assert!(
            !db.put_names_while_pulled(NS, "a:1", &t, &names, &labels)
                .unwrap()
        );
        assert!(db.list_images(NS, &Filter::default()).unwrap().is_empty());
        db.create_image(NS, Image::new("a:1", t.clone())).unwrap();
        // Pointing elsewhere is as good as gone.
        assert!(
            !db.put_names_while_pulled(NS, "a:1", &target(b"m2"), &names, &labels)
                .unwrap()
        );
        assert!(
            db.put_names_while_pulled(NS, "a:1", &t, &names, &labels)
                .unwrap()
        );
        let images = db.list_images(NS, &Filter::default()).unwrap();
        assert_eq!(images.len(), 3);
        assert!(images.iter().all(|i| i.target == t && i.labels == labels));
    }

    #[test]
    fn image_crud() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut img = Image::new("docker.io/library/a:1", target(b"m1"));
        img.labels.insert("team".into(), "x".into());
        let created = db.create_image(NS, img.clone()).unwrap();
        assert_eq!(created.target, img.target);
        assert_eq!(created.labels, img.labels);
        assert!(matches!(
            db.create_image(NS, img.clone()),
            Err(Error::AlreadyExists(_))
        ));
        let mut moved = img.clone();
        moved.target = target(b"m2");
        moved.labels.clear();
        let updated = db.put_image(NS, moved).unwrap();
        assert_eq!(updated.target.digest, Digest::of(b"m2"));
        assert!(updated.labels.is_empty());
        assert_eq!(updated.created_at, created.created_at);
        assert!(matches!(
            db.update_image(NS, Image::new("nope", target(b"m"))),
            Err(Error::NotFound(_))
        ));
        db.create_image(NS, Image::new("docker.io/library/b:1", target(b"m2")))
            .unwrap();
        assert!(
            db.list_images("other", &Filter::default())
                .unwrap()
                .is_empty()
        );
        let by_digest = Filter::parse(&format!("target.digest=={}", Digest::of(b"m2"))).unwrap();
        assert_eq!(db.list_images(NS, &by_digest).unwrap().len(), 2);
        let by_name = Filter::parse("name~=/a:").unwrap();
        assert_eq!(db.list_images(NS, &by_name).unwrap().len(), 1);
        db.delete_image(NS, "docker.io/library/a:1").unwrap();
        assert!(matches!(
            db.image(NS, "docker.io/library/a:1"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            db.delete_image(NS, "docker.io/library/a:1"),
            Err(Error::NotFound(_))
        ));
    }
}
