//! Indexing a layer instead of applying it: the uncompressed tar is kept
//! as it streams by (`layer.tar`), its headers are parsed into a tree
//! (`index_tree.rs`), and an EROFS metadata image (`layer.erofs`) that
//! maps each regular file to its bytes inside the tar is written when the
//! stream ends. No file of the layer is created; the kernel mounts the pair.

use std::fs::File;
use std::io::{self, BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::compression::{self, HashingReader};
use super::index_tree::{Below, Builder, Staging};
use super::whiteout::Lowers;
use super::{Applied, ArchiveError, BUF_SIZE, Compression};
use crate::erofs::tree::Spill;

/// The layer's uncompressed tar, the image's second device.
pub const LAYER_TAR: &str = "layer.tar";
/// The EROFS metadata image.
pub const LAYER_IMAGE: &str = "layer.erofs";
/// Bytes that cannot be read in place, while the image is being made.
const STAGING: &str = "layer.staging";
/// A rewritten image before it replaces the old one.
const IMAGE_TMP: &str = "layer.erofs.tmp";
/// The index, once it outgrows [`INDEX_MEMORY`].
const SPILL: &str = "layer.index";
/// Memory a layer's index may take before it moves to disk: about 130,000
/// entries.
pub const INDEX_MEMORY: usize = 32 << 20;

/// What is below the layer being indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexBelow {
    /// It is the first layer of its chain.
    Nothing,
    /// Not known yet (a parallel unpack): [`Applied::needs_lowers`] says
    /// whether [`reindex_layer`] must run once it is.
    Unknown,
    /// The parents' trees, newest first.
    Lowers(Vec<PathBuf>),
}

/// Decompresses `layer`, hashes the uncompressed stream, keeps it as
/// `dir/layer.tar` and writes `dir/layer.erofs` describing it; both are
/// fsynced before this returns.
pub fn index_layer(
    dir: &Path,
    layer: impl Read,
    compression: Compression,
    below: &IndexBelow,
    userxattr: bool,
) -> Result<Applied, ArchiveError> {
    index_layer_within(dir, layer, compression, below, userxattr, INDEX_MEMORY)
}

