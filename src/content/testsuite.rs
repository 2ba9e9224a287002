//! The conformance suite every [`Store`] implementation must pass.
//!
//! An implementation's tests call [`content_store_conformance!`] with a closure
//! that makes a fresh [`Harness`]; the macro expands to one `#[test]` per case.

use super::{Error, Labels, Store};
use crate::descriptor::Descriptor;
use crate::digest::Digest;
use crate::filters::Filter;
use std::any::Any;
use std::io::{Read, Write};

pub struct Harness {
    pub store: Box<dyn Store>,
    /// Opens the same store again, as a restarted process would.
    pub reopen: Box<dyn Fn() -> Box<dyn Store>>,
    /// Keeps temporary directories alive for the test's duration.
    pub guard: Box<dyn Any>,
}

fn desc(data: &[u8]) -> Descriptor {
    Descriptor::new(
        "application/octet-stream",
        Digest::of(data),
        data.len() as u64,
    )
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn read_all(store: &dyn Store, digest: &Digest) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .reader_at(digest)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn commit(store: &dyn Store, reference: &str, data: &[u8], l: Labels) -> Digest {
    let mut w = store.writer(reference, Some(&desc(data))).unwrap();
    w.write_all(data).unwrap();
    w.commit(data.len() as u64, None, l).unwrap()
}

pub fn write_and_commit(h: Harness) {
    let s = &*h.store;
    let data = b"hello, content store";
    let d = desc(data);
    let mut w = s.writer("write-1", Some(&d)).unwrap();
    w.write_all(&data[..5]).unwrap();
    let st = w.status().unwrap();
    assert_eq!((st.offset, st.total), (5, data.len() as u64));
    assert_eq!(st.expected.as_ref(), Some(&d.digest));
    assert_eq!(s.status("write-1").unwrap().offset, 5);
    w.write_all(&data[5..]).unwrap();
    assert_eq!(w.digest(), d.digest);
    let got = w.commit(d.size, Some(&d.digest), Labels::new()).unwrap();
    assert_eq!(got, d.digest);
    let info = s.info(&d.digest).unwrap();
    assert_eq!(info.size, d.size);
    assert_eq!(read_all(s, &d.digest), data);
    let blob = s.reader_at(&d.digest).unwrap();
    let mut buf = [0u8; 7];
    assert_eq!(blob.read_at(&mut buf, 7).unwrap(), 7);
    assert_eq!(&buf, b"content");
    assert_eq!(blob.size(), d.size);
    assert!(matches!(s.status("write-1"), Err(Error::NotFound(_))));
}

pub fn resume_after_reopen(h: Harness) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = desc(&data);
    let mut w = h.store.writer("resume", Some(&d)).unwrap();
    w.write_all(&data[..123_456]).unwrap();
    drop(w);
    drop(h.store);
    let s = (h.reopen)();
    let st = s.status("resume").unwrap();
    assert_eq!((st.offset, st.total), (123_456, data.len() as u64));
    let mut w = s.writer("resume", Some(&d)).unwrap();
    assert_eq!(w.status().unwrap().offset, 123_456);
    w.write_all(&data[123_456..]).unwrap();
    w.commit(d.size, Some(&d.digest), Labels::new()).unwrap();
    assert_eq!(read_all(&*s, &d.digest), data);
}

