//! A streaming tar reader over the decompressed layer.
//!
//! The `tar` crate decodes the header fields, but the stream framing is done
//! here because `tar::Archive` hides what an applier needs: it splits PAX
//! records on '\n' (so a binary `SCHILY.xattr.security.capability` value
//! holding a 0x0a byte is dropped), it fills GNU sparse holes with zeros
//! without exposing the extension-block map, it does not know the PAX sparse
//! formats, and a short data section just reads as EOF.

use std::collections::BTreeMap;
use std::io::{self, BufRead};

use tar::Header;

use super::compression::stream_error;
use super::{ArchiveError, Compression};

const BLOCK: u64 = 512;
/// Bound on one PAX header, GNU long name or sparse map held in memory
/// (Go's archive/tar `maxSpecialFileSize`). An entry's PAX records come
/// from one header, so this also bounds the values of its xattrs together.
const MAX_META: u64 = 1 << 20;
/// Linux's XATTR_LIST_MAX: one file's xattr names, each with its NUL.
/// More could never be set, so an entry that asks for more is refused.
const MAX_XATTR_NAMES: usize = 65536;
/// Linux's XATTR_SIZE_MAX: one xattr value.
const MAX_XATTR_VALUE: usize = 65536;
/// Linux's XATTR_NAME_MAX: one xattr name.
const MAX_XATTR_NAME: usize = 255;
/// Names longer than this (PATH_MAX) are cut short in errors and logs.
const MAX_SHOWN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(super) struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// Extended attributes as (name, value) pairs.
pub(super) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A data fragment of a sparse file; everything outside the fragments is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    pub atime: Option<Time>,
    pub major: u32,
    pub minor: u32,
    pub xattrs: Xattrs,
    /// The file's logical size (the real size for a sparse file).
    pub size: u64,
    /// The data fragments, in stream order, for a sparse file.
    pub sparse: Option<Vec<Segment>>,
}

impl Entry {
    pub fn display(&self) -> String {
        show_name(&self.name)
    }
}

/// A tar name for errors and logs; a hostile one may be a megabyte long.
pub(super) fn show_name(name: &[u8]) -> String {
    if name.len() <= MAX_SHOWN {
        return String::from_utf8_lossy(name).into_owned();
    }
    format!(
        "{}... ({} bytes)",
        String::from_utf8_lossy(&name[..256]),
        name.len()
    )
}

/// The records of one PAX `x` header. A later `x` header replaces an
/// earlier one's records rather than adding to them, as in Go's
/// archive/tar, so what an entry carries is bounded by one header.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<Time>,
    atime: Option<Time>,
    /// A map, so a repeated name costs a lookup, not a scan.
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of the xattr names list (names and NULs) Linux would keep.
    xattr_names: usize,
    /// Why these xattrs cannot be set; reported against the entry they
    /// describe, whose name may come after them.
    xattr_refusal: Option<String>,
    sparse_major: Option<Vec<u8>>,
    sparse_minor: Option<Vec<u8>>,
    sparse_name: Option<Vec<u8>>,
    sparse_map: Option<Vec<u8>>,
    sparse_size: Option<u64>,
    sparse_realsize: Option<u64>,
    /// Format 0.0 repeats `GNU.sparse.offset`/`numbytes` records in order.
    sparse_pairs: Vec<u64>,
}

impl Pax {
    fn add_xattr(&mut self, name: &[u8], value: &[u8]) {
        if self.xattr_refusal.is_some() {
            return;
        }
        let refusal = if name.len() > MAX_XATTR_NAME {
            Some(format!(
                "xattr name of {} bytes is longer than Linux's limit of {MAX_XATTR_NAME}",
                name.len()
            ))
        } else if value.len() > MAX_XATTR_VALUE {
            Some(format!(
                "xattr {} has a value of {} bytes, more than Linux's limit of {MAX_XATTR_VALUE}",
                String::from_utf8_lossy(name),
                value.len()
            ))
        } else if !self.xattrs.contains_key(name)
            && self.xattr_names + name.len() + 1 > MAX_XATTR_NAMES
        {
            Some(format!(
                "xattr names take more than the {MAX_XATTR_NAMES} bytes Linux keeps for one file \
                 ({} names so far)",
                self.xattrs.len()
            ))
        } else {
            None
        };
        if refusal.is_some() {
            self.xattr_refusal = refusal;
            self.xattrs = BTreeMap::new();
            return;
        }
        if self.xattrs.insert(name.to_vec(), value.to_vec()).is_none() {
            self.xattr_names += name.len() + 1;
        }
    }
}

