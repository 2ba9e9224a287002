//! Registry host configuration in containerd's `hosts.toml` format.
//!
//! Mirrors containerd's `config.ConfigureHosts`: the configuration directory
//! holds one directory per registry namespace (`<dir>/<host[:port]>/hosts.toml`)
//! with `<dir>/_default` as the fallback, and each file lists mirrors
//! (`[host."URL"]`, tried in file order) followed by the upstream `server`.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::{BitOr, Range};
use std::path::{Component, Path, PathBuf};

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

const HOSTS_FILE: &str = "hosts.toml";
const DEFAULT_NAMESPACE: &str = "_default";
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_UPSTREAM: &str = "registry-1.docker.io";
const API_ROOT: &str = "/v2";

/// Errors from loading the host configuration; each names the offending file.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("failed to read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid registry host configuration {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid host URL {url:?} in {}: {reason}", path.display())]
    InvalidUrl {
        path: PathBuf,
        url: String,
        reason: String,
    },
    /// The registry name itself is unusable; rejected before it is joined
    /// onto the configuration directory so it cannot escape it.
    #[error("invalid registry host {registry:?}: {reason}")]
    InvalidRegistry { registry: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a host may be trusted to do (containerd's `HostCapabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    pub const NONE: Self = Self {
        pull: false,
        resolve: false,
        push: false,
    };
    pub const PULL: Self = Self {
        pull: true,
        ..Self::NONE
    };
    pub const RESOLVE: Self = Self {
        resolve: true,
        ..Self::NONE
    };
    pub const PUSH: Self = Self {
        push: true,
        ..Self::NONE
    };
    pub const ALL: Self = Self {
        pull: true,
        resolve: true,
        push: true,
    };

    /// True when every capability in `other` is also in `self`.
    pub fn contains(self, other: Self) -> bool {
        (self.pull || !other.pull) && (self.resolve || !other.resolve) && (self.push || !other.push)
    }
}

impl BitOr for Capabilities {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self {
            pull: self.pull || rhs.pull,
            resolve: self.resolve || rhs.resolve,
            push: self.push || rhs.push,
        }
    }
}

/// One endpoint to try for a registry, in the order returned by
/// [`HostsConfig::hosts_for`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    pub scheme: Scheme,
    /// `host[:port]`, IPv6 literals in brackets.
    pub host: String,
    /// API root, normally ending in `/v2`; empty only with `override_path`
    /// and a URL without a path.
    pub path: String,
    pub capabilities: Capabilities,
    pub skip_verify: bool,
    /// CA bundles to trust in addition to the system roots.
    pub ca: Vec<PathBuf>,
    /// Client certificates; without a key file the key is in the cert file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers, in file order; a name may repeat.
    pub headers: Vec<(String, String)>,
    /// The host is not the registry itself, so requests must say which
    /// namespace they are for (`?ns=`), as containerd does for proxies.
    pub is_mirror: bool,
}

impl RegistryHost {
    /// `scheme://host/path`, to which `/<repository>/...` is appended.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.path)
    }

    /// The `ns=<upstream>` query pair (without `?`) to add to requests sent to
    /// a mirror; `upstream` is the registry name given to
    /// [`HostsConfig::hosts_for`]. `None` for the registry itself.
    pub fn namespace_query(&self, upstream: &str) -> Option<String> {
        self.is_mirror
            .then(|| format!("ns={}", query_escape(upstream)))
    }
}

/// Where to find `hosts.toml` files, and how to reach registries that have none.
#[derive(Debug, Clone, Default)]
pub struct HostsConfig {
    dir: Option<PathBuf>,
    plain_http: bool,
}

impl HostsConfig {
    /// `dir` is containerd's `config_path` (e.g. `/etc/containerd/certs.d`);
    /// `plain_http` makes the defaulted upstream use HTTP (like `ctr --plain-http`).
    pub fn new(dir: Option<PathBuf>, plain_http: bool) -> Self {
        Self { dir, plain_http }
    }

    /// Checks that `registry` is a usable `host[:port]`, without reading
    /// anything.
    pub fn check_registry(registry: &str) -> Result<(), HostsError> {
        validate_authority(registry).map_err(|reason| HostsError::InvalidRegistry {
            registry: registry.to_string(),
            reason,
        })
    }

    /// Hosts to try for `registry` (`host[:port]` as written in the image
    /// reference, `docker.io` for Docker Hub): configured mirrors in file
    /// order, then the upstream server. Never empty. Reads the configuration
    /// directory: call it off the async runtime.
    pub fn hosts_for(&self, registry: &str) -> Result<Vec<RegistryHost>, HostsError> {
        Self::check_registry(registry)?;

        let file = match &self.dir {
            Some(root) => match find_host_dir(root, registry)? {
                Some(dir) => load_host_dir(&dir)?,
                None => FileConfig::default(),
            },
            None => FileConfig::default(),
        };
        Ok(self.hosts(registry, file))
    }

    /// What [`hosts_for`](Self::hosts_for) returns for `registry` when its
    /// `hosts.toml` at `path` holds `text`, without reading anything:
    /// relative certificate paths are joined onto `path`'s directory.
    pub fn hosts_from_toml(
        &self,
        registry: &str,
        path: &Path,
        text: &str,
    ) -> Result<Vec<RegistryHost>, HostsError> {
        Self::check_registry(registry)?;
        let file = FileParser {
            path,
            base_dir: path.parent().unwrap_or(Path::new("")),
            text,
        }
        .parse()?;
        Ok(self.hosts(registry, file))
    }

