//! Failpoints: named steps of the pipeline where a test makes hoist fail
//! (an injected error) or die (SIGKILL, as a crash would), to show that a
//! root left at any of them recovers (`e2e/crash.rs`). They exist only in a
//! build with the `failpoints` feature; otherwise `failpoint!` expands to
//! nothing.
//!
//! `HOIST_FAILPOINTS="ingest-fsync=abort;gc-sweep=error"` arms points; it is
//! read once per process. `name=abort@3` (or `error@3`) fires on the
//! point's third hit only, so a crash can land after earlier layers went
//! through the same step.

/// Every failpoint, in pipeline order, with where it sits.
pub const POINTS: &[(&str, &str)] = &[
    (
        "ingest-write",
        "content/local.rs: each write into an ingest's data file",
    ),
    (
        "ingest-fsync",
        "content/local.rs: at commit, before the ingest's data is fsynced",
    ),
    (
        "ingest-rename",
        "content/local.rs: the blob renamed into blobs/, its directory not yet synced, no row yet",
    ),
    (
        "content-row",
        "metadata/content.rs: the content row's transaction, before it commits",
    ),
    (
        "image-record",
        "metadata/images.rs: the image row's transaction, before it commits",
    ),
    (
        "snapshot-prepare",
        "snapshot backends: the snapshot's row committed, its tree not yet built",
    ),
    (
        "snapshot-apply",
        "diff.rs: the active snapshot made, its layer not yet applied",
    ),
    (
        "snapshot-rebase",
        "snapshot/store.rs: a parallel apply's lower metadata adopted, its parent not yet set",
    ),
    (
        "snapshot-commit",
        "snapshot backends: the tree synced (syncfs), or the indexed layer's files synced and mounted, before the commit transaction",
    ),
    (
        "label-uncompressed",
        "pull/unpack.rs: before each layer blob gets containerd.io/uncompressed",
    ),
    (
        "label-gc-snapshot",
        "pull/unpack.rs: before the config gets containerd.io/gc.ref.snapshot.<snapshotter>",
    ),
    (
        "gc-mark",
        "metadata/gc.rs: inside the mark transaction, nothing swept yet",
    ),
    (
        "gc-sweep",
        "metadata/gc.rs: content rows swept and committed, no blob, snapshot or ingest removed yet",
    ),
    (
        "lease-release",
        "metadata/leases.rs: before a lease is deleted",
    ),
];

/// The variable that arms failpoints.
pub const ENV: &str = "HOIST_FAILPOINTS";

/// Returns the injected error from the enclosing function when the named
/// failpoint fires with `error`; kills the process when it fires with
/// `abort`. The function's error type must be one hoist's failpoints
/// convert into (see `src/failpoint.rs`). Without the `failpoints` feature
/// it expands to nothing.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        if let Err(injected) = $crate::failpoint::hit($name) {
            return Err(::core::convert::From::from(injected));
        }
    };
}

#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {};
}

/// What an armed point does when it fires.
#[cfg(any(test, feature = "failpoints"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Error,
    Abort,
}

#[cfg(any(test, feature = "failpoints"))]
#[derive(Debug)]
struct Rule {
    action: Action,
    /// Fire on this hit only (1 is the first); every hit when `None`.
    on_hit: Option<u64>,
    hits: std::sync::atomic::AtomicU64,
}

#[cfg(any(test, feature = "failpoints"))]
impl Rule {
    /// Counts a hit; whether this one fires.
    fn fires(&self) -> bool {
        let hit = self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.on_hit.is_none_or(|want| want == hit)
    }
}

/// Parses `name=action[@hit];...`; entries that name no failpoint or no
/// action are returned as errors beside the rules that parsed.
#[cfg(any(test, feature = "failpoints"))]
fn parse(spec: &str) -> (std::collections::HashMap<&'static str, Rule>, Vec<String>) {
    let mut rules = std::collections::HashMap::new();
    let mut bad = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry.split_once('=').and_then(|(name, action)| {
            let name = POINTS.iter().find(|(p, _)| *p == name.trim())?.0;
            let (action, on_hit) = match action.trim().split_once('@') {
                Some((a, n)) => (a, Some(n.parse::<u64>().ok().filter(|n| *n > 0)?)),
                None => (action.trim(), None),
            };
            let action = match action {
                "error" => Action::Error,
                "abort" => Action::Abort,
                _ => return None,
            };
            Some((name, action, on_hit))
        });
        match parsed {
            Some((name, action, on_hit)) => {
                rules.insert(
                    name,
                    Rule {
                        action,
                        on_hit,
                        hits: Default::default(),
                    },
                );
            }
            None => bad.push(entry.to_string()),
        }
    }
    (rules, bad)
}