pub(super) struct TarReader<R> {
    inner: R,
    compression: Compression,
    /// Unread data bytes of the current entry.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// The current entry's name, for errors.
    current: String,
    /// Skips bytes without reading them, where the stream can (a file).
    seek: Option<Seek<R>>,
}

/// Skips up to `n` bytes of the stream; returns how many there were.
pub(super) type Seek<R> = fn(&mut R, u64) -> io::Result<u64>;

impl<R: BufRead> TarReader<R> {
    pub fn new(inner: R, compression: Compression) -> Self {
        TarReader {
            inner,
            compression,
            remaining: 0,
            padding: 0,
            current: String::new(),
            seek: None,
        }
    }

    /// Data the caller does not read is skipped with `seek`.
    pub fn with_seek(mut self, seek: Seek<R>) -> Self {
        self.seek = Some(seek);
        self
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next entry's headers; `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ArchiveError> {
        self.skip_rest()?;
        let mut pax: Option<Pax> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let mut block = [0u8; BLOCK as usize];
            let pending = pax.is_some() || long_name.is_some() || long_link.is_some();
            let read = self.read_block(&mut block)?;
            if !read || is_zero(&block) {
                if pending {
                    return Err(self.truncated("extended header is not followed by an entry"));
                }
                if read {
                    self.end_of_archive()?;
                }
                return Ok(None);
            }
            let mut header = Header::new_old();
            header.as_mut_bytes().copy_from_slice(&block);
            let name = show_name(&header.path_bytes());
            check_sum(&block).map_err(|reason| malformed(&name, reason))?;
            let size = field(&block, 124..136, "size").map_err(|r| malformed(&name, r))?;
            self.current = name;
            match block[156] {
                b'x' => {
                    let data = self.read_meta(size, "PAX header")?;
                    pax = Some(parse_pax(&data).map_err(|r| self.malformed(r))?);
                }
                b'g' => {
                    // Go's archive/tar hands a global header to its caller as
                    // an entry of its own (which containerd ignores), so the
                    // extended headers before it describe nothing.
                    let data = self.read_meta(size, "PAX global header")?;
                    pax_records(&data, |_, _| Ok(())).map_err(|r| self.malformed(r))?;
                    (pax, long_name, long_link) = (None, None, None);
                }
                b'L' => long_name = Some(trim_nul(self.read_meta(size, "GNU long name")?)),
                b'K' => long_link = Some(trim_nul(self.read_meta(size, "GNU long link")?)),
                typeflag => {
                    return self
                        .finish_entry(
                            &header,
                            typeflag,
                            size,
                            pax.unwrap_or_default(),
                            long_name,
                            long_link,
                        )
                        .map(Some);
                }
            }
        }
    }

    /// After a zero block: a second one (or the end of the stream) ends the
    /// archive, as in Go's archive/tar; a header there is an error rather
    /// than entries that hoist would skip and a scanner might read.
    fn end_of_archive(&mut self) -> Result<(), ArchiveError> {
        let mut block = [0u8; BLOCK as usize];
        if self.read_block(&mut block)? && !is_zero(&block) {
            self.current = show_name(&Header::from_byte_slice(&block).path_bytes());
            return Err(self.malformed("a zero block is followed by a non-zero block"));
        }
        Ok(())
    }

    fn finish_entry(
        &mut self,
        header: &Header,
        typeflag: u8,
        size: u64,
        pax: Pax,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Entry, ArchiveError> {
        // Which name wins is Go's archive/tar's order (GNU long names over
        // PAX paths, an empty value meaning none), so that hoist writes the
        // files a scanner reading the layer with it sees.
        let given = |v: &Option<Vec<u8>>| v.clone().filter(|v| !v.is_empty());
        let mut name = given(&long_name)
            .or_else(|| given(&pax.path))
            .unwrap_or_else(|| header.path_bytes().into_owned());
        self.current = show_name(&name);
        let link = given(&long_link)
            .or_else(|| given(&pax.linkpath))
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()))
            .unwrap_or_default();
        let kind = match typeflag {
            // A NUL typeflag is old tar: a trailing slash marks a directory.
            b'\0' if name.ends_with(b"/") => Kind::Dir,
            b'0' | b'\0' | b'7' | b'S' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(ArchiveError::UnsupportedType {
                    path: self.current.clone(),
                    typeflag: char::from(other),
                });
            }
        };
        // Only a file read as PAX sparse takes its real name from the map's
        // records.
        if kind == Kind::File
            && typeflag != b'S'
            && pax_sparse_format(&pax).is_some()
            && let Some(n) = given(&pax.sparse_name)
        {
            name = n;
            self.current = show_name(&name);
        }
        if let Some(reason) = pax.xattr_refusal {
            return Err(ArchiveError::Refused {
                path: self.current.clone(),
                reason,
            });
        }
        let block = header.as_bytes();
        let num = |range, what: &str| field(block, range, what).map_err(|r| self.malformed(r));
        let id = |pax: Option<u64>, range, what: &str| {
            let v = match pax {
                Some(v) => v,
                None => num(range, what)?,
            };
            u32::try_from(v).map_err(|_| self.malformed(format!("{what} {v} is out of range")))
        };
        let uid = id(pax.uid, 108..116, "uid")?;
        let gid = id(pax.gid, 116..124, "gid")?;
        let mode = num(100..108, "mode")? as u32 & 0o7777;
        let seconds = |s: u64| Time {
            sec: i64::try_from(s).unwrap_or(i64::MAX),
            nsec: 0,
        };
        let mtime = match pax.mtime {
            Some(t) => t,
            None => seconds(num(136..148, "mtime")?),
        };
        // Only GNU headers have an atime field there (ustar keeps a name prefix).
        let atime = match pax.atime {
            Some(t) => Some(t),
            None if header.as_gnu().is_some() && block[345] != 0 => {
                Some(seconds(num(345..357, "atime")?))
            }
            None => None,
        };
        let (mut major, mut minor) = (0, 0);
        if matches!(kind, Kind::Char | Kind::Block) {
            let dev = |range, what| {
                let v = num(range, what)?;
                u32::try_from(v).map_err(|_| self.malformed(format!("{what} {v} is out of range")))
            };
            major = dev(329..337, "device major")?;
            minor = dev(337..345, "device minor")?;
        }
        // Header-only types carry no data whatever their size field says
        // (POSIX, and Go's archive/tar which containerd uses).
        let data = match kind {
            Kind::File => pax.size.unwrap_or(size),
            _ => 0,
        };
        self.remaining = data;
        self.padding = self.padding_for(data)?;

        let mut file_size = data;
        let mut sparse = None;
        if typeflag == b'S' {
            let (map, real) = self.gnu_sparse_map(header)?;
            file_size = real;
            sparse = Some(map);
        } else if kind == Kind::File
            && let Some((map, real)) = self.pax_sparse_map(&pax)?
        {
            file_size = real;
            sparse = Some(map);
        }
        if let Some(map) = &sparse {
            self.check_sparse(map, file_size)?;
        }
        Ok(Entry {
            name,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime,
            atime,
            major,
            minor,
            xattrs: pax.xattrs.into_iter().collect(),
            size: file_size,
            sparse,
        })
    }

    /// The old GNU sparse map: four slots in the header, then extension
    /// blocks of 21 while the "is extended" flag is set.
    fn gnu_sparse_map(&mut self, header: &Header) -> Result<(Vec<Segment>, u64), ArchiveError> {
        let Some(gnu) = header.as_gnu() else {
            return Err(self.malformed("GNU sparse entry without a GNU header"));
        };
        let mut map = Vec::new();
        for s in &gnu.sparse {
            if s.offset[0] == 0 {
                break;
            }
            map.push(self.segment(&s.offset, &s.numbytes)?);
        }
        let real = gnu
            .real_size()
            .map_err(|e| self.malformed(format!("bad sparse real size: {e}")))?;
        let mut extended = gnu.isextended[0] != 0;
        while extended {
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                return Err(self.truncated("sparse extension header is missing"));
            }
            for slot in block[..504].chunks_exact(24) {
                if slot[0] == 0 {
                    break;
                }
                map.push(self.segment(&slot[..12], &slot[12..])?);
                if map.len() as u64 > MAX_META / 24 {
                    return Err(self.malformed("sparse map is too large"));
                }
            }
            extended = block[504] != 0;
        }
        Ok((map, real))
    }

    fn segment(&self, offset: &[u8], len: &[u8]) -> Result<Segment, ArchiveError> {
        match (parse_numeric(offset), parse_numeric(len)) {
            (Some(offset), Some(len)) => Ok(Segment { offset, len }),
            _ => Err(self.malformed("bad sparse map entry")),
        }
    }

    /// The PAX sparse formats 0.0, 0.1 and 1.0 written by GNU tar; detected
    /// the way Go's archive/tar does, and unknown versions are read as
    /// plain files like it does.
    fn pax_sparse_map(&mut self, pax: &Pax) -> Result<Option<(Vec<Segment>, u64)>, ArchiveError> {
        let Some(format) = pax_sparse_format(pax) else {
            return Ok(None);
        };
        let real = match pax.sparse_size.or(pax.sparse_realsize) {
            Some(r) => r,
            None => return Err(self.malformed("sparse file without GNU.sparse size")),
        };
        let numbers: Vec<u64> = match format {
            b"0.0" | b"0.1" => {
                if let Some(m) = &pax.sparse_map {
                    let mut v = Vec::new();
                    for n in m.split(|&b| b == b',') {
                        v.push(
                            parse_decimal(n).ok_or_else(|| self.malformed("bad GNU.sparse.map"))?,
                        );
                    }
                    v
                } else {
                    pax.sparse_pairs.clone()
                }
            }
            _ => self.sparse_map_1_0()?,
        };
        if !numbers.len().is_multiple_of(2) {
            return Err(self.malformed("sparse map has an odd number of values"));
        }
        let map = numbers
            .chunks_exact(2)
            .map(|p| Segment {
                offset: p[0],
                len: p[1],
            })
            .collect();
        Ok(Some((map, real)))
    }

    /// Format 1.0 keeps the map at the start of the data: decimal numbers,
    /// one per line (count, then offset/size pairs), padded to a block.
    fn sparse_map_1_0(&mut self) -> Result<Vec<u64>, ArchiveError> {
        let mut text = Vec::new();
        let mut pos = 0;
        let count = self.map_number(&mut text, &mut pos)?;
        if count > MAX_META / 4 {
            return Err(self.malformed("sparse map is too large"));
        }
        let mut numbers = Vec::new();
        for _ in 0..count * 2 {
            numbers.push(self.map_number(&mut text, &mut pos)?);
        }
        Ok(numbers)
    }

    fn map_number(&mut self, text: &mut Vec<u8>, pos: &mut usize) -> Result<u64, ArchiveError> {
        // Where the search for the newline resumes: each byte is looked at once.
        let mut scanned = *pos;
        loop {
            if let Some(nl) = text[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + nl;
                let n = parse_decimal(&text[*pos..end])
                    .ok_or_else(|| self.malformed("bad number in sparse map"))?;
                *pos = end + 1;
                return Ok(n);
            }
            scanned = text.len();
            if text.len() as u64 >= MAX_META {
                return Err(self.malformed("sparse map is too large"));
            }
            // The map is whole blocks of the data section.
            let mut block = [0u8; BLOCK as usize];
            let mut got = 0;
            while got < block.len() {
                let n = self.read_data(&mut block[got..])?;
                if n == 0 {
                    return Err(self.malformed("sparse map runs past the entry data"));
                }
                got += n;
            }
            text.extend_from_slice(&block);
        }
    }

    fn check_sparse(&self, map: &[Segment], real: u64) -> Result<(), ArchiveError> {
        let mut end = 0u64;
        let mut total = 0u64;
        for s in map {
            let seg_end = s.offset.checked_add(s.len);
            match seg_end {
                Some(e) if s.offset >= end && e <= real => end = e,
                _ => {
                    return Err(
                        self.malformed("sparse map entries overlap or exceed the file size")
                    );
                }
            }
            total = total.saturating_add(s.len);
        }
        if total != self.remaining {
            return Err(self.malformed(format!(
                "sparse map covers {total} bytes but the entry holds {}",
                self.remaining
            )));
        }
        Ok(())
    }

    /// Reads the current entry's data; `Ok(0)` once all of it was read.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = loop {
            match io::Read::read(&mut self.inner, &mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.stream(e)),
            }
        };
        if n == 0 {
            return Err(self.truncated(&format!("data ends {} bytes early", self.remaining)));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Skips what is left of the current entry: its data, then its padding
    /// (a stream that ends inside the final padding is accepted, as Go does).
    fn skip_rest(&mut self) -> Result<(), ArchiveError> {
        let data = std::mem::take(&mut self.remaining);
        if self.discard(data)? < data {
            return Err(self.truncated(&format!("data ends {data} bytes early")));
        }
        let pad = std::mem::take(&mut self.padding);
        self.discard(pad)?;
        Ok(())
    }

    /// Bytes of padding after `size` bytes of data.
    fn padding_for(&self, size: u64) -> Result<u64, ArchiveError> {
        size.checked_next_multiple_of(BLOCK)
            .map(|end| end - size)
            .ok_or_else(|| self.malformed(format!("size {size} is too large")))
    }

    /// Discards up to `n` bytes; returns how many there were.
    fn discard(&mut self, mut n: u64) -> Result<u64, ArchiveError> {
        if let Some(seek) = self.seek {
            return seek(&mut self.inner, n).map_err(|e| self.stream(e));
        }
        let start = n;
        while n > 0 {
            let avail = match self.inner.fill_buf() {
                Ok(b) => b.len(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.stream(e)),
            };
            if avail == 0 {
                break;
            }
            let k = avail.min(usize::try_from(n).unwrap_or(usize::MAX));
            self.inner.consume(k);
            n -= k as u64;
        }
        Ok(start - n)
    }

    /// Reads one 512-byte block; `false` on a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; BLOCK as usize]) -> Result<bool, ArchiveError> {
        let mut got = 0;
        while got < block.len() {
            match io::Read::read(&mut self.inner, &mut block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(self.truncated("a header block is cut short")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.stream(e)),
            }
        }
        Ok(true)
    }

    /// Reads a bounded metadata entry's data (PAX records, GNU long names).
    fn read_meta(&mut self, size: u64, what: &str) -> Result<Vec<u8>, ArchiveError> {
        if size > MAX_META {
            return Err(self.malformed(format!("{what} of {size} bytes is too large")));
        }
        self.remaining = size;
        self.padding = self.padding_for(size)?;
        let mut data = vec![0u8; size as usize];
        let mut got = 0;
        while got < data.len() {
            got += self.read_data(&mut data[got..])?;
        }
        self.skip_rest()?;
        Ok(data)
    }

    fn stream(&self, e: io::Error) -> ArchiveError {
        stream_error(e, self.compression).unwrap_or_else(|e| ArchiveError::Io {
            op: "reading layer".into(),
            path: self.current.clone(),
            source: e,
        })
    }

    fn truncated(&self, reason: &str) -> ArchiveError {
        ArchiveError::Truncated {
            path: self.current.clone(),
            reason: reason.to_string(),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> ArchiveError {
        malformed(&self.current, reason)
    }
}

fn malformed(path: &str, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Malformed {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// The PAX sparse format (0.0, 0.1 or 1.0) an entry's records give;
/// `None` for a plain file, unknown versions included.
fn pax_sparse_format(pax: &Pax) -> Option<&'static [u8]> {
    match (&pax.sparse_major, &pax.sparse_minor) {
        (Some(ma), Some(mi)) => match (ma.as_slice(), mi.as_slice()) {
            (b"0", b"0") => Some(b"0.0"),
            (b"0", b"1") => Some(b"0.1"),
            (b"1", b"0") => Some(b"1.0"),
            _ => None,
        },
        _ if pax.sparse_name.is_some() && pax.sparse_map.is_some() => Some(b"0.1"),
        _ if pax.sparse_size.is_some() => Some(b"0.0"),
        _ => None,
    }
}

/// Header checksum: the byte sum with the checksum field read as spaces.
/// Some old writers summed signed bytes; both are accepted, as Go does.
fn check_sum(block: &[u8; BLOCK as usize]) -> Result<(), String> {
    let field = &block[148..156];
    let stored = parse_numeric(field).ok_or("bad checksum field")?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {stored}, computed {unsigned}); not a tar stream?"
        ))
    }
}