/// [`index_layer`] with the index's memory bounded by `memory` bytes.
pub fn index_layer_within(
    dir: &Path,
    layer: impl Read,
    compression: Compression,
    below: &IndexBelow,
    userxattr: bool,
    memory: usize,
) -> Result<Applied, ArchiveError> {
    let tar_path = dir.join(LAYER_TAR);
    let tar_file = create(&tar_path)?;
    let decoded = compression::decoder(layer, compression)?;
    let mut hashed = HashingReader::new(decoded);
    let below = open_below(below, userxattr)?;
    let mut builder = Builder::new(below, userxattr, spill(dir, memory))?;
    let mut staging = Staging::new(dir.join(STAGING));
    let out = BufWriter::with_capacity(1 << 20, Writeback::new(tar_file));
    let mut tee = Tee::new(&mut hashed, Some(out));
    let read = super::read_layer(
        &mut tee,
        None,
        compression,
        &mut builder,
        |b, e, tar| {
            let at = tar.get_ref().consumed;
            b.apply(e, at, tar, &mut staging)
        },
        |_| Ok(()),
    );
    let out = tee.finish().map_err(|err| ArchiveError::Io {
        op: "writing the layer's tar".into(),
        path: tar_path.display().to_string(),
        source: err,
    });
    // A failed write shows up as a failed read; its own error says more.
    let tar_file = match (out, read) {
        (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
        (Ok(f), Ok(())) => f,
    };
    let tar_file = tar_file.ok_or_else(|| ArchiveError::Io {
        op: "writing the layer's tar".into(),
        path: tar_path.display().to_string(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    let (diff_id, uncompressed_size) = hashed.finish();
    let applied = Applied {
        diff_id,
        uncompressed_size,
        entries: builder.entries,
        // A rebase indexes the layer again, whole (`needs_lowers`).
        implicit_dirs: Vec::new(),
        needs_lowers: builder.needs_lowers,
    };
    write_image(
        dir,
        builder,
        &mut staging,
        uncompressed_size,
        &dir.join(LAYER_IMAGE),
    )?;
    sync(&tar_file, &tar_path)?;
    sync_dir(dir)?;
    Ok(applied)
}

/// Rebuilds `dir/layer.erofs` from `dir/layer.tar` now that the layer's
/// `lowers` (newest first) are known: what a parallel index made without
/// them becomes what a sequential one would have made.
pub fn reindex_layer(
    dir: &Path,
    lowers: Vec<PathBuf>,
    userxattr: bool,
) -> Result<(), ArchiveError> {
    let tar_path = dir.join(LAYER_TAR);
    let file = File::open(&tar_path).map_err(|source| ArchiveError::Open {
        what: "layer tar",
        path: tar_path.clone(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ArchiveError::Open {
            what: "layer tar",
            path: tar_path.clone(),
            source,
        })?
        .len();
    let below = open_below(&IndexBelow::Lowers(lowers), userxattr)?;
    let mut builder = Builder::new(below, userxattr, spill(dir, INDEX_MEMORY))?;
    let mut staging = Staging::new(dir.join(STAGING));
    let mut tee = Tee::<_, File>::new(file, None);
    // Only headers (and sparse files' data) are read again: the rest of
    // the kept tar is seeked over.
    super::read_layer(
        &mut tee,
        Some(|tee: &mut &mut Tee<File, File>, n| tee.skip(n)),
        Compression::None,
        &mut builder,
        |b, e, tar| {
            let at = tar.get_ref().consumed;
            b.apply(e, at, tar, &mut staging)
        },
        |_| Ok(()),
    )?;
    let tmp = dir.join(IMAGE_TMP);
    write_image(dir, builder, &mut staging, len, &tmp)?;
    let image = dir.join(LAYER_IMAGE);
    std::fs::rename(&tmp, &image).map_err(|err| ArchiveError::Io {
        op: "replacing the layer's image".into(),
        path: image.display().to_string(),
        source: err,
    })?;
    sync_dir(dir)
}

/// Makes the names of the files made in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    let d = File::open(dir).map_err(|source| ArchiveError::Open {
        what: "snapshot directory",
        path: dir.to_path_buf(),
        source,
    })?;
    sync(&d, dir)
}

fn spill(dir: &Path, budget: usize) -> Spill {
    Spill {
        path: dir.join(SPILL),
        budget,
    }
}

fn open_below(below: &IndexBelow, userxattr: bool) -> Result<Below, ArchiveError> {
    Ok(match below {
        IndexBelow::Nothing => Below::Nothing,
        IndexBelow::Unknown => Below::Unknown,
        IndexBelow::Lowers(paths) if paths.is_empty() => Below::Nothing,
        IndexBelow::Lowers(paths) => Below::Lowers(Lowers::open(paths, userxattr)?),
    })
}

fn create(path: &Path) -> Result<File, ArchiveError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| ArchiveError::Open {
            what: "layer file",
            path: path.to_path_buf(),
            source,
        })
}

fn sync(f: &File, path: &Path) -> Result<(), ArchiveError> {
    f.sync_all().map_err(|err| ArchiveError::Io {
        op: "syncing".into(),
        path: path.display().to_string(),
        source: err,
    })
}

/// Writes the tree's image to `path` (with the staged bytes appended),
/// fsyncs it and drops the staging file.
fn write_image(
    dir: &Path,
    builder: Builder,
    staging: &mut Staging,
    tar_len: u64,
    path: &Path,
) -> Result<(), ArchiveError> {
    // The tree as built: what the root no longer reaches is left out.
    let mut tree = builder.tree;
    let mut image = create(path)?;
    let written =
        crate::erofs::writer::write_image(&mut tree, tar_len, staging.file.as_mut(), &mut image)
            .map_err(|err| ArchiveError::Io {
                op: "writing the layer's EROFS image".into(),
                path: path.display().to_string(),
                source: io::Error::other(err.to_string()),
            });
    let staged = dir.join(STAGING);
    if staging.file.take().is_some() {
        let _ = std::fs::remove_file(&staged);
    }
    written?;
    sync(&image, path)
}

/// Reads through a buffer of its own, copying every byte it reads to `out`
/// (the kept tar) and counting the bytes its reader consumed: the offset in
/// the tar of what the reader sees next.
struct Tee<R, W: Write> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    out: Option<W>,
    consumed: u64,
    failed: Option<io::Error>,
}

impl<R: Read, W: Write> Tee<R, W> {
    fn new(inner: R, out: Option<W>) -> Self {
        Tee {
            inner,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            pos: 0,
            filled: 0,
            out,
            consumed: 0,
            failed: None,
        }
    }

    fn copy_out(&mut self, n: usize, direct: Option<&[u8]>) -> io::Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        // Not `unwrap_or`: the buffer's slice is only valid without `direct`.
        let data = match direct {
            Some(d) => d,
            None => &self.buf[..n],
        };
        if let Err(e) = out.write_all(data) {
            let kind = e.kind();
            self.failed = Some(e);
            return Err(io::Error::new(kind, "writing the layer's tar failed"));
        }
        Ok(())
    }

    /// Flushes what was copied; the write error, if one happened.
    fn finish(self) -> io::Result<Option<W::Inner>>
    where
        W: IntoInnerWriter,
    {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.out {
            Some(w) => w.into_inner_writer().map(Some),
            None => Ok(None),
        }
    }
}

impl Tee<File, File> {
    /// Skips `n` bytes of a kept tar (nothing is copied from it): what is
    /// buffered, then a seek no further than the file's end.
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        use std::io::Seek;
        let buffered = n.min((self.filled - self.pos) as u64);
        self.consume(buffered as usize);
        let rest = n - buffered;
        if rest == 0 {
            return Ok(n);
        }
        let at = self.inner.stream_position()?;
        let len = self.inner.metadata()?.len();
        let step = rest.min(len.saturating_sub(at));
        self.inner.seek(io::SeekFrom::Current(
            i64::try_from(step).unwrap_or(i64::MAX),
        ))?;
        self.consumed += step;
        Ok(buffered + step)
    }
}

