//! Where hoist keeps its state, and what a namespace may be called.

use std::path::PathBuf;

/// `/var/lib/hoist` for root; `$XDG_DATA_HOME/hoist` (or
/// `~/.local/share/hoist`) for anyone else, who cannot write there.
pub fn default_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/hoist");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("hoist");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/hoist"),
        None => PathBuf::from("/var/lib/hoist"),
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid namespace {0:?}: use lower case letters, digits, '.' and '-', starting with a letter or digit"
)]
pub struct InvalidNamespace(pub String);

/// Namespaces follow containerd's rule; in particular they never hold `/`,
/// which separates the namespace from the ref in ingest names on disk.
pub fn validate_namespace(ns: &str) -> Result<(), InvalidNamespace> {
    let ok = !ns.is_empty()
        && ns.len() <= 76
        && ns.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(InvalidNamespace(ns.to_string()))
    }
}

/// `1.5 MiB`, `512 B`: sizes as people read them.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["default", "k8s.io", "a-b", "9x"] {
            assert!(validate_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "K8s", "a/b", ".x", "-x", "a b"] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
