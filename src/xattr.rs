//! Extended attributes of one path or fd, without following a final
//! symlink: the layer applier sets them, the native snapshotter copies them.
//! The calls are the `xattr` crate's (its path calls are the `l*` ones);
//! paths come as C strings because the applier builds `/proc/self/fd/…`
//! paths that way.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use xattr::FileExt;

fn as_path(path: &CString) -> &Path {
    Path::new(OsStr::from_bytes(path.to_bytes()))
}

/// `path` as the C string the calls take.
pub(crate) fn path_cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Copies every attribute of `src` onto `dst`.
pub(crate) fn copy_all(src: &CString, dst: &CString) -> io::Result<()> {
    for name in llistxattr(src)? {
        let named = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("{what} {}: {e}", String::from_utf8_lossy(&name)),
            )
        };
        // Gone between the list and the read: nothing to copy.
        if let Some(value) = lgetxattr(src, &name).map_err(|e| named(e, "reading"))? {
            lsetxattr(dst, &name, &value).map_err(|e| named(e, "setting"))?;
        }
    }
    Ok(())
}

/// `lsetxattr(2)`.
pub(crate) fn lsetxattr(path: &CString, name: &[u8], value: &[u8]) -> io::Result<()> {
    xattr::set(as_path(path), OsStr::from_bytes(name), value)
}

/// `fsetxattr(2)`. The crate sets attributes on a `File` only, so this
/// works on a duplicate of `fd`: entries with xattrs are few in a layer,
/// and a dup and a close are cheap next to the apply.
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    File::from(fd.try_clone_to_owned()?).set_xattr(OsStr::from_bytes(name), value)
}

/// `lgetxattr(2)`; `None` when the attribute is absent.
pub(crate) fn lgetxattr(path: &CString, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    xattr::get(as_path(path), OsStr::from_bytes(name))
}

/// `llistxattr(2)`: the attribute names.
pub(crate) fn llistxattr(path: &CString) -> io::Result<Vec<Vec<u8>>> {
    Ok(xattr::list(as_path(path))?
        .map(std::ffi::OsString::into_vec)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A `user.` attribute where the filesystem takes them; tmpfs and
    /// ext4 do, so a refusal is a skip only for an exotic test directory.
    fn supported(path: &CString) -> bool {
        match lsetxattr(path, b"user.hoist.probe", b"") {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                eprintln!("skipped: no user xattrs here");
                false
            }
            Err(e) => panic!("probing user xattrs: {e}"),
        }
    }

    #[test]
    fn set_get_list_copy_and_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (file, copy) = (dir.path().join("f"), dir.path().join("g"));
        std::fs::write(&file, b"x").expect("writes");
        std::fs::write(&copy, b"y").expect("writes");
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).expect("a symlink");
        let (f, g, l) = (
            path_cstr(&file).expect("a path"),
            path_cstr(&copy).expect("a path"),
            path_cstr(&link).expect("a path"),
        );
        if !supported(&f) {
            return;
        }
        let value = b"\0\x01binary".as_slice();
        lsetxattr(&f, b"user.hoist", value).expect("set");
        let opened = File::open(&file).expect("opens");
        fsetxattr(opened.as_fd(), b"user.hoist.fd", b"by fd").expect("set by fd");
        assert_eq!(
            lgetxattr(&f, b"user.hoist").expect("get").as_deref(),
            Some(value)
        );
        assert_eq!(lgetxattr(&f, b"user.absent").expect("get"), None);
        let mut names = llistxattr(&f).expect("list");
        names.sort();
        assert_eq!(
            names,
            [&b"user.hoist"[..], b"user.hoist.fd", b"user.hoist.probe"]
        );

        // Through the symlink, the link's own (none), never its target's;
        // setting a user attribute on a symlink is refused.
        assert_eq!(lgetxattr(&l, b"user.hoist").expect("get"), None);
        assert!(llistxattr(&l).expect("list").is_empty());
        assert!(lsetxattr(&l, b"user.hoist", b"v").is_err());

        copy_all(&f, &g).expect("copies");
        assert_eq!(
            lgetxattr(&g, b"user.hoist").expect("get").as_deref(),
            Some(value)
        );
        assert_eq!(
            lgetxattr(&g, b"user.hoist.fd").expect("get").as_deref(),
            Some(&b"by fd"[..])
        );

        // A name the kernel refuses is an error that says which one.
        let err = copy_all(&f, &l).expect_err("a symlink takes no user xattrs");
        assert!(err.to_string().contains("setting user.hoist"), "{err}");
    }
}