/// A writer that hands back what it wraps once flushed.
trait IntoInnerWriter: Write {
    type Inner;
    fn into_inner_writer(self) -> io::Result<Self::Inner>;
}

impl IntoInnerWriter for BufWriter<Writeback> {
    type Inner = File;
    fn into_inner_writer(self) -> io::Result<File> {
        self.into_inner()
            .map(|w| w.file)
            .map_err(|e| e.into_error())
    }
}

/// How much of the kept tar is written before its writeback is started.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// The kept tar, its writeback started as it is written: the fsync before
/// the commit then waits for the last few megabytes, not the whole layer,
/// and the disk works while the layer still decompresses.
struct Writeback {
    file: File,
    written: u64,
    started: u64,
}

impl Writeback {
    fn new(file: File) -> Self {
        Writeback {
            file,
            written: 0,
            started: 0,
        }
    }
}

impl Write for Writeback {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_WINDOW {
            use std::os::fd::AsRawFd;
            let (from, len) = (self.started, self.written - self.started);
            // SAFETY: a plain syscall on an fd this struct owns; the range
            // is what was written. It only starts writeback: a failure
            // (ENOSYS, say) leaves the fsync at commit to do all of it.
            let _ = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    i64::try_from(from).unwrap_or(i64::MAX),
                    i64::try_from(len).unwrap_or(i64::MAX),
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.filled {
            let n = buf.len().min(self.filled - self.pos);
            buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.consume(n);
            return Ok(n);
        }
        let n = self.inner.read(buf)?;
        self.copy_out(n, Some(&buf[..n]))?;
        self.consumed += n as u64;
        Ok(n)
    }
}

impl<R: Read, W: Write> BufRead for Tee<R, W> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.filled {
            let n = self.inner.read(&mut self.buf)?;
            self.copy_out(n, None)?;
            self.pos = 0;
            self.filled = n;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.filled - self.pos);
        self.pos += amt;
        self.consumed += amt as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::Tee;
    use std::io::{BufRead, Read};

    /// Reads larger than the buffer bypass it; every byte reaches the
    /// copy once, in order, and the count is what the reader consumed.
    #[test]
    fn tee_copies_every_byte_once_and_counts_what_was_consumed() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut tee = Tee::new(&data[..], Some(Vec::new()));
        let mut head = [0u8; 700];
        tee.read_exact(&mut head).unwrap();
        assert_eq!(tee.consumed, 700);
        let buffered = tee.fill_buf().unwrap().len();
        tee.consume(100);
        assert_eq!(tee.consumed, 800);
        let mut big = vec![0u8; 600_000];
        let mut got = 0;
        while got < big.len() {
            let n = tee.read(&mut big[got..]).unwrap();
            assert!(n > 0);
            got += n;
        }
        let mut rest = Vec::new();
        tee.read_to_end(&mut rest).unwrap();
        assert_eq!(tee.consumed, data.len() as u64);
        assert!(buffered > 0);
        let mut seen = head.to_vec();
        seen.extend_from_slice(&data[700..800]);
        seen.extend_from_slice(&big);
        seen.extend_from_slice(&rest);
        assert_eq!(seen, data);
        assert_eq!(tee.out.take().unwrap(), data);
    }

    /// A kept tar is skipped by seeking, never past its end.
    #[test]
    fn skipping_a_file_seeks_and_stops_at_its_end() {
        use std::fs::File;
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let mut tee = Tee::<File, File>::new(f, None);
        assert_eq!(tee.fill_buf().unwrap()[0], 0);
        assert_eq!(tee.skip(10).unwrap(), 10);
        assert_eq!(tee.fill_buf().unwrap()[0], data[10]);
        assert_eq!(tee.skip(200_000).unwrap(), 200_000);
        assert_eq!(tee.consumed, 200_010);
        assert_eq!(tee.fill_buf().unwrap()[0], data[200_010]);
        assert_eq!(tee.skip(1_000_000).unwrap(), 99_990);
        assert!(tee.fill_buf().unwrap().is_empty());
    }

    /// A layer that fails after a sparse file was staged leaves only what
    /// it had written of the tar (found by fuzz/tar_index).
    #[test]
    fn a_failed_index_leaves_no_staging_file() {
        let layer = include_bytes!("../../fuzz/corpus/tar_index/crash_staging_left_on_error.tar");
        let dir = tempfile::tempdir().unwrap();
        let got = super::index_layer(
            dir.path(),
            &layer[..],
            super::Compression::None,
            &super::IndexBelow::Nothing,
            false,
        );
        assert!(got.is_err(), "{got:?}");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [super::LAYER_TAR]);
    }
}
