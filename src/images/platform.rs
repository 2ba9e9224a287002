//! Platform parsing, normalisation and matching, after containerd's
//! `platforms` package: `linux/arm64` is `linux/arm64/v8`, `arm` defaults to
//! `v7`, an `armv7` host also runs `v6` and `v5` images, and an `amd64`
//! host runs the x86-64 microarchitecture levels (`v2`..`v4`) its CPU has,
//! preferring the highest.

use crate::descriptor::Platform;
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected os[/arch[/variant]]")]
pub struct InvalidPlatform(pub String);

/// This machine's platform; on x86-64 its variant is the CPU's
/// microarchitecture level.
pub fn host() -> Platform {
    host_platform(std::env::consts::OS, std::env::consts::ARCH, amd64_level())
}

/// The platform of a machine with Rust's `os` and `arch` names, whose
/// x86-64 CPU (if it is one) has microarchitecture level `amd64_level`.
pub fn host_platform(os: &str, arch: &str, amd64_level: u32) -> Platform {
    let (arch, variant) = match arch {
        "x86_64" => (
            "amd64",
            (amd64_level >= 2).then(|| format!("v{amd64_level}")),
        ),
        "aarch64" => ("arm64", None),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        other => (other, None),
    };
    normalize(Platform {
        architecture: arch.to_string(),
        os: os.to_string(),
        os_version: None,
        os_features: Vec::new(),
        variant,
    })
}

/// The x86-64 psABI level (1 to 4) this CPU supports, detected once; 1 on
/// other architectures.
pub fn amd64_level() -> u32 {
    static LEVEL: OnceLock<u32> = OnceLock::new();
    *LEVEL.get_or_init(detect_amd64_level)
}