    fn hosts(&self, registry: &str, file: FileConfig) -> Vec<RegistryHost> {
        let mut hosts = Vec::with_capacity(file.mirrors.len() + 1);
        for (endpoint, settings) in file.mirrors {
            hosts.push(registry_host(endpoint, settings, registry));
        }
        let upstream = file
            .server
            .unwrap_or_else(|| self.default_upstream(registry));
        hosts.push(registry_host(upstream, file.root, registry));
        hosts
    }

    fn default_upstream(&self, registry: &str) -> Endpoint {
        // Docker Hub's API lives on a different host, and it is never plain HTTP.
        if registry == DOCKER_HUB {
            return Endpoint {
                scheme: Scheme::Https,
                host: DOCKER_HUB_UPSTREAM.to_string(),
                path: API_ROOT.to_string(),
            };
        }
        // containerd probes HTTPS first and falls back for loopback
        // registries; local test registries are plain HTTP, so skip the probe.
        let scheme = if self.plain_http || is_loopback(registry) {
            Scheme::Http
        } else {
            Scheme::Https
        };
        Endpoint {
            scheme,
            host: registry.to_string(),
            path: API_ROOT.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    scheme: Scheme,
    host: String,
    path: String,
}

/// Settings shared by the top level of a file and each `[host."URL"]` table.
#[derive(Debug, Default)]
struct HostSettings {
    /// `None` when unset or empty: containerd then grants every capability.
    capabilities: Option<Capabilities>,
    skip_verify: bool,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
    headers: Vec<(String, String)>,
    override_path: bool,
}

#[derive(Debug, Default)]
struct FileConfig {
    mirrors: Vec<(Endpoint, HostSettings)>,
    /// `None` when the file has no `server`: the registry's default applies.
    server: Option<Endpoint>,
    /// Top-level settings, which apply to the upstream server.
    root: HostSettings,
}

fn registry_host(endpoint: Endpoint, settings: HostSettings, registry: &str) -> RegistryHost {
    let is_mirror = is_proxy(&endpoint.host, registry);
    RegistryHost {
        scheme: endpoint.scheme,
        host: endpoint.host,
        path: endpoint.path,
        capabilities: settings.capabilities.unwrap_or(Capabilities::ALL),
        skip_verify: settings.skip_verify,
        ca: settings.ca,
        client: settings.client,
        headers: settings.headers,
        is_mirror,
    }
}

/// containerd's `isProxy`: any host other than the registry itself, except
/// that Docker Hub's API host stands for `docker.io`.
fn is_proxy(host: &str, registry: &str) -> bool {
    if host.eq_ignore_ascii_case(registry) {
        return false;
    }
    !(registry == DOCKER_HUB && host.eq_ignore_ascii_case(DOCKER_HUB_UPSTREAM))
}

fn is_loopback(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => authority.split_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The registry's own directory wins over `_default`, even when it holds no
/// `hosts.toml` (containerd then reads Docker-style certificate files from it).
fn find_host_dir(root: &Path, registry: &str) -> Result<Option<PathBuf>, HostsError> {
    for name in [registry, DEFAULT_NAMESPACE] {
        let candidate = root.join(name);
        match fs::metadata(&candidate) {
            Ok(meta) if meta.is_dir() => return Ok(Some(candidate)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HostsError::Read {
                    path: candidate,
                    source,
                });
            }
        }
    }
    Ok(None)
}

fn load_host_dir(dir: &Path) -> Result<FileConfig, HostsError> {
    let path = dir.join(HOSTS_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(HostsError::Read { path, source }),
    };
    // Like containerd, an empty file counts as absent.
    if bytes.is_empty() {
        return Ok(FileConfig {
            root: load_cert_files(dir)?,
            ..FileConfig::default()
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| HostsError::Parse {
        path: path.clone(),
        message: "file is not valid UTF-8".to_string(),
    })?;
    FileParser {
        path: &path,
        base_dir: dir,
        text: &text,
    }
    .parse()
}

/// Docker's certs.d layout: `*.crt` are CA bundles, `*.cert` client
/// certificates with an optional `*.key` beside them.
fn load_cert_files(dir: &Path) -> Result<HostSettings, HostsError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HostsError::Read { path, source }
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        if entry.file_type().map_err(read_err(&entry.path()))?.is_dir() {
            continue;
        }
        // A name that is not UTF-8 cannot end in one of our suffixes anyway.
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    // read_dir order is unspecified; sort so the result is stable.
    names.sort();

    let mut settings = HostSettings::default();
    for name in &names {
        if name.ends_with(".crt") {
            settings.ca.push(dir.join(name));
        }
        if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            let key = match fs::metadata(&key) {
                Ok(_) => Some(key),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(source) => return Err(HostsError::Read { path: key, source }),
            };
            settings.client.push((dir.join(name), key));
        }
    }
    Ok(settings)
}

struct FileParser<'a> {
    path: &'a Path,
    /// Relative certificate paths are relative to the file's directory.
    base_dir: &'a Path,
    text: &'a str,
}

type Entry<'t, 'i> = (&'t Spanned<DeString<'i>>, &'t Spanned<DeValue<'i>>);

impl FileParser<'_> {
    fn parse(&self) -> Result<FileConfig, HostsError> {
        let doc = DeTable::parse(self.text).map_err(|e| HostsError::Parse {
            path: self.path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let doc = doc.get_ref();

        let root = self.settings(doc, "top level")?;
        let mut server = None;
        let mut mirrors = Vec::new();
        for (key, value) in doc.iter() {
            match key.get_ref().as_ref() {
                "server" => {
                    let url = self.string(value, "`server`")?;
                    // An empty server means "the registry itself", as in containerd.
                    if !url.is_empty() {
                        server = Some(self.endpoint(url, root.override_path)?);
                    }
                }
                "host" => {
                    let DeValue::Table(table) = value.get_ref() else {
                        return Err(self.error(value.span(), "`host` must be a table"));
                    };
                    for (url, value) in in_file_order(table) {
                        let url = url.get_ref().as_ref();
                        let DeValue::Table(table) = value.get_ref() else {
                            return Err(self
                                .error(value.span(), &format!("`host.{url:?}` must be a table")));
                        };
                        let settings = self.settings(table, &format!("host {url:?}"))?;
                        let endpoint = self.endpoint(url, settings.override_path)?;
                        mirrors.push((endpoint, settings));
                    }
                }
                // Keys this service does not use (dial_timeout, proxy, ...)
                // are accepted so that containerd's files load unchanged.
                _ => {}
            }
        }
        Ok(FileConfig {
            mirrors,
            server,
            root,
        })
    }

    fn settings(&self, table: &DeTable<'_>, owner: &str) -> Result<HostSettings, HostsError> {
        let mut settings = HostSettings::default();
        for (key, value) in table.iter() {
            match key.get_ref().as_ref() {
                "capabilities" => settings.capabilities = self.capabilities(value, owner)?,
                "skip_verify" => settings.skip_verify = self.boolean(value, "`skip_verify`")?,
                "override_path" => {
                    settings.override_path = self.boolean(value, "`override_path`")?;
                }
                "ca" => settings.ca = self.ca(value)?,
                "client" => settings.client = self.client(value)?,
                "header" => settings.headers = self.headers(value)?,
                _ => {}
            }
        }
        Ok(settings)
    }

    fn capabilities(
        &self,
        value: &Spanned<DeValue<'_>>,
        owner: &str,
    ) -> Result<Option<Capabilities>, HostsError> {
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.error(value.span(), "`capabilities` must be an array of strings"));
        };
        let mut caps = Capabilities::NONE;
        for item in items {
            let name = self.string(item, "a capability")?;
            caps = caps
                | match name.to_ascii_lowercase().as_str() {
                    "pull" => Capabilities::PULL,
                    "resolve" => Capabilities::RESOLVE,
                    "push" => Capabilities::PUSH,
                    // Newer containerd knows this one; it grants nothing here.
                    "referrers" => Capabilities::NONE,
                    _ => {
                        return Err(self.error(
                            item.span(),
                            &format!("unknown capability {name:?} for {owner}"),
                        ));
                    }
                };
        }
        // containerd treats an empty list like an absent one.
        Ok((!items.is_empty()).then_some(caps))
    }

