//! Extended attributes of one path or fd, without following a final
//! symlink: the layer applier sets them, the native snapshotter copies them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `path` as the C string the calls take.
pub(crate) fn path_cstr(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    cstr(path.as_os_str().as_bytes())
}

/// Copies every attribute of `src` onto `dst`.
pub(crate) fn copy_all(src: &CString, dst: &CString) -> io::Result<()> {
    for name in llistxattr(src)? {
        // Gone between the list and the read: nothing to copy.
        if let Some(value) = lgetxattr(src, &name)? {
            lsetxattr(dst, &name, &value).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("setting {}: {e}", String::from_utf8_lossy(&name)),
                )
            })?;
        }
    }
    Ok(())
}

fn status(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lsetxattr(2)`.
pub(crate) fn lsetxattr(path: &CString, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: both strings are NUL-terminated and the value pointer/length
    // describe a live slice.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    status(rc)
}

/// `fsetxattr(2)`.
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: the fd is live, the name is NUL-terminated and the value
    // pointer/length describe a live slice.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    status(rc)
}

/// `lgetxattr(2)`; `None` when the attribute is absent.
pub(crate) fn lgetxattr(path: &CString, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let name = cstr(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: the buffer pointer/length describe a live, writable Vec.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(err),
        }
    }
}

/// `llistxattr(2)`: the attribute names.
pub(crate) fn llistxattr(path: &CString) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: the buffer pointer/length describe a live, writable Vec.
        let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 22) => buf.resize(buf.len() * 4, 0),
            _ => return Err(err),
        }
    }
}
