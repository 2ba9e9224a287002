//! Decompression of the layer blob and hashing of the uncompressed stream.

use std::fmt;
use std::io::{self, Read};

use flate2::read::MultiGzDecoder;

use super::{ArchiveError, Compression};
use crate::digest::{Digest, Digester};

/// Wraps `layer` in the decoder for `compression`.
pub(super) fn decoder<'a>(
    layer: impl Read + 'a,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, ArchiveError> {
    Ok(match compression {
        Compression::None => Box::new(layer),
        // Multi-member: some tools write a layer as concatenated gzip members.
        Compression::Gzip => Box::new(MultiGzDecoder::new(layer)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(layer).map_err(|source| {
                ArchiveError::Stream {
                    compression,
                    source,
                }
            })?)
        }
    })
}

/// Marks an error as coming from the layer stream or its decompressor, so
/// the tar reader reports it as such and not as tar damage.
#[derive(Debug)]
struct StreamError(io::Error);

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Turns a marked stream error into `ArchiveError::Stream`; gives any other
/// error back.
pub(super) fn stream_error(
    e: io::Error,
    compression: Compression,
) -> Result<ArchiveError, io::Error> {
    if !e.get_ref().is_some_and(|inner| inner.is::<StreamError>()) {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<StreamError>()) {
        Some(Ok(marked)) => Ok(ArchiveError::Stream {
            compression,
            source: marked.0,
        }),
        // Unreachable after the `is` check; keep the error rather than panic.
        _ => Err(io::Error::from(kind)),
    }
}

/// Hashes and counts every byte of the uncompressed stream as it is read.
pub(super) struct HashingReader<R> {
    inner: R,
    digester: Digester,
    size: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            digester: Digester::new(),
            size: 0,
        }
    }

    pub fn finish(self) -> (Digest, u64) {
        (self.digester.finish(), self.size)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.digester.update(&buf[..n]);
                self.size += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => Err(io::Error::new(e.kind(), StreamError(e))),
        }
    }
}