    fn ca(&self, value: &Spanned<DeValue<'_>>) -> Result<Vec<PathBuf>, HostsError> {
        match value.get_ref() {
            DeValue::String(path) => Ok(vec![self.file_path(path, value.span())?]),
            DeValue::Array(items) => items
                .iter()
                .map(|item| {
                    let path = self.string(item, "a `ca` entry")?;
                    self.file_path(path, item.span())
                })
                .collect(),
            _ => Err(self.error(value.span(), "`ca` must be a path or an array of paths")),
        }
    }

    fn client(
        &self,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<Vec<(PathBuf, Option<PathBuf>)>, HostsError> {
        const EXPECTED: &str =
            "`client` must be a path, an array of paths, or an array of [cert, key] pairs";
        let items = match value.get_ref() {
            DeValue::String(path) => return Ok(vec![(self.file_path(path, value.span())?, None)]),
            DeValue::Array(items) => items,
            _ => return Err(self.error(value.span(), EXPECTED)),
        };
        let mut pairs = Vec::with_capacity(items.len());
        for item in items {
            match item.get_ref() {
                DeValue::String(cert) => pairs.push((self.file_path(cert, item.span())?, None)),
                DeValue::Array(pair) => {
                    let [cert, key] = pair.as_ref() else {
                        return Err(self.error(item.span(), "a `client` pair must be [cert, key]"));
                    };
                    let cert_path =
                        self.file_path(self.string(cert, "a client cert")?, cert.span())?;
                    let key_str = self.string(key, "a client key")?;
                    // `["client.pem", ""]` means the key is inside the cert file.
                    let key_path = if key_str.is_empty() {
                        None
                    } else {
                        Some(self.file_path(key_str, key.span())?)
                    };
                    pairs.push((cert_path, key_path));
                }
                _ => return Err(self.error(item.span(), EXPECTED)),
            }
        }
        Ok(pairs)
    }

    fn headers(&self, value: &Spanned<DeValue<'_>>) -> Result<Vec<(String, String)>, HostsError> {
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.error(value.span(), "`header` must be a table"));
        };
        let mut headers = Vec::new();
        for (name, value) in in_file_order(table) {
            let name_str = name.get_ref().as_ref();
            if name_str.is_empty() || !name_str.bytes().all(is_token_byte) {
                return Err(self.error(name.span(), &format!("invalid header name {name_str:?}")));
            }
            let what = format!("header {name_str:?}");
            let values: Vec<&str> = match value.get_ref() {
                DeValue::String(v) => vec![v.as_ref()],
                DeValue::Array(items) => items
                    .iter()
                    .map(|item| self.string(item, &what))
                    .collect::<Result<_, _>>()?,
                _ => {
                    return Err(self.error(
                        value.span(),
                        &format!("{what} must be a string or an array of strings"),
                    ));
                }
            };
            for v in values {
                // Reject what would split or corrupt the HTTP request.
                if v.chars().any(|c| c.is_ascii_control() && c != '\t') {
                    return Err(self.error(
                        value.span(),
                        &format!("{what} has a control character in its value"),
                    ));
                }
                headers.push((name_str.to_string(), v.to_string()));
            }
        }
        Ok(headers)
    }

    fn endpoint(&self, url: &str, override_path: bool) -> Result<Endpoint, HostsError> {
        parse_endpoint(url, override_path).map_err(|reason| HostsError::InvalidUrl {
            path: self.path.to_path_buf(),
            url: url.to_string(),
            reason,
        })
    }

    fn string<'v>(
        &self,
        value: &'v Spanned<DeValue<'_>>,
        what: &str,
    ) -> Result<&'v str, HostsError> {
        match value.get_ref() {
            DeValue::String(s) => Ok(s.as_ref()),
            _ => Err(self.error(value.span(), &format!("{what} must be a string"))),
        }
    }

    fn boolean(&self, value: &Spanned<DeValue<'_>>, what: &str) -> Result<bool, HostsError> {
        match value.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(self.error(value.span(), &format!("{what} must be true or false"))),
        }
    }

    /// Joins a relative path onto the file's directory, dropping `.` parts
    /// so that `./ca.pem` reads as `<dir>/ca.pem`.
    fn file_path(&self, path: &str, span: Range<usize>) -> Result<PathBuf, HostsError> {
        if path.is_empty() {
            return Err(self.error(span, "empty certificate path"));
        }
        let path = Path::new(path);
        if path.is_absolute() {
            return Ok(path.to_path_buf());
        }
        let mut out = self.base_dir.to_path_buf();
        out.extend(path.components().filter(|c| *c != Component::CurDir));
        Ok(out)
    }

    fn error(&self, span: Range<usize>, message: &str) -> HostsError {
        let before = self.text.get(..span.start).unwrap_or(self.text);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        HostsError::Parse {
            path: self.path.to_path_buf(),
            message: format!("line {line}: {message}"),
        }
    }
}

