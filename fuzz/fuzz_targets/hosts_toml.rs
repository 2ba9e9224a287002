//! A `hosts.toml` text read as containerd's `config_path` would hold it,
//! for Docker Hub and for a registry with a port: no panic, and every host
//! it yields is one hoist could contact (a valid `host[:port]`, headers
//! that cannot split a request).
#![no_main]

use std::path::Path;

use hoist::remote::HostsConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (registry, plain_http) in [("docker.io", false), ("registry.example:5000", true)] {
        let config = HostsConfig::new(Some("/etc/hoist/certs.d".into()), plain_http);
        let path = Path::new("/etc/hoist/certs.d")
            .join(registry)
            .join("hosts.toml");
        let Ok(hosts) = config.hosts_from_toml(registry, &path, text) else {
            continue;
        };
        assert!(!hosts.is_empty(), "the upstream is always last");
        for host in &hosts {
            if let Err(e) = HostsConfig::check_registry(&host.host) {
                panic!("host {:?} from {text:?}: {e}", host.host);
            }
            assert!(host.path.is_empty() || host.path.starts_with('/'));
            assert!(!host.path.contains("//"), "{:?}", host.path);
            for (name, value) in &host.headers {
                assert!(!name.is_empty());
                assert!(!value.chars().any(|c| c.is_ascii_control() && c != '\t'));
            }
            let url = host.base_url();
            assert!(url.starts_with(host.scheme.as_str()));
            if let Some(query) = host.namespace_query(registry) {
                assert!(query.starts_with("ns="));
            }
        }
    }
});