pub fn commit_existing_blob(h: Harness) {
    let s = &*h.store;
    let data = b"already here";
    commit(s, "first", data, Labels::new());
    assert!(matches!(
        s.writer("second", Some(&desc(data))),
        Err(Error::AlreadyExists(_))
    ));
    let mut w = s.writer("third", None).unwrap();
    w.write_all(data).unwrap();
    assert!(matches!(
        w.commit(data.len() as u64, None, Labels::new()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(s.status("third"), Err(Error::NotFound(_))));
    assert_eq!(read_all(s, &desc(data).digest), data);
}

pub fn size_mismatch_discards(h: Harness) {
    let s = &*h.store;
    let mut w = s.writer("short", None).unwrap();
    w.write_all(b"four").unwrap();
    let err = w.commit(5, None, Labels::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SizeMismatch {
                expected: 5,
                actual: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("expected 5"), "{err}");
    assert!(matches!(s.status("short"), Err(Error::NotFound(_))));
    let w = s.writer("short", None).unwrap();
    assert_eq!(w.status().unwrap().offset, 0);
}

pub fn digest_mismatch_discards(h: Harness) {
    let s = &*h.store;
    let d = desc(b"the real thing");
    let mut w = s.writer("bad", Some(&d)).unwrap();
    w.write_all(b"the fake thing").unwrap();
    let err = w.commit(d.size, None, Labels::new()).unwrap_err();
    match &err {
        Error::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &d.digest);
            assert_eq!(actual, &Digest::of(b"the fake thing"));
        }
        other => panic!("want a digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&d.digest.to_string()));
    assert!(matches!(s.status("bad"), Err(Error::NotFound(_))));
    assert!(matches!(s.info(&d.digest), Err(Error::NotFound(_))));
    assert!(matches!(
        s.info(&Digest::of(b"the fake thing")),
        Err(Error::NotFound(_))
    ));
}

pub fn abort(h: Harness) {
    let s = &*h.store;
    let mut w = s.writer("gone", None).unwrap();
    w.write_all(b"partial").unwrap();
    assert!(matches!(s.abort("gone"), Err(Error::Locked(_))));
    drop(w);
    s.abort("gone").unwrap();
    assert!(matches!(s.status("gone"), Err(Error::NotFound(_))));
    assert!(matches!(s.abort("gone"), Err(Error::NotFound(_))));
}

pub fn truncate(h: Harness) {
    let s = &*h.store;
    let mut w = s.writer("t", None).unwrap();
    w.write_all(b"wrong start").unwrap();
    w.truncate(0).unwrap();
    w.write_all(b"right").unwrap();
    assert_eq!(w.digest(), Digest::of(b"right"));
    w.truncate(2).unwrap();
    assert_eq!(w.status().unwrap().offset, 2);
    w.write_all(b"ght").unwrap();
    let got = w
        .commit(5, Some(&Digest::of(b"right")), Labels::new())
        .unwrap();
    assert_eq!(read_all(s, &got), b"right");
}

pub fn labels_update(h: Harness) {
    let s = &*h.store;
    let d = commit(s, "l", b"labelled", labels(&[("a", "1"), ("b", "2")]));
    assert_eq!(
        s.info(&d).unwrap().labels,
        labels(&[("a", "1"), ("b", "2")])
    );
    let mut info = s.info(&d).unwrap();
    info.labels = labels(&[("b", ""), ("c", "3")]);
    let updated = s.update(info.clone(), &["labels.b", "labels.c"]).unwrap();
    assert_eq!(updated.labels, labels(&[("a", "1"), ("c", "3")]));
    assert_eq!(s.info(&d).unwrap().labels, updated.labels);
    info.labels = labels(&[("only", "x")]);
    s.update(info.clone(), &["labels"]).unwrap();
    assert_eq!(s.info(&d).unwrap().labels, labels(&[("only", "x")]));
    assert!(matches!(
        s.update(info, &["size"]),
        Err(Error::InvalidArgument(_))
    ));
    let missing = crate::content::Info {
        digest: Digest::of(b"nope"),
        ..s.info(&d).unwrap()
    };
    assert!(matches!(s.update(missing, &[]), Err(Error::NotFound(_))));
}

pub fn walk_with_filters(h: Harness) {
    let s = &*h.store;
    let a = commit(s, "a", b"aaa", labels(&[("kind", "layer"), ("n", "1")]));
    let b = commit(s, "b", b"bbb", labels(&[("kind", "config")]));
    let c = commit(s, "c", b"ccc", Labels::new());
    let walk = |filter: &[&str]| {
        let mut seen = Vec::new();
        s.walk(&Filter::parse_all(filter).unwrap(), &mut |info| {
            seen.push(info.digest);
            Ok(())
        })
        .unwrap();
        seen.sort();
        seen
    };
    let mut all = vec![a.clone(), b.clone(), c.clone()];
    all.sort();
    assert_eq!(walk(&[]), all);
    assert_eq!(walk(&["labels.kind==layer"]), vec![a.clone()]);
    assert_eq!(walk(&["labels.kind"]).len(), 2);
    assert_eq!(walk(&["labels.kind~=^con"]), vec![b.clone()]);
    assert_eq!(
        walk(&["labels.kind==layer,labels.n==2"]),
        Vec::<Digest>::new()
    );
    assert_eq!(walk(&[&format!("digest=={c}")]), vec![c]);
}

pub fn delete(h: Harness) {
    let s = &*h.store;
    let d = commit(s, "del", b"to be deleted", Labels::new());
    s.delete(&d).unwrap();
    assert!(matches!(s.info(&d), Err(Error::NotFound(_))));
    assert!(matches!(s.reader_at(&d), Err(Error::NotFound(_))));
    assert!(matches!(s.delete(&d), Err(Error::NotFound(_))));
    // The same bytes can be written again afterwards.
    assert_eq!(commit(s, "del", b"to be deleted", Labels::new()), d);
}

pub fn two_writers_one_ref(h: Harness) {
    let s = &*h.store;
    let mut first = s.writer("shared-ref", None).unwrap();
    first.write_all(b"first ").unwrap();
    let err = s.writer("shared-ref", None).err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("locked") && e.contains("shared-ref")),
        "{err:?}"
    );
    first.write_all(b"writer").unwrap();
    drop(first);
    let second = s.writer("shared-ref", None).unwrap();
    assert_eq!(second.status().unwrap().offset, 12);
    let d = second.commit(12, Some(&Digest::of(b"first writer")), Labels::new());
    assert!(d.is_ok(), "{d:?}");
}

pub fn concurrent_writers(h: Harness) {
    let s = &*h.store;
    let blobs: Vec<Vec<u8>> = (0..16u8)
        .map(|i| {
            (0..50_000u32)
                .map(|j| (j as u8).wrapping_mul(i + 1))
                .collect()
        })
        .collect();
    std::thread::scope(|scope| {
        for (i, data) in blobs.iter().enumerate() {
            scope.spawn(move || {
                let d = desc(data);
                let mut w = s.writer(&format!("concurrent-{i}"), Some(&d)).unwrap();
                for chunk in data.chunks(4096) {
                    w.write_all(chunk).unwrap();
                }
                w.commit(d.size, None, Labels::new()).unwrap();
            });
        }
    });
    for data in &blobs {
        assert_eq!(read_all(s, &Digest::of(data)), *data);
    }
    assert!(s.list_statuses(&Filter::default()).unwrap().is_empty());
}

pub fn list_statuses(h: Harness) {
    let s = &*h.store;
    let mut w1 = s.writer("pull-a", None).unwrap();
    w1.write_all(b"x").unwrap();
    let _w2 = s.writer("push-b", None).unwrap();
    let mut refs: Vec<_> = s
        .list_statuses(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|st| st.reference)
        .collect();
    refs.sort();
    assert_eq!(refs, ["pull-a", "push-b"]);
    let only = s
        .list_statuses(&Filter::parse("ref~=^pull").unwrap())
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!((only[0].reference.as_str(), only[0].offset), ("pull-a", 1));
}

/// Expands to one `#[test]` per conformance case, each with a fresh harness.
#[macro_export]
macro_rules! content_store_conformance {
    ($make:expr) => {
        $crate::content_store_conformance!(@cases $make;
            write_and_commit, resume_after_reopen, commit_existing_blob,
            size_mismatch_discards, digest_mismatch_discards, abort, truncate,
            labels_update, walk_with_filters, delete, two_writers_one_ref,
            concurrent_writers, list_statuses);
    };
    (@cases $make:expr; $($case:ident),*) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $case() {
                    let make = $make;
                    $crate::content::testsuite::$case(make());
                }
            )*
        }
    };
}