/// Table entries in the order they appear in the file. Sorting by the key's
/// position keeps that order whether or not toml's `preserve_order` is on.
fn in_file_order<'t, 'i>(table: &'t DeTable<'i>) -> Vec<Entry<'t, 'i>> {
    let mut entries: Vec<Entry<'t, 'i>> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

/// Parses a host URL as containerd does: no scheme means HTTPS, and unless
/// `override_path` is set the API root `/v2` is appended to the path.
fn parse_endpoint(url: &str, override_path: bool) -> Result<Endpoint, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = match scheme.to_ascii_lowercase().as_str() {
                "http" => Scheme::Http,
                "https" => Scheme::Https,
                _ => {
                    return Err(format!(
                        "unsupported scheme {scheme:?}, expected http or https"
                    ));
                }
            };
            (scheme, rest)
        }
        None => (Scheme::Https, url),
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if tail.contains(['?', '#']) {
        return Err("a query or fragment is not allowed".to_string());
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".to_string());
    }
    validate_authority(authority)?;

    let mut path = clean_path(tail);
    if !override_path && !path.ends_with(API_ROOT) {
        path.push_str(API_ROOT);
    }
    Ok(Endpoint {
        scheme,
        host: authority.to_string(),
        path,
    })
}

/// Lexically normalises a URL path like Go's `path.Clean`, except that the
/// root comes out empty so that appending `/v2` never yields `//v2`.
fn clean_path(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments.iter().map(|s| format!("/{s}")).collect()
}