#[cfg(target_arch = "x86_64")]
fn detect_amd64_level() -> u32 {
    use std::arch::is_x86_feature_detected as has;
    use std::arch::x86_64::__cpuid;
    // std does not name LAHF/SAHF or OSXSAVE; cpuid does. (The AVX checks
    // below also see whether the kernel saves the wider registers.)
    let lahf_lm = __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & 1 != 0;
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    let v2 = has!("cmpxchg16b")
        && lahf_lm
        && has!("popcnt")
        && has!("sse3")
        && has!("sse4.1")
        && has!("sse4.2")
        && has!("ssse3");
    let v3 = v2
        && has!("avx")
        && has!("avx2")
        && has!("bmi1")
        && has!("bmi2")
        && has!("f16c")
        && has!("fma")
        && has!("lzcnt")
        && has!("movbe")
        && osxsave;
    let v4 = v3
        && has!("avx512f")
        && has!("avx512bw")
        && has!("avx512cd")
        && has!("avx512dq")
        && has!("avx512vl");
    1 + u32::from(v2) + u32::from(v3) + u32::from(v4)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_amd64_level() -> u32 {
    1
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

/// How well `candidate` fits `wanted`: `None` when it cannot run, lower is
/// better. Like containerd's `platforms.Only`, a variant runs the older
/// variants of its architecture: `arm/v7` runs `v6` and `v5`, `amd64/v3`
/// runs `v2` and plain `amd64` (`v1`), never the other way round.
pub fn rank(wanted: &Platform, candidate: &Platform) -> Option<u32> {
    let w = normalize(wanted.clone());
    let c = normalize(candidate.clone());
    if w.os != c.os || w.architecture != c.architecture {
        return None;
    }
    if w.variant == c.variant {
        return Some(0);
    }
    let level = |v: &Option<String>, none: Option<u32>| match v {
        None => none,
        Some(v) => v.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()),
    };
    match w.architecture.as_str() {
        // amd64 without a variant is the baseline, v1.
        "arm" | "amd64" => {
            let none = (w.architecture == "amd64").then_some(1);
            let (wl, cl) = (level(&w.variant, none)?, level(&c.variant, none)?);
            (cl <= wl).then(|| wl - cl)
        }
        // An image without a variant fits any variant of its architecture.
        _ => c.variant.is_none().then_some(10),
    }
}

/// The entry of an index to pull for `wanted`, as containerd's platform
/// filter and sort choose it: the best-ranked entry whose platform fits,
/// else the first entry without a platform (those pass the filter but sort
/// after every match); the index's order breaks ties.
pub fn best_match<'a>(
    wanted: &Platform,
    entries: impl IntoIterator<Item = &'a crate::descriptor::Descriptor>,
) -> Option<&'a crate::descriptor::Descriptor> {
    let mut best = None;
    let mut unlabelled = None;
    for entry in entries {
        match &entry.platform {
            Some(p) => {
                if let Some(r) = rank(wanted, p)
                    && best.is_none_or(|(b, _)| r < b)
                {
                    best = Some((r, entry));
                }
            }
            None => {
                unlabelled.get_or_insert(entry);
            }
        }
    }
    best.map(|(_, e)| e).or(unlabelled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::platform_string;

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

    #[test]
    fn amd64_variants_need_the_cpu_level() {
        let v3_host = host_platform("linux", "x86_64", 3);
        assert_eq!(platform_string(&v3_host), "linux/amd64/v3");
        assert_eq!(rank(&v3_host, &p("linux/amd64/v3")), Some(0));
        assert_eq!(rank(&v3_host, &p("linux/amd64/v2")), Some(1));
        assert_eq!(rank(&v3_host, &p("linux/amd64")), Some(2));
        assert_eq!(rank(&v3_host, &p("linux/amd64/v1")), Some(2));
        assert_eq!(rank(&v3_host, &p("linux/amd64/v4")), None);
        // A CPU without AVX2 (v2) never takes a v3 image.
        let v2_host = host_platform("linux", "x86_64", 2);
        assert_eq!(rank(&v2_host, &p("linux/amd64/v3")), None);
        assert_eq!(rank(&v2_host, &p("linux/amd64/v2")), Some(0));
        let baseline = host_platform("linux", "x86_64", 1);
        assert_eq!(baseline.variant, None);
        assert_eq!(rank(&baseline, &p("linux/amd64")), Some(0));
        assert_eq!(rank(&baseline, &p("linux/amd64/v2")), None);
        assert_eq!(rank(&baseline, &p("linux/amd64/vx")), None);
        // The level means nothing to other architectures.
        assert_eq!(host_platform("linux", "aarch64", 4), p("linux/arm64/v8"));
    }

    fn entry(platform: Option<&str>, n: u8) -> crate::descriptor::Descriptor {
        let mut d = crate::descriptor::Descriptor::new(
            crate::images::OCI_MANIFEST,
            crate::digest::Digest::of(&[n]),
            1,
        );
        d.platform = platform.map(p);
        d
    }

    #[test]
    fn best_match_prefers_the_highest_level_the_cpu_runs() {
        let index = [
            entry(Some("linux/amd64"), 1),
            entry(Some("linux/amd64/v2"), 2),
            entry(Some("linux/amd64/v4"), 4),
            entry(Some("linux/amd64/v3"), 3),
            entry(Some("linux/arm64"), 5),
        ];
        let chosen = |level| {
            best_match(&host_platform("linux", "x86_64", level), &index).map(|d| d.digest.clone())
        };
        assert_eq!(chosen(1), Some(index[0].digest.clone()));
        assert_eq!(chosen(2), Some(index[1].digest.clone()));
        assert_eq!(chosen(3), Some(index[3].digest.clone()));
        assert_eq!(chosen(4), Some(index[2].digest.clone()));
        let arm = host_platform("linux", "aarch64", 1);
        assert_eq!(best_match(&arm, &index), Some(&index[4]));
        assert_eq!(best_match(&p("linux/s390x"), &index), None);
    }

    #[test]
    fn entries_without_a_platform_match_after_those_that_do() {
        let index = [
            entry(None, 1),
            entry(Some("linux/arm64"), 2),
            entry(None, 3),
            entry(Some("linux/amd64"), 4),
        ];
        let amd64 = host_platform("linux", "x86_64", 1);
        assert_eq!(best_match(&amd64, &index), Some(&index[3]));
        assert_eq!(best_match(&p("linux/arm64"), &index), Some(&index[1]));
        // Nothing fits by platform: the first unlabelled entry, in index order.
        assert_eq!(best_match(&p("linux/s390x"), &index), Some(&index[0]));
    }

    #[test]
    fn detected_level_agrees_with_the_cpu() {
        let level = amd64_level();
        assert!((1..=4).contains(&level), "{level}");
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if level >= 2 {
                assert!(has!("sse4.2") && has!("popcnt") && has!("cmpxchg16b"));
            }
            if !has!("avx2") {
                assert!(level < 3, "v3 without AVX2");
            }
            if !has!("avx512f") {
                assert!(level < 4, "v4 without AVX-512");
            }
            if level >= 3 {
                assert!(has!("avx2") && has!("fma") && has!("movbe"));
            }
            if level == 4 {
                assert!(has!("avx512vl") && has!("avx512bw"));
            }
            let host = host();
            assert_eq!(host.architecture, "amd64");
            assert_eq!(host.variant.is_some(), level >= 2);
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(level, 1);
    }
}
