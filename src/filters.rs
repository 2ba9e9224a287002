//! containerd's filter syntax, the subset hoist's list calls take:
//! `selector[,selector...]` where a selector is `fieldpath`, `fieldpath==value`,
//! `fieldpath!=value` or `fieldpath~=regexp`. A field path is dot separated and a
//! part may be quoted, so `labels."containerd.io/gc.root"` names one label.
//! Selectors joined by `,` must all match; several filters match if any does.

use regex::{Regex, RegexBuilder};

/// Bounds on what a filter list from a client may cost: the compiled size
/// of one `~=` pattern (its program and its lazy DFA's cache each), and how
/// many such patterns a list may hold. Without them the memory grows with a
/// pattern's counted repetitions and with the number of patterns:
/// `name~=\w{40}` compiles to megabytes, and 1,500 of them took 3.5 GB.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const MAX_REGEXES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter `{filter}`: {reason}")]
    Syntax { filter: String, reason: String },
}

/// Gives a filter the value of a field path on one object, or `None` when absent.
pub trait Adaptor {
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter list: matches when any of its filters matches.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any_of: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses several filter strings; an empty list matches everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self, FilterError> {
        let mut regexes_left = MAX_REGEXES;
        let any_of = filters
            .iter()
            .map(|f| parse_one(f.as_ref(), &mut regexes_left))
            .collect::<Result<_, _>>()?;
        Ok(Filter { any_of })
    }

    pub fn parse(filter: &str) -> Result<Self, FilterError> {
        Self::parse_all(&[filter])
    }

    pub fn matches(&self, obj: &dyn Adaptor) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|sels| sels.iter().all(|s| s.matches(obj)))
    }
}

impl Selector {
    fn matches(&self, obj: &dyn Adaptor) -> bool {
        let value = obj.field(&self.path);
        match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Equal(want), Some(v)) => &v == want,
            (Op::NotEqual(want), Some(v)) => &v != want,
            (Op::NotEqual(_), None) => true,
            (Op::Matches(re), Some(v)) => re.is_match(&v),
            (_, None) => false,
        }
    }
}

/// Parses one filter; each `~=` selector takes one of `regexes_left`.
fn parse_one(filter: &str, regexes_left: &mut usize) -> Result<Vec<Selector>, FilterError> {
    let err = |reason: &str| FilterError::Syntax {
        filter: filter.to_string(),
        reason: reason.to_string(),
    };
    let mut p = Parser {
        chars: filter.chars().collect(),
        pos: 0,
    };
    let mut selectors = Vec::new();
    loop {
        let path = p.field_path().map_err(|r| err(&r))?;
        let op = if p.eat("==") {
            Op::Equal(p.value().map_err(|r| err(&r))?)
        } else if p.eat("!=") {
            Op::NotEqual(p.value().map_err(|r| err(&r))?)
        } else if p.eat("~=") {
            let pattern = p.value().map_err(|r| err(&r))?;
            *regexes_left = regexes_left.checked_sub(1).ok_or_else(|| {
                err(&format!(
                    "more than {MAX_REGEXES} `~=` selectors in the filters"
                ))
            })?;
            let regex = RegexBuilder::new(&pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| err(&e.to_string()))?;
            Op::Matches(regex)
        } else {
            Op::Present
        };
        selectors.push(Selector { path, op });
        p.skip_spaces();
        if p.at_end() {
            return Ok(selectors);
        }
        if !p.eat(",") {
            return Err(err(&format!("unexpected character at offset {}", p.pos)));
        }
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_spaces();
        let n = token.chars().count();
        let matches = self.chars.len() >= self.pos + n
            && self.chars[self.pos..self.pos + n]
                .iter()
                .copied()
                .eq(token.chars());
        if matches {
            self.pos += n;
        }
        matches
    }

    fn field_path(&mut self) -> Result<Vec<String>, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_spaces();
        if matches!(self.peek(), Some('"') | Some('`')) {
            return self.quoted();
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '/')
        {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(format!("expected a field name at offset {start}"));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_spaces();
        if matches!(self.peek(), Some('"') | Some('`')) {
            return self.quoted();
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ',') {
            self.pos += 1;
        }
        let value: String = self.chars[start..self.pos].iter().collect();
        Ok(value.trim_end().to_string())
    }

    fn quoted(&mut self) -> Result<String, String> {
        let Some(quote) = self.peek() else {
            return Err("expected a quote".to_string());
        };
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            match c {
                c if c == quote => return Ok(out),
                '\\' if quote == '"' => match self.peek() {
                    Some(escaped) => {
                        self.pos += 1;
                        out.push(escaped);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(format!("unterminated quote at offset {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Obj {
        name: &'static str,
        labels: BTreeMap<&'static str, &'static str>,
    }

    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [f] if f == "name" => Some(self.name.to_string()),
                [l, key] if l == "labels" => self.labels.get(key.as_str()).map(|v| v.to_string()),
                _ => None,
            }
        }
    }

    fn obj() -> Obj {
        Obj {
            name: "docker.io/library/busybox:latest",
            labels: [("containerd.io/gc.root", "2024"), ("team", "a b")].into(),
        }
    }

    #[test]
    fn selectors() {
        let cases = [
            ("", true),
            ("name", true),
            ("missing", false),
            (r#"labels."containerd.io/gc.root""#, true),
            (r#"labels."containerd.io/gc.root"==2024"#, true),
            (r#"labels."containerd.io/gc.root"!=2024"#, false),
            ("labels.team==a b", true),
            (r#"labels.team=="a b""#, true),
            ("labels.absent!=x", true),
            ("name~=busy", true),
            ("name~=^busy", false),
            ("name~=busybox,labels.team==a b", true),
            ("name~=busybox,labels.team==c", false),
        ];
        for (filter, want) in cases {
            let f = Filter::parse_all(
                &[filter]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            assert_eq!(f.matches(&obj()), want, "{filter}");
        }
    }

    #[test]
    fn any_of_several_filters() {
        let f = Filter::parse_all(&["name==x", "labels.team"]).unwrap();
        assert!(f.matches(&obj()));
        let f = Filter::parse_all(&["name==x", "labels.nope"]).unwrap();
        assert!(!f.matches(&obj()));
    }

    #[test]
    fn regexes_are_bounded_in_size_and_number() {
        // Found by hand while writing the fuzz target (fuzz/corpus/filters/
        // many_big_regexes): 1,500 of these took 3.5 GB and a minute.
        let big = r"name~=\w{40}";
        let err = Filter::parse(big).unwrap_err().to_string();
        assert!(err.contains("size limit"), "{err}");
        let small = r"name~=\w{4}";
        let f = Filter::parse(&[small; MAX_REGEXES].join(",")).unwrap();
        assert!(f.matches(&obj()));
        let many = vec![small; MAX_REGEXES + 1];
        let err = Filter::parse_all(&many).unwrap_err().to_string();
        assert!(err.contains("more than 16 `~=` selectors"), "{err}");
        // An ordinary pattern still compiles.
        assert!(Filter::parse(r"name~=^docker\.io/(library|bitnami)/.+:[0-9.]+$").is_ok());
    }

    #[test]
    fn syntax_errors_name_the_filter() {
        for bad in [r#"labels."open"#, "==x", "name~=(", "name==a,"] {
            let err = Filter::parse(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
    }
}