/// Checks `host[:port]`; also keeps registry names from naming anything but a
/// single directory below the configuration directory.
fn validate_authority(authority: &str) -> Result<(), String> {
    if authority.is_empty() {
        return Err("missing host".to_string());
    }
    let port = if let Some(rest) = authority.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err("unterminated IPv6 address".to_string());
        };
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("invalid IPv6 address {ip:?}"))?;
        match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {after:?} after IPv6 address"))?,
            ),
        }
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let valid_label = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !host.split('.').all(valid_label) {
            return Err(format!("invalid host name {host:?}"));
        }
        port
    };
    if let Some(port) = port
        && (port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err())
    {
        return Err(format!("invalid port {port:?}"));
    }
    Ok(())
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Form-encodes a query value (what Go's `url.Values.Encode` does for `ns`).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use tempfile::TempDir;

    fn write_hosts(root: &Path, namespace: &str, contents: &str) -> PathBuf {
        let dir = root.join(namespace);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(HOSTS_FILE);
        fs::write(&path, contents).unwrap();
        path
    }

    fn config_with(namespace: &str, contents: &str) -> (TempDir, HostsConfig) {
        let tmp = TempDir::new().unwrap();
        write_hosts(tmp.path(), namespace, contents);
        let config = HostsConfig::new(Some(tmp.path().to_path_buf()), false);
        (tmp, config)
    }

    fn urls(hosts: &[RegistryHost]) -> Vec<String> {
        hosts.iter().map(RegistryHost::base_url).collect()
    }

    fn parse_message(err: HostsError) -> (PathBuf, String) {
        match err {
            HostsError::Parse { path, message } => (path, message),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn no_config_uses_upstream_defaults() {
        let config = HostsConfig::new(None, false);
        for (registry, url) in [
            ("docker.io", "https://registry-1.docker.io/v2"),
            ("quay.io", "https://quay.io/v2"),
            (
                "registry.example.com:5000",
                "https://registry.example.com:5000/v2",
            ),
            ("localhost", "http://localhost/v2"),
            ("localhost:5000", "http://localhost:5000/v2"),
            ("127.0.0.1:5000", "http://127.0.0.1:5000/v2"),
            ("127.0.0.2", "http://127.0.0.2/v2"),
            ("[::1]:5000", "http://[::1]:5000/v2"),
        ] {
            let hosts = config.hosts_for(registry).unwrap();
            assert_eq!(urls(&hosts), [url], "{registry}");
            let host = &hosts[0];
            assert_eq!(host.capabilities, Capabilities::ALL, "{registry}");
            assert!(!host.is_mirror, "{registry}");
            assert_eq!(host.namespace_query(registry), None);
            assert!(!host.skip_verify && host.ca.is_empty() && host.client.is_empty());
            assert!(host.headers.is_empty());
        }
    }

    #[test]
    fn missing_directory_or_file_is_not_an_error() {
        let tmp = TempDir::new().unwrap();
        let missing = HostsConfig::new(Some(tmp.path().join("nope")), false);
        assert_eq!(
            urls(&missing.hosts_for("quay.io").unwrap()),
            ["https://quay.io/v2"]
        );

        // A namespace directory without hosts.toml (or with an empty one).
        fs::create_dir(tmp.path().join("quay.io")).unwrap();
        fs::write(tmp.path().join("ghcr.io"), "").unwrap();
        let config = HostsConfig::new(Some(tmp.path().to_path_buf()), false);
        assert_eq!(
            urls(&config.hosts_for("quay.io").unwrap()),
            ["https://quay.io/v2"]
        );
        // A stray file is not a namespace directory.
        assert_eq!(
            urls(&config.hosts_for("ghcr.io").unwrap()),
            ["https://ghcr.io/v2"]
        );
        write_hosts(tmp.path(), "gcr.io", "");
        assert_eq!(
            urls(&config.hosts_for("gcr.io").unwrap()),
            ["https://gcr.io/v2"]
        );
    }

    #[test]
    fn server_and_mirrors_in_file_order() {
        // Deliberately not alphabetical, to catch a sorted map.
        let (_tmp, config) = config_with(
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
capabilities = ["pull", "resolve"]

[host."https://z-mirror.example.com"]
  capabilities = ["pull"]

[host."https://a-mirror.internal:8443"]
  capabilities = ["pull", "resolve"]
"#,
        );
        let hosts = config.hosts_for("docker.io").unwrap();
        assert_eq!(
            urls(&hosts),
            [
                "https://z-mirror.example.com/v2",
                "https://a-mirror.internal:8443/v2",
                "https://registry-1.docker.io/v2",
            ]
        );
        assert_eq!(hosts[0].capabilities, Capabilities::PULL);
        assert_eq!(
            hosts[1].capabilities,
            Capabilities::PULL | Capabilities::RESOLVE
        );
        assert_eq!(
            hosts[2].capabilities,
            Capabilities::PULL | Capabilities::RESOLVE
        );
        assert_eq!(
            hosts.iter().map(|h| h.is_mirror).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(
            hosts[0].namespace_query("docker.io").as_deref(),
            Some("ns=docker.io")
        );
        assert_eq!(hosts[2].namespace_query("docker.io"), None);

        let resolvers: Vec<_> = hosts
            .iter()
            .filter(|h| h.capabilities.resolve)
            .map(|h| h.host.as_str())
            .collect();
        assert_eq!(
            resolvers,
            ["a-mirror.internal:8443", "registry-1.docker.io"]
        );
    }

    #[test]
    fn host_order_survives_subtables_dotted_keys_and_inline_tables() {
        let (_tmp, config) = config_with(
            "example.com",
            r#"
host."https://c.example".capabilities = ["pull"]

[host."https://b.example"]
  capabilities = ["pull"]
  [host."https://b.example".header]
    x-b = "1"

[host."https://a.example".header]
  x-a = "1"
"#,
        );
        let hosts = config.hosts_for("example.com").unwrap();
        let names: Vec<_> = hosts.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(
            names,
            ["c.example", "b.example", "a.example", "example.com"]
        );

        let (_tmp, config) = config_with(
            "example.com",
            r#"host = { "https://y.example" = {}, "https://x.example" = {} }"#,
        );
        let hosts = config.hosts_for("example.com").unwrap();
        let names: Vec<_> = hosts.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(names, ["y.example", "x.example", "example.com"]);
    }

    #[test]
    fn capabilities_default_to_all_like_containerd() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
[host."https://mirror.example.com"]
[host."https://empty.example.com"]
  capabilities = []
[host."https://shouting.example.com"]
  capabilities = ["PULL", "referrers"]
"#,
        );
        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(hosts[0].capabilities, Capabilities::ALL);
        assert_eq!(hosts[1].capabilities, Capabilities::ALL);
        assert_eq!(hosts[2].capabilities, Capabilities::PULL);
        assert_eq!(hosts[3].capabilities, Capabilities::ALL);
    }

    #[test]
    fn default_namespace_is_the_fallback() {
        let tmp = TempDir::new().unwrap();
        write_hosts(
            tmp.path(),
            "_default",
            r#"
[host."https://registry.example.com"]
  capabilities = ["pull", "resolve"]
  ca = "mirror.crt"
"#,
        );
        write_hosts(tmp.path(), "ghcr.io", "");
        let config = HostsConfig::new(Some(tmp.path().to_path_buf()), false);

        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(
            urls(&hosts),
            ["https://registry.example.com/v2", "https://quay.io/v2"]
        );
        assert_eq!(hosts[0].ca, [tmp.path().join("_default/mirror.crt")]);
        assert_eq!(
            hosts[0].namespace_query("quay.io").as_deref(),
            Some("ns=quay.io")
        );

        // Docker Hub's upstream default still applies through _default.
        let hosts = config.hosts_for("docker.io").unwrap();
        assert_eq!(
            urls(&hosts),
            [
                "https://registry.example.com/v2",
                "https://registry-1.docker.io/v2"
            ]
        );

        // A registry's own directory wins, even without mirrors in it.
        assert_eq!(
            urls(&config.hosts_for("ghcr.io").unwrap()),
            ["https://ghcr.io/v2"]
        );
    }

    #[test]
    fn default_namespace_server_replaces_upstream() {
        let (_tmp, config) = config_with("_default", r#"server = "https://proxy.example.com""#);
        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(urls(&hosts), ["https://proxy.example.com/v2"]);
        // The only host is still not the registry, so it needs ns=.
        assert!(hosts[0].is_mirror);
        assert_eq!(
            hosts[0].namespace_query("quay.io").as_deref(),
            Some("ns=quay.io")
        );
    }

    #[test]
    fn http_mirror_and_scheme_defaults() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
server = "quay.io"
[host."http://10.0.0.5:5000"]
[host."mirror.example.com:5000"]
[host."HTTPS://upper.example.com"]
"#,
        );
        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(
            urls(&hosts),
            [
                "http://10.0.0.5:5000/v2",
                "https://mirror.example.com:5000/v2",
                "https://upper.example.com/v2",
                "https://quay.io/v2",
            ]
        );
        assert_eq!(hosts[0].scheme, Scheme::Http);
        assert_eq!(hosts[1].scheme, Scheme::Https);
    }

    #[test]
    fn v2_is_appended_unless_present() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
server = "https://quay.io/"
[host."https://m.example/custom"]
[host."https://m.example/custom/"]
[host."https://m.example/custom/v2"]
[host."https://m.example/v2/"]
[host."https://m.example//a/./b/../c"]
"#,
        );
        let paths: Vec<_> = config
            .hosts_for("quay.io")
            .unwrap()
            .into_iter()
            .map(|h| h.path)
            .collect();
        assert_eq!(
            paths,
            [
                "/custom/v2",
                "/custom/v2",
                "/custom/v2",
                "/v2",
                "/a/c/v2",
                "/v2"
            ]
        );
    }

    #[test]
    fn override_path_uses_path_as_is() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
