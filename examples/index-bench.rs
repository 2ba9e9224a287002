//! The cost of a layer's EROFS index with the tree in memory and spilled
//! to disk: builds a tree of N files in directories of 100 (as the tar
//! indexer does: add, look up, link, mark), then writes its image.
//!
//! cargo run --release --example index-bench -- [N] [DIR]
//!
//! Prints, for each store, the seconds to build and to write, and the
//! peak RSS of the process so far (the spilled run goes first).

use hoist::erofs::tree::{Data, Inode, ROOT, Spill, Tree};
use std::path::Path;
use std::time::Instant;

fn inode(mode: u32) -> Inode {
    Inode {
        mtime: 1_700_000_000,
        ..Inode::empty(mode)
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn run(n: u32, dir: &Path, budget: usize) -> anyhow::Result<()> {
    let spill = Spill {
        path: dir.join("index-bench.index"),
        budget,
    };
    let mut tree = Tree::with_spill(inode(libc::S_IFDIR | 0o755), spill)?;
    let started = Instant::now();
    let mut parent = ROOT;
    for i in 0..n {
        if i % 100 == 0 {
            let d = tree.add(inode(libc::S_IFDIR | 0o755))?;
            tree.link(ROOT, format!("dir-{i:08}").as_bytes(), d)?;
            parent = d;
        }
        let name = format!("file-{i:08}.txt");
        let f = tree.add(Inode {
            size: 100,
            data: Data::Tar {
                offset: 1024 * u64::from(i) + 512,
            },
            ..inode(libc::S_IFREG | 0o644)
        })?;
        // The indexer looks a name up before it links it.
        tree.child(parent, name.as_bytes())?;
        tree.link(parent, name.as_bytes(), f)?;
        tree.mark(f)?;
    }
    let built = started.elapsed();
    let spilled = tree.spilled();
    let started = Instant::now();
    let mut out = tempfile::tempfile_in(dir)?;
    let layout =
        hoist::erofs::writer::write_image(&mut tree, 1024 * u64::from(n) + 1024, None, &mut out)?;
    let written = started.elapsed();
    println!(
        "{:<8} {n:>9} entries  build {:>6.3} s  write {:>6.3} s  image {:>6.1} MiB  peak rss {:>6.1} MiB",
        if spilled { "spilled" } else { "memory" },
        built.as_secs_f64(),
        written.as_secs_f64(),
        layout.image_bytes as f64 / f64::from(1 << 20),
        peak_rss_mib(),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    run(n, Path::new(&dir), 0)?;
    run(n, Path::new(&dir), usize::MAX)?;
    Ok(())
}
