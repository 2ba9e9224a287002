//! `hoist snapshots ls` (`hoist mount` and `unmount` are `hoist::api::ops`,
//! which the daemon runs too).

use anyhow::Result;
use hoist::filters::Filter;
use hoist::metadata::Db;
use hoist::snapshot::{self, Snapshotter};
use std::sync::Arc;

pub fn list_snapshots(db: &Arc<Db>, namespace: &str, snapshotter: Option<&str>) -> Result<()> {
    let roots = match snapshotter {
        Some(s) => vec![snapshot::open(db, Some(s))?],
        None => snapshot::open_existing(db)?,
    };
    println!(
        "{:<80}  {:<71}  {:<9}  SNAPSHOTTER",
        "KEY", "PARENT", "KIND"
    );
    for root in roots {
        let snapshots = root.namespace(namespace);
        snapshots.walk(&Filter::default(), &mut |info| {
            println!(
                "{:<80}  {:<71}  {:<9}  {}",
                info.name,
                info.parent.as_deref().unwrap_or(""),
                info.kind.as_str(),
                root.name()
            );
            Ok(())
        })?;
    }
    Ok(())
}