server = "https://registry.example.com/api"
override_path = true
[host."https://noncompliant.example/v2/prefix"]
  override_path = true
[host."https://noprefix.example"]
  override_path = true
[host."https://normal.example/custom"]
  override_path = false
"#,
        );
        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(
            urls(&hosts),
            [
                "https://noncompliant.example/v2/prefix",
                "https://noprefix.example",
                "https://normal.example/custom/v2",
                "https://registry.example.com/api",
            ]
        );
    }

    #[test]
    fn ca_string_array_and_relative_paths() {
        let (tmp, config) = config_with(
            "quay.io",
            r#"
ca = "upstream.crt"
[host."https://one.example"]
  ca = "/etc/certs/one.pem"
[host."https://two.example"]
  ca = ["/etc/certs/a.pem", "./certs/b.pem", "c.pem"]
"#,
        );
        let dir = tmp.path().join("quay.io");
        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(hosts[0].ca, [PathBuf::from("/etc/certs/one.pem")]);
        assert_eq!(
            hosts[1].ca,
            [
                PathBuf::from("/etc/certs/a.pem"),
                dir.join("certs/b.pem"),
                dir.join("c.pem"),
            ]
        );
        assert_eq!(hosts[2].ca, [dir.join("upstream.crt")]);
    }

    #[test]
    fn client_certificate_forms() {
        let (tmp, config) = config_with(
            "quay.io",
            r#"
[host."https://single.example"]
  client = "/etc/certs/client.pem"
[host."https://list.example"]
  client = ["/etc/certs/client-1.pem", "client-2.pem"]
[host."https://pairs.example"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"], ["/etc/certs/both.pem", ""]]
[host."https://mixed.example"]
  client = ["a.pem", ["b.cert", "b.key"]]
"#,
        );
        let dir = tmp.path().join("quay.io");
        let hosts = config.hosts_for("quay.io").unwrap();
        assert_eq!(
            hosts[0].client,
            [(PathBuf::from("/etc/certs/client.pem"), None)]
        );
        assert_eq!(
            hosts[1].client,
            [
                (PathBuf::from("/etc/certs/client-1.pem"), None),
                (dir.join("client-2.pem"), None),
            ]
        );
        assert_eq!(
            hosts[2].client,
            [
                (
                    PathBuf::from("/etc/certs/client.cert"),
                    Some(PathBuf::from("/etc/certs/client.key")),
                ),
                (PathBuf::from("/etc/certs/both.pem"), None),
            ]
        );
        assert_eq!(
            hosts[3].client,
            [
                (dir.join("a.pem"), None),
                (dir.join("b.cert"), Some(dir.join("b.key"))),
            ]
        );
        assert!(hosts[4].client.is_empty());
    }

    #[test]
    fn headers_string_and_array_in_file_order() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
[header]
  x-upstream = "up"

[host."https://mirror.example"]
  [host."https://mirror.example".header]
    x-zeta = "custom header"
    x-alpha = ["part a", "part b"]
"#,
        );
        let hosts = config.hosts_for("quay.io").unwrap();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            hosts[0].headers,
            [
                pair("x-zeta", "custom header"),
                pair("x-alpha", "part a"),
                pair("x-alpha", "part b"),
            ]
        );
        assert_eq!(hosts[1].headers, [pair("x-upstream", "up")]);
    }

    #[test]
    fn skip_verify_per_host() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
