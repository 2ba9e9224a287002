//! Hostile images: layers made to exhaust an unpacker rather than to be
//! unpacked. The suites pull them through a registry; the same builders
//! serve to drive them through a running daemon.
//!
//! The layers are streamed through `gzip`/`zstd` and `sha256sum` child
//! processes as they are generated: the deep chain is 1.6 GB of tar.

use super::{Pushed, Registry, host_arch, push_manifest_over};
use hoist::digest::Digest;
use serde_json::json;
use std::io::{BufWriter, Read, Write};
use std::process::{Command, Stdio};

/// A compressed layer and its diff ID (the digest of its tar).
pub struct HostileLayer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: Digest,
    /// Bytes of tar before compression.
    pub tar_size: u64,
}

/// 48 PAX `x` headers of about 1 MiB (25,000 distinct
/// `SCHILY.xattr.user.*` records each) in front of one small file `f`:
/// 48 MiB of tar, gzip-compressed.
pub fn pax_flood_layer() -> HostileLayer {
    compressed(
        &["gzip", "-1", "-c"],
        hoist::images::OCI_LAYER_GZIP,
        |out| {
            for h in 0..48 {
                let mut records = Vec::with_capacity(1 << 20);
                for i in 0..25_000 {
                    let key = format!("SCHILY.xattr.user.{h:02}.{i:05}");
                    records.extend(pax_record(key.as_bytes(), b"0123456789"));
                }
                entry(out, b"PaxHeaders/f", tar::EntryType::XHeader, &records)?;
            }
            entry(out, b"f", tar::EntryType::Regular, b"small")?;
            out.write_all(&[0; 1024])
        },
    )
}

/// A directory chain `a/a/.../a/` `depth` levels deep, one entry per level
/// (40,000 levels: 80,000-byte names, 1.6 GB of tar), then a regular file
/// `a` that replaces the chain's top. zstd-compressed: gzip's 32 KiB window
/// cannot reach back to the previous, nearly identical name.
pub fn deep_chain_layer(depth: usize) -> HostileLayer {
    compressed(
        &["zstd", "-1", "-q", "-c"],
        hoist::images::OCI_LAYER_ZSTD,
        |out| {
            let mut name = Vec::with_capacity(2 * depth + 1);
            for _ in 0..depth {
                if !name.is_empty() {
                    name.push(b'/');
                }
                name.push(b'a');
                name.push(b'/');
                entry(out, &name, tar::EntryType::Directory, b"")?;
                name.pop();
            }
            entry(out, b"a", tar::EntryType::Regular, b"replaced the chain")?;
            out.write_all(&[0; 1024])
        },
    )
}

/// Pushes a one-layer image of `layer` as `repo:tag`.
pub async fn push_hostile(reg: &Registry, repo: &str, tag: &str, layer: &HostileLayer) -> Pushed {
    let desc = reg.push_blob(repo, &layer.blob, layer.media_type).await;
    let config = json!({
        "architecture": host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id.to_string()]},
    });
    let layers = vec![desc];
    let (config, manifest) =
        push_manifest_over(reg, repo, Some(tag), false, &config, &layers).await;
    Pushed {
        manifest,
        config,
        layers,
    }
}

/// One PAX record, its length prefix counting itself.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = [key, b"=", value, b"\n"].concat();
    let mut len = body.len() + 2;
    while format!("{len} ").len() + body.len() != len {
        len += 1;
    }
    [format!("{len} ").as_bytes(), &body].concat()
}

/// A tar entry with `data`; a name longer than the header holds goes in a
/// GNU long-name entry first.
pub fn entry(
    out: &mut dyn Write,
    name: &[u8],
    kind: tar::EntryType,
    data: &[u8],
) -> std::io::Result<()> {
    if name.len() > 100 {
        let long = [name, b"\0"].concat();
        entry(out, b"././@LongLink", tar::EntryType::GNULongName, &long)?;
    }
    let mut h = tar::Header::new_gnu();
    let n = name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    h.set_entry_type(kind);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.write_all(h.as_bytes())?;
    out.write_all(data)?;
    out.write_all(&vec![0; data.len().next_multiple_of(512) - data.len()])
}

/// Writes the tar `write` makes into `compressor` and `sha256sum` at once.
fn compressed(
    compressor: &[&str],
    media_type: &'static str,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> HostileLayer {
    let spawn = |argv: &[&str]| {
        Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", argv[0]))
    };
    let mut hasher = spawn(&["sha256sum"]);
    let mut packer = spawn(compressor);
    let mut packed = packer.stdout.take().unwrap();
    let blob = std::thread::spawn(move || {
        let mut v = Vec::new();
        packed.read_to_end(&mut v).map(|_| v)
    });
    let mut tee = Tee {
        a: hasher.stdin.take().unwrap(),
        b: packer.stdin.take().unwrap(),
        n: 0,
    };
    {
        let mut out = BufWriter::with_capacity(1 << 20, &mut tee);
        write(&mut out).unwrap();
        out.flush().unwrap();
    }
    let tar_size = tee.n;
    drop(tee);
    let blob = blob.join().unwrap().unwrap();
    assert!(packer.wait().unwrap().success(), "{compressor:?} failed");
    let sum = hasher.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&sum.stdout);
    let diff_id = Digest::from_hex(hex.split_whitespace().next().unwrap_or_default()).unwrap();
    HostileLayer {
        blob,
        media_type,
        diff_id,
        tar_size,
    }
}

struct Tee<A, B> {
    a: A,
    b: B,
    n: u64,
}

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.a.write_all(buf)?;
        self.b.write_all(buf)?;
        self.n += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.a.flush()?;
        self.b.flush()
    }
}