/// A numeric header field; an empty field (all NULs or spaces) is zero,
/// as old writers leave unused fields blank.
fn field(block: &[u8], range: std::ops::Range<usize>, what: &str) -> Result<u64, String> {
    let f = &block[range];
    if f.iter().all(|&b| b == 0 || b == b' ') {
        return Ok(0);
    }
    parse_numeric(f).ok_or_else(|| format!("bad {what} field {:?}", String::from_utf8_lossy(f)))
}

fn is_zero(block: &[u8; BLOCK as usize]) -> bool {
    block.iter().all(|&b| b == 0)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(i) = v.iter().position(|&b| b == 0) {
        v.truncate(i);
    }
    v
}

/// A numeric header field: octal (space/NUL padded) or GNU base-256.
pub(super) fn parse_numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // Negative base-256 values are not meaningful for these fields.
        if field[0] & 0x40 != 0 {
            return None;
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let trimmed: &[u8] = {
        let start = field.iter().position(|&b| b != b' ' && b != 0)?;
        let rest = &field[start..];
        let end = rest
            .iter()
            .position(|&b| b == b' ' || b == 0)
            .unwrap_or(rest.len());
        &rest[..end]
    };
    let mut v: u64 = 0;
    for &b in trimmed {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// A PAX time, `[-]seconds[.fraction]`. Times before the epoch (or past
/// what nanoseconds in an i64 can hold) become the epoch, as containerd
/// bounds them.
fn parse_pax_time(s: &[u8]) -> Option<Time> {
    let (neg, s) = match s.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = match s.iter().position(|&b| b == b'.') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &b""[..]),
    };
    let sec = parse_decimal(secs)?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |&b| u32::from(b - b'0'));
    }
    if neg || sec > (i64::MAX as u64) / 1_000_000_000 {
        return Some(Time::default());
    }
    Some(Time {
        sec: sec as i64,
        nsec,
    })
}