skip_verify = true
[host."https://strict.example"]
  skip_verify = false
[host."https://lax.example"]
  skip_verify = true
[host."https://unset.example"]
"#,
        );
        let skips: Vec<_> = config
            .hosts_for("quay.io")
            .unwrap()
            .iter()
            .map(|h| h.skip_verify)
            .collect();
        assert_eq!(skips, [false, true, false, true]);
    }

    #[test]
    fn malformed_toml_names_the_file() {
        let (tmp, config) = config_with("quay.io", "[host.\"https://m.example\"\ncapabilities = [");
        let err = config.hosts_for("quay.io").unwrap_err();
        let text = err.to_string();
        let (path, message) = parse_message(err);
        assert_eq!(path, tmp.path().join("quay.io/hosts.toml"));
        assert!(message.contains("TOML parse error"), "{message}");
        assert!(text.contains("quay.io/hosts.toml"), "{text}");
    }

    #[test]
    fn wrong_types_name_the_file_and_line() {
        for (contents, expected) in [
            ("server = 5", "line 1: `server` must be a string"),
            (
                "\nskip_verify = \"yes\"",
                "line 2: `skip_verify` must be true or false",
            ),
            ("ca = 1", "line 1: `ca` must be a path or an array of paths"),
            (
                "client = [[\"a\"]]",
                "line 1: a `client` pair must be [cert, key]",
            ),
            ("header = \"x\"", "line 1: `header` must be a table"),
            (
                "[header]\nx-a = 1",
                "line 2: header \"x-a\" must be a string",
            ),
            (
                "[header]\n\"bad name\" = \"v\"",
                "line 2: invalid header name \"bad name\"",
            ),
            ("[header]\nx-a = \"a\\r\\nb\"", "control character"),
            (
                "capabilities = \"pull\"",
                "`capabilities` must be an array of strings",
            ),
            (
                "[host.\"https://m.example\"]\ncapabilities = [\"pull\", \"fly\"]",
                "line 2: unknown capability \"fly\" for host \"https://m.example\"",
            ),
            ("host = 1", "`host` must be a table"),
            ("ca = \"\"", "empty certificate path"),
        ] {
            let (tmp, config) = config_with("quay.io", contents);
            let (path, message) = parse_message(config.hosts_for("quay.io").unwrap_err());
            assert_eq!(path, tmp.path().join("quay.io/hosts.toml"));
            assert!(message.contains(expected), "{contents:?}: {message}");
        }
    }

    #[test]
    fn invalid_urls_are_reported() {
        for (url, reason) in [
            ("ftp://m.example", "unsupported scheme"),
            ("https://", "missing host"),
            ("https://user:pw@m.example", "credentials"),
            ("https://m.example/v2?x=1", "query"),
            ("https://m.example:http", "invalid port"),
            ("https://m.example:70000", "invalid port"),
            ("https://bad host.example", "invalid host name"),
            ("https://[::1", "unterminated"),
        ] {
            let (tmp, config) = config_with("quay.io", &format!("[host.{url:?}]"));
            match config.hosts_for("quay.io").unwrap_err() {
                HostsError::InvalidUrl {
                    path,
                    url: got,
                    reason: why,
                } => {
                    assert_eq!(path, tmp.path().join("quay.io/hosts.toml"));
                    assert_eq!(got, url);
                    assert!(why.contains(reason), "{url}: {why}");
                }
                other => panic!("{url}: expected InvalidUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn plain_http_forces_the_default_upstream_only() {
        let config = HostsConfig::new(None, true);
        assert_eq!(
            urls(&config.hosts_for("registry.example.com:5000").unwrap()),
            ["http://registry.example.com:5000/v2"]
        );
        // Docker Hub is never plain HTTP, as in containerd.
        assert_eq!(
            urls(&config.hosts_for("docker.io").unwrap()),
            ["https://registry-1.docker.io/v2"]
        );

        let tmp = TempDir::new().unwrap();
        write_hosts(
            tmp.path(),
            "pinned.example",
            r#"server = "https://pinned.example""#,
        );
        write_hosts(
            tmp.path(),
            "mirrored.example",
            r#"[host."https://mirror.example"]"#,
        );
        let config = HostsConfig::new(Some(tmp.path().to_path_buf()), true);
        assert_eq!(
            urls(&config.hosts_for("pinned.example").unwrap()),
            ["https://pinned.example/v2"]
        );
        assert_eq!(
            urls(&config.hosts_for("mirrored.example").unwrap()),
            ["https://mirror.example/v2", "http://mirrored.example/v2"]
        );
    }

    #[test]
    fn docker_hub_upstream_default_and_explicit_server() {
        let (_tmp, config) = config_with(
            "docker.io",
            r#"[host."https://mirror.gcr.io"]
  capabilities = ["pull", "resolve"]"#,
        );
        let hosts = config.hosts_for("docker.io").unwrap();
        assert_eq!(
            urls(&hosts),
            [
                "https://mirror.gcr.io/v2",
                "https://registry-1.docker.io/v2"
            ]
        );
        assert!(hosts[0].is_mirror);
        assert!(!hosts[1].is_mirror);

        // containerd's documented example: docker.io as server, the API host
        // as an explicit host. Neither is a mirror of docker.io.
        let (_tmp, config) = config_with(
            "docker.io",
            r#"
server = "https://docker.io"
[host."https://registry-1.docker.io"]
  capabilities = ["pull", "resolve"]
"#,
        );
        let hosts = config.hosts_for("docker.io").unwrap();
        assert_eq!(
            urls(&hosts),
            ["https://registry-1.docker.io/v2", "https://docker.io/v2"]
        );
        assert!(hosts.iter().all(|h| !h.is_mirror));
    }

    #[test]
    fn docker_cert_files_apply_without_hosts_toml() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("registry.example.com:5000");
        fs::create_dir(&dir).unwrap();
        for name in [
            "ca.crt",
            "client.cert",
            "client.key",
            "lone.cert",
            "notes.txt",
        ] {
            fs::write(dir.join(name), "x").unwrap();
        }
        fs::create_dir(dir.join("sub.crt")).unwrap();
        let config = HostsConfig::new(Some(tmp.path().to_path_buf()), false);
        let hosts = config.hosts_for("registry.example.com:5000").unwrap();
        assert_eq!(urls(&hosts), ["https://registry.example.com:5000/v2"]);
        assert_eq!(hosts[0].ca, [dir.join("ca.crt")]);
        assert_eq!(
            hosts[0].client,
            [
                (dir.join("client.cert"), Some(dir.join("client.key"))),
                (dir.join("lone.cert"), None),
            ]
        );
    }

    #[test]
    fn hosts_from_toml_reads_the_text_as_hosts_for_reads_the_file() {
        let text = r#"
server = "https://registry.example:5000"
ca = "ca.pem"
[host."http://mirror:5000"]
  capabilities = ["pull"]
  client = [["./client.cert", "client.key"]]
"#;
        let (tmp, config) = config_with("registry.example:5000", text);
        let path = tmp.path().join("registry.example:5000").join(HOSTS_FILE);
        let hosts = config
            .hosts_from_toml("registry.example:5000", &path, text)
            .unwrap();
        assert_eq!(hosts, config.hosts_for("registry.example:5000").unwrap());
        assert_eq!(hosts[1].ca, [path.with_file_name("ca.pem")]);
        assert!(matches!(
            config.hosts_from_toml("../etc", &path, text),
            Err(HostsError::InvalidRegistry { .. })
        ));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let (_tmp, config) = config_with(
            "quay.io",
            r#"
dial_timeout = "1s"
proxy = "http://proxy:8080"
[host."https://m.example"]
  dial_timeout = "3s"
"#,
        );
        assert_eq!(config.hosts_for("quay.io").unwrap().len(), 2);
    }

    #[test]
    fn registry_names_cannot_escape_the_directory() {
        let tmp = TempDir::new().unwrap();
        write_hosts(
            tmp.path(),
            "_default",
            r#"server = "https://proxy.example""#,
        );
        let config = HostsConfig::new(Some(tmp.path().join("certs.d")), false);
        for registry in ["", "..", ".", "../_default", "a/b", "a\\b", "a..b", "host:"] {
            assert!(
                matches!(
                    config.hosts_for(registry),
                    Err(HostsError::InvalidRegistry { .. })
                ),
                "{registry:?}"
            );
        }
    }

    #[test]
    fn namespace_query_is_encoded() {
        let (_tmp, config) = config_with("_default", r#"[host."https://m.example"]"#);
        let hosts = config.hosts_for("registry.example.com:5000").unwrap();
        assert_eq!(
            hosts[0]
                .namespace_query("registry.example.com:5000")
                .as_deref(),
            Some("ns=registry.example.com%3A5000")
        );
        assert_eq!(hosts[1].namespace_query("registry.example.com:5000"), None);
    }

    #[test]
    fn capabilities_helpers() {
        assert!(Capabilities::ALL.contains(Capabilities::PULL | Capabilities::PUSH));
        assert!(!Capabilities::PULL.contains(Capabilities::RESOLVE));
        assert!(Capabilities::NONE.contains(Capabilities::NONE));
        assert_eq!(Capabilities::default(), Capabilities::NONE);
    }
}
