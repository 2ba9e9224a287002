//! A mounted tree, entry by entry, for comparing two unpacks of one image.

use hoist::digest::Digest;
use std::collections::BTreeMap;
use std::path::Path;

/// Everything a tree says about each path: type, mode, owner, times,
/// size, device, link target, content digest and xattrs.
pub fn full_tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("link:{}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if m.is_file() {
                format!("file:{}", Digest::of(&std::fs::read(&path).unwrap()))
            } else {
                format!("special:{}", m.rdev())
            };
            let mtime = if m.file_type().is_symlink() {
                0
            } else {
                m.mtime() * 1_000_000_000 + m.mtime_nsec()
            };
            out.insert(
                rel,
                format!(
                    "{what} mode={:o} uid={} gid={} mtime={mtime} size={} xattrs={:?}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    if m.is_dir() { 0 } else { m.size() },
                    xattrs(&path)
                ),
            );
        }
    }
    out
}

pub fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: llistxattr/lgetxattr into buffers of the given sizes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        value.truncate(len.max(0) as usize);
        out.push((String::from_utf8_lossy(name).to_string(), value));
    }
    out.sort();
    out
}