/// Parses one `x` header's PAX records.
fn parse_pax(data: &[u8]) -> Result<Pax, String> {
    let mut pax = Pax::default();
    pax_records(data, |key, value| pax_record(key, value, &mut pax))?;
    Ok(pax)
}

/// Walks PAX records (`"<len> <key>=<value>\n"`) by their length prefix,
/// so values may hold any byte, newlines included.
fn pax_records(
    data: &[u8],
    mut record: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        // Some writers pad the record block with NULs.
        if rest[0] == 0 && rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let len = parse_decimal(&rest[..sp]).ok_or("bad PAX record length")? as usize;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("bad PAX record length".into());
        }
        let body = &rest[sp + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        record(&body[..eq], &body[eq + 1..])?;
        rest = &rest[len..];
    }
    Ok(())
}

fn pax_record(key: &[u8], value: &[u8], pax: &mut Pax) -> Result<(), String> {
    let bad = || format!("bad PAX {} value", String::from_utf8_lossy(key));
    let num = || parse_decimal(value).ok_or_else(bad);
    let time = || parse_pax_time(value).ok_or_else(bad);
    match key {
        b"path" => pax.path = Some(value.to_vec()),
        b"linkpath" => pax.linkpath = Some(value.to_vec()),
        b"size" => pax.size = Some(num()?),
        b"uid" => pax.uid = Some(num()?),
        b"gid" => pax.gid = Some(num()?),
        b"mtime" => pax.mtime = Some(time()?),
        b"atime" => pax.atime = Some(time()?),
        b"GNU.sparse.major" => pax.sparse_major = Some(value.to_vec()),
        b"GNU.sparse.minor" => pax.sparse_minor = Some(value.to_vec()),
        b"GNU.sparse.name" => pax.sparse_name = Some(value.to_vec()),
        b"GNU.sparse.map" => pax.sparse_map = Some(value.to_vec()),
        b"GNU.sparse.size" => pax.sparse_size = Some(num()?),
        b"GNU.sparse.realsize" => pax.sparse_realsize = Some(num()?),
        b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
            if pax.sparse_pairs.len() as u64 >= MAX_META / 8 {
                return Err("sparse map is too large".into());
            }
            pax.sparse_pairs.push(num()?);
        }
        _ => {
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.is_empty() || name.contains(&0) {
                    return Err("bad xattr name in PAX header".into());
                }
                pax.add_xattr(name, value);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One PAX record, its length prefix counting itself.
    fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
        let body = [key, b"=", value, b"\n"].concat();
        let mut len = body.len() + 2;
        while format!("{len} ").len() + body.len() != len {
            len += 1;
        }
        [format!("{len} ").as_bytes(), &body].concat()
    }

    /// 15-byte names: 4096 of them with their NULs fill XATTR_LIST_MAX.
    fn names(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| record(format!("SCHILY.xattr.user.{i:010}").as_bytes(), b"v"))
            .collect()
    }

    #[test]
    fn xattrs_are_capped_at_what_linux_keeps() {
        let full = parse_pax(&names(4096)).unwrap();
        assert_eq!((full.xattrs.len(), full.xattr_names), (4096, 65536));
        assert_eq!(full.xattr_refusal, None);
        // A repeated name replaces its value and takes no more room.
        let again = [names(4096), record(b"SCHILY.xattr.user.0000000000", b"w")].concat();
        let again = parse_pax(&again).unwrap();
        assert_eq!(again.xattr_refusal, None);
        assert_eq!(again.xattrs[&b"user.0000000000"[..]], b"w");

        let over = parse_pax(&names(4097)).unwrap();
        let why = over.xattr_refusal.unwrap_or_default();
        assert!(why.contains("65536"), "{why}");
        assert!(over.xattrs.is_empty(), "nothing kept once refused");

        let value = |len: usize| record(b"SCHILY.xattr.user.big", &vec![b'x'; len]);
        assert_eq!(parse_pax(&value(65536)).unwrap().xattr_refusal, None);
        let why = parse_pax(&value(65537)).unwrap().xattr_refusal;
        assert!(why.is_some_and(|w| w.contains("user.big")));

        let name = |len: usize| record(format!("SCHILY.xattr.{}", "n".repeat(len)).as_bytes(), b"");
        assert_eq!(parse_pax(&name(255)).unwrap().xattr_refusal, None);
        assert!(parse_pax(&name(256)).unwrap().xattr_refusal.is_some());
    }

    #[test]
    fn pax_records_keep_binary_values() {
        let value = b"\x01\x00\x00\x02\x0a\x00\x00\x00";
        let mut rec = Vec::new();
        for (k, v) in [
            (&b"SCHILY.xattr.security.capability"[..], &value[..]),
            (b"path", b"a/b"),
            (b"mtime", b"1700000000.5"),
        ] {
            let body = [k, b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            while format!("{len} ").len() + body.len() != len {
                len += 1;
            }
            rec.extend_from_slice(format!("{len} ").as_bytes());
            rec.extend_from_slice(&body);
        }
        let pax = parse_pax(&rec).unwrap();
        assert_eq!(
            pax.xattrs.into_iter().collect::<Vec<_>>(),
            vec![(b"security.capability".to_vec(), value.to_vec())]
        );
        assert_eq!(pax.path.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(
            pax.mtime,
            Some(Time {
                sec: 1_700_000_000,
                nsec: 500_000_000
            })
        );
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"9 pathx\n").is_err());
    }

    #[test]
    fn pax_times() {
        let t = |s: &str| parse_pax_time(s.as_bytes());
        assert_eq!(t("12"), Some(Time { sec: 12, nsec: 0 }));
        assert_eq!(
            t("12.123456789123"),
            Some(Time {
                sec: 12,
                nsec: 123_456_789
            })
        );
        assert_eq!(
            t("12.03"),
            Some(Time {
                sec: 12,
                nsec: 30_000_000
            })
        );
        assert_eq!(t("-5.5"), Some(Time::default()));
        assert_eq!(t("x"), None);
        assert_eq!(t("1.x"), None);
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"  644 \0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0"), None);
        assert_eq!(parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0x01, 0x00]), Some(256));
        assert_eq!(parse_numeric(b"0009"), None);
    }
}
