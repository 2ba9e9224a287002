//! Platform parsing, normalisation and matching, after containerd's
//! `platforms` package: `linux/arm64` is `linux/arm64/v8`, `arm` defaults to
//! `v7`, and an `armv7` host also runs `v6` and `v5` images.

use crate::descriptor::Platform;

#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected os[/arch[/variant]]")]
pub struct InvalidPlatform(pub String);

/// This machine's platform.
pub fn host() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    normalize(Platform {
        architecture: arch.to_string(),
        os: std::env::consts::OS.to_string(),
        os_version: None,
        os_features: Vec::new(),
        variant: None,
    })
}

pub fn parse(s: &str) -> Result<Platform, InvalidPlatform> {
    let parts: Vec<&str> = s.split('/').collect();
    let bad = || InvalidPlatform(s.to_string());
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
        return Err(bad());
    }
    let host = host();
    let (os, arch, variant) = match parts.as_slice() {
        // A lone architecture means this OS; a lone OS, this architecture.
        [one] if ["linux", "windows", "darwin", "freebsd"].contains(one) => (
            one.to_string(),
            host.architecture.clone(),
            host.variant.clone(),
        ),
        [one] => (host.os.clone(), one.to_string(), None),
        [os, arch] => (os.to_string(), arch.to_string(), None),
        [os, arch, variant] => (os.to_string(), arch.to_string(), Some(variant.to_string())),
        _ => return Err(bad()),
    };
    Ok(normalize(Platform {
        architecture: arch.to_lowercase(),
        os: os.to_lowercase(),
        os_version: None,
        os_features: Vec::new(),
        variant,
    }))
}

pub fn normalize(mut p: Platform) -> Platform {
    let (arch, variant) = match (p.architecture.as_str(), p.variant.as_deref()) {
        ("i386", _) => ("386", None),
        ("x86_64" | "x86-64" | "amd64", v) => ("amd64", v.filter(|v| *v != "v1")),
        ("aarch64" | "arm64", None | Some("8") | Some("v8")) => ("arm64", Some("v8")),
        ("aarch64" | "arm64", v) => ("arm64", v),
        ("armhf", _) => ("arm", Some("v7")),
        ("armel", _) => ("arm", Some("v6")),
        ("arm", None | Some("7")) => ("arm", Some("v7")),
        ("arm", Some(v)) if !v.starts_with('v') => ("arm", None),
        (a, v) => (a, v),
    };
    let variant = match (arch, variant, &p.variant) {
        ("arm", None, Some(v)) if !v.starts_with('v') => Some(format!("v{v}")),
        (_, v, _) => v.map(str::to_string),
    };
    p.architecture = arch.to_string();
    p.variant = variant;
    p
}

/// How well `candidate` fits `wanted`: `None` when it cannot run, lower is better.
pub fn rank(wanted: &Platform, candidate: &Platform) -> Option<u32> {
    let w = normalize(wanted.clone());
    let c = normalize(candidate.clone());
    if w.os != c.os || w.architecture != c.architecture {
        return None;
    }
    if w.variant == c.variant {
        return Some(0);
    }
    if w.architecture == "arm" {
        // An armv7 machine runs v6 and v5 binaries, preferring the newest.
        let level = |v: &Option<String>| {
            v.as_deref()
                .and_then(|v| v.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
        };
        if let (Some(wl), Some(cl)) = (level(&w.variant), level(&c.variant))
            && cl <= wl
        {
            return Some(wl - cl);
        }
        return None;
    }
    // An image without a variant fits any variant of its architecture.
    c.variant.is_none().then_some(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        parse(s).unwrap()
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(p("linux/arm64").variant.as_deref(), Some("v8"));
        assert_eq!(p("linux/aarch64").architecture, "arm64");
        assert_eq!(p("linux/arm").variant.as_deref(), Some("v7"));
        assert_eq!(p("linux/arm/6").variant.as_deref(), Some("v6"));
        assert_eq!(p("linux/x86_64"), p("linux/amd64"));
        assert_eq!(p("linux").os, "linux");
        assert!(parse("linux//v7").is_err());
        assert!(parse("a/b/c/d").is_err());
    }

    #[test]
    fn ranks() {
        assert_eq!(rank(&p("linux/amd64"), &p("linux/amd64")), Some(0));
        assert_eq!(rank(&p("linux/amd64"), &p("linux/arm64")), None);
        assert_eq!(rank(&p("linux/amd64"), &p("windows/amd64")), None);
        assert_eq!(rank(&p("linux/arm64"), &p("linux/arm64/v8")), Some(0));
        assert_eq!(rank(&p("linux/arm/v7"), &p("linux/arm/v6")), Some(1));
        assert_eq!(rank(&p("linux/arm/v6"), &p("linux/arm/v7")), None);
    }
}