/// The error an armed point returns.
#[cfg(feature = "failpoints")]
#[derive(Debug, Clone, Copy)]
pub struct Injected(pub &'static str);

#[cfg(feature = "failpoints")]
impl Injected {
    fn io(self) -> std::io::Error {
        std::io::Error::other("injected error")
    }

    fn context(self) -> String {
        format!("failpoint {}", self.0)
    }
}

/// Whether the point `name` lets the caller go on; an `abort` never
/// returns.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) -> Result<(), Injected> {
    use std::sync::OnceLock;
    static RULES: OnceLock<std::collections::HashMap<&'static str, Rule>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let (rules, bad) = parse(&std::env::var(ENV).unwrap_or_default());
        for entry in bad {
            tracing::error!(entry, "{ENV}: not a failpoint=error|abort[@hit]; ignored");
        }
        rules
    });
    let Some(rule) = rules.get(name) else {
        return Ok(());
    };
    if !rule.fires() {
        return Ok(());
    }
    match rule.action {
        Action::Error => {
            tracing::warn!(failpoint = name, "injecting an error");
            Err(Injected(name))
        }
        Action::Abort => {
            // SIGKILL, not abort(): no handler, unwinding or core dump runs,
            // as when the machine's OOM killer or an operator ends hoist.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort()
        }
    }
}

#[cfg(feature = "failpoints")]
mod convert {
    //! The error types of the functions that hold failpoints.
    use super::Injected;

    impl From<Injected> for std::io::Error {
        fn from(i: Injected) -> Self {
            std::io::Error::other(format!("{}: injected error", i.context()))
        }
    }

    impl From<Injected> for crate::content::Error {
        fn from(i: Injected) -> Self {
            crate::content::Error::Io {
                context: i.context(),
                source: i.io(),
            }
        }
    }

    impl From<Injected> for crate::metadata::Error {
        fn from(i: Injected) -> Self {
            crate::metadata::Error::Io {
                context: i.context(),
                source: i.io(),
            }
        }
    }

    impl From<Injected> for crate::snapshot::Error {
        fn from(i: Injected) -> Self {
            crate::snapshot::Error::Io {
                context: i.context(),
                source: i.io(),
            }
        }
    }

    impl From<Injected> for crate::diff::Error {
        fn from(i: Injected) -> Self {
            crate::diff::Error::Content(i.into())
        }
    }

    impl From<Injected> for crate::pull::Error {
        fn from(i: Injected) -> Self {
            crate::pull::Error::Content(i.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn parses_actions_and_hits_and_names_what_it_refuses() {
        let (rules, bad) = parse(
            " ingest-fsync=abort; gc-sweep = error ;snapshot-commit=abort@2;;nope=error;\
             image-record=explode;lease-release=error@0",
        );
        assert_eq!(rules["ingest-fsync"].action, Action::Abort);
        assert_eq!(rules["ingest-fsync"].on_hit, None);
        assert_eq!(rules["gc-sweep"].action, Action::Error);
        assert_eq!(rules["snapshot-commit"].on_hit, Some(2));
        // `@2` fires on the second hit only; without it, on every one.
        let fired: Vec<bool> = (0..3).map(|_| rules["snapshot-commit"].fires()).collect();
        assert_eq!(fired, [false, true, false]);
        assert!((0..3).all(|_| rules["gc-sweep"].fires()));
        assert_eq!(rules.len(), 3);
        assert_eq!(
            bad,
            [
                "nope=error",
                "image-record=explode",
                "lease-release=error@0"
            ]
        );
    }

    /// Every `failpoint!` in the source is listed in `POINTS`, and every
    /// point listed sits somewhere: tests iterate the list.
    #[test]
    fn the_list_is_the_points_in_the_source() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut used = BTreeSet::new();
        let mut dirs = vec![src];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for part in text.split("crate::failpoint!(\"").skip(1) {
                        used.insert(part.split('"').next().unwrap_or_default().to_string());
                    }
                }
            }
        }
        let listed: BTreeSet<String> = POINTS.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(listed.len(), POINTS.len(), "a point is listed twice");
        assert_eq!(used, listed);
    }
}
