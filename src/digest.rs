//! Content digests (`sha256:<hex>`) and an incremental hasher for them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// A validated content digest. hoist stores and verifies sha256 only, like
/// containerd's default; other algorithms are refused by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected <algorithm>:<hex>")]
    Malformed(String),
    #[error("unsupported digest algorithm {0:?} in {1:?}: only sha256 is supported")]
    UnsupportedAlgorithm(String, String),
    #[error("invalid digest {0:?}: sha256 needs 64 lowercase hex characters")]
    InvalidHex(String),
}

impl Digest {
    pub const ALGORITHM: &'static str = "sha256";

    /// Builds a digest from 64 lowercase hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest {
                hex: hex.to_string(),
            })
        } else {
            Err(DigestError::InvalidHex(format!("sha256:{hex}")))
        }
    }

    /// The digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        let mut d = Digester::new();
        d.update(data);
        d.finish()
    }

    pub fn algorithm(&self) -> &'static str {
        Self::ALGORITHM
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(s.to_string()))?;
        if algo.is_empty() || hex.is_empty() {
            return Err(DigestError::Malformed(s.to_string()));
        }
        if algo != Self::ALGORITHM {
            return Err(DigestError::UnsupportedAlgorithm(
                algo.to_string(),
                s.to_string(),
            ));
        }
        Digest::from_hex(hex)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 over a stream.
#[derive(Clone, Default)]
pub struct Digester {
    hasher: Sha256,
}

impl Digester {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// The digest of everything written so far, without consuming the hasher.
    pub fn current(&self) -> Digest {
        self.clone().finish()
    }

    pub fn finish(self) -> Digest {
        Digest {
            hex: hex::encode(self.hasher.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let s = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = s.parse().unwrap();
        assert_eq!(d.to_string(), s);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_bad_digests_by_name() {
        let cases = [
            ("sha256", "Malformed"),
            ("sha256:", "Malformed"),
            (":abc", "Malformed"),
            (
                "md5:d41d8cd98f00b204e9800998ecf8427e",
                "UnsupportedAlgorithm",
            ),
            ("sha256:abc", "InvalidHex"),
            (
                "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
                "InvalidHex",
            ),
        ];
        for (input, kind) in cases {
            let err = input.parse::<Digest>().unwrap_err();
            assert!(format!("{err:?}").starts_with(kind), "{input}: {err:?}");
            assert!(err.to_string().contains(input), "{input}: {err}");
        }
    }

    #[test]
    fn digester_current_does_not_consume() {
        let mut d = Digester::new();
        d.update(b"ab");
        assert_eq!(d.current(), Digest::of(b"ab"));
        d.update(b"c");
        assert_eq!(d.finish(), Digest::of(b"abc"));
    }
}
