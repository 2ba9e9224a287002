//! `hoist serve` with `metrics_address`: CRI pulls, a failed pull and a
//! removal show in a scrape of `/metrics`, read with a strict parser of the
//! OpenMetrics text format.

#[path = "../tests/common/mod.rs"]
mod common;
mod daemon;

use common::*;
use daemon::{Daemon, Options, spec};
use k8s_cri::v1::{PullImageRequest, RemoveImageRequest};
use std::collections::{BTreeMap, HashMap};

type Labels = BTreeMap<String, String>;

/// One sample line: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

/// Parses an exposition strictly: every line a `# HELP`/`# TYPE`/`# UNIT`
/// comment or a sample, every sample of a family whose TYPE came first and
/// named as that type allows, histogram buckets cumulative up to `+Inf` =
/// `_count`, and `# EOF` last. Panics on anything else.
fn parse(text: &str) -> Vec<Sample> {
    let body = text
        .strip_suffix("# EOF\n")
        .unwrap_or_else(|| panic!("no final # EOF:\n{text}"));
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, family) = (parts.next(), parts.next());
            let rest = parts.next().unwrap_or_default();
            let family = family.unwrap_or_else(|| panic!("bad comment {line:?}"));
            assert!(valid_name(family), "bad family name in {line:?}");
            match kind {
                Some("TYPE") => {
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset"
                        ]
                        .contains(&rest),
                        "bad type in {line:?}"
                    );
                    let earlier = types.insert(family.to_string(), rest.to_string());
                    assert!(earlier.is_none(), "family typed twice: {line:?}");
                }
                Some("HELP" | "UNIT") => {}
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let sample = parse_sample(line);
        let family_of = |suffixes: &[&'static str]| {
            suffixes.iter().find_map(|&s| {
                let family = sample.name.strip_suffix(s)?;
                types.get(family).map(|t| (t.clone(), s))
            })
        };
        let (kind, suffix) = family_of(&["_total", "_created", "_bucket", "_sum", "_count"])
            .or_else(|| family_of(&[""]))
            .unwrap_or_else(|| panic!("sample of no typed family: {line:?}"));
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        assert!(allowed.contains(&suffix), "{kind} sample {line:?}");
        if suffix == "_total" || suffix == "_count" || suffix == "_bucket" {
            assert!(sample.value >= 0.0, "negative count: {line:?}");
        }
        samples.push(sample);
    }
    check_histograms(&samples);
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Sample {
    let end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = &line[..end];
    assert!(valid_name(name), "bad metric name in {line:?}");
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            if let Some((i, '}')) = chars.peek().copied() {
                rest = &inner[i + 1..];
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            assert!(valid_name(&key), "bad label name {key:?} in {line:?}");
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some(c) => value.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            }
            assert!(labels.insert(key, value).is_none(), "label twice: {line:?}");
            match chars.peek().map(|(_, c)| *c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                other => panic!("expected , or }} but found {other:?} in {line:?}"),
            }
        }
    }
    let fields: Vec<&str> = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no space before the value: {line:?}"))
        .split(' ')
        .collect();
    assert!(
        matches!(fields.len(), 1 | 2),
        "value and at most a timestamp: {line:?}"
    );
    let value = match fields[0] {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
    };
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// Each histogram series: buckets cumulative, the `+Inf` one equal to `_count`.
fn check_histograms(samples: &[Sample]) {
    let mut series: BTreeMap<(String, Labels), Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        let Some(family) = s.name.strip_suffix("_bucket") else {
            continue;
        };
        let mut labels = s.labels.clone();
        let le = labels.remove("le").expect("a bucket without le");
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("a numeric le")
        };
        series
            .entry((family.to_string(), labels))
            .or_default()
            .push((le, s.value));
    }
    for ((family, labels), buckets) in series {
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{family} {labels:?} buckets not cumulative: {buckets:?}"
        );
        let (le, count) = *buckets.last().expect("at least one bucket");
        assert_eq!(le, f64::INFINITY, "{family} {labels:?} ends below +Inf");
        let counted = samples
            .iter()
            .find(|s| s.name == format!("{family}_count") && s.labels == labels)
            .map(|s| s.value);
        assert_eq!(counted, Some(count), "{family} {labels:?}");
    }
}

/// The value of the sample `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

async fn get(url: &str) -> reqwest::Response {
    hoist::remote::install_tls_provider();
    reqwest::get(url)
        .await
        .expect("the metrics listener answers")
}

async fn scrape(address: &str) -> Vec<Sample> {
    let response = get(&format!("http://{address}/metrics")).await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("an ASCII content type")
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse(&response.text().await.expect("a text body"))
}

#[test]
fn the_parser_refuses_what_is_not_the_format() {
    let good = "# HELP a_total x.\n# TYPE a counter\na_total{k=\"v\\\"\"} 1\n# EOF\n";
    let parsed = parse(good);
    assert_eq!(value(&parsed, "a_total", &[("k", "v\"")]), Some(1.0));
    for bad in [
        "# TYPE a counter\na_total 1\n",             // no EOF
        "a_total 1\n# EOF\n",                        // no TYPE
        "# TYPE a counter\na 1\n# EOF\n",            // counter without _total
        "# TYPE a counter\na_total{k=v} 1\n# EOF\n", // unquoted label
        "# TYPE a counter\na_total one\n# EOF\n",    // not a number
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n",
    ] {
        let refused = std::panic::catch_unwind(|| parse(bad)).is_err();
        assert!(refused, "accepted {bad:?}");
    }
}

#[tokio::test]
async fn pulls_removals_and_rpcs_show_in_the_metrics_as_root() {
    require_root!();
    let reg = Registry::start();
    let layers = [random_layer(1, 50_000), random_layer(2, 30_000)];
    let img = push_image(
        &reg,
        "metrics/app",
        Some("v1"),
        &layers,
        ("linux", host_arch()),
        false,
    )
    .await;
    let dir = common::mounts::TempRoot::new();
    let (root, socket) = (dir.path().join("root"), dir.path().join("run/hoist.sock"));
    let address = format!("127.0.0.1:{}", free_port());
    let options = Options {
        metrics_address: Some(address.clone()),
        ..Default::default()
    };
    let mut daemon = Daemon::start_with(&root, &socket, &options, &[]);
    let mut c = daemon.client().await;

    let before = scrape(&address).await;
    assert_eq!(value(&before, "hoist_pulls_in_flight", &[]), Some(0.0));
    assert_eq!(
        value(&before, "hoist_pulls_total", &[("outcome", "success")]),
        None
    );

    let image = format!("{}/metrics/app:v1", reg.addr);
    let pulled = c
        .pull_image(PullImageRequest {
            image: spec(&image),
            ..Default::default()
        })
        .await
        .expect("the pull succeeds")
        .into_inner();
    assert_eq!(pulled.image_ref, img.config.digest.to_string());
    let missing = c
        .pull_image(PullImageRequest {
            image: spec(&format!("{}/metrics/app:absent", reg.addr)),
            ..Default::default()
        })
        .await
        .expect_err("no such tag");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let after = scrape(&address).await;
    let v = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels);
    assert_eq!(v("hoist_pulls_total", &[("outcome", "success")]), Some(1.0));
    assert_eq!(
        v("hoist_pulls_total", &[("outcome", "not_found")]),
        Some(1.0)
    );
    assert_eq!(v("hoist_pulls_in_flight", &[]), Some(0.0));
    let blobs: u64 = img.layers.iter().map(|l| l.size).sum::<u64>() + img.config.size;
    let from_registry =
        v("hoist_fetched_bytes_total", &[("host", &reg.addr)]).expect("bytes counted by host");
    assert!(
        from_registry >= blobs as f64,
        "{from_registry} < {blobs} bytes of blobs"
    );
    let success = [("outcome", "success")];
    assert_eq!(v("hoist_pull_bytes_count", &success), Some(1.0));
    let pull_bytes = v("hoist_pull_bytes_sum", &success).expect("the pull's bytes");
    assert!(pull_bytes >= blobs as f64, "{pull_bytes} < {blobs}");
    assert_eq!(v("hoist_pull_duration_seconds_count", &success), Some(1.0));
    assert_eq!(
        v("hoist_layers_applied_total", &[]),
        Some(layers.len() as f64)
    );
    let applied = v("hoist_applied_bytes_total", &[]).expect("applied bytes");
    assert!(applied > 0.0, "{applied}");
    assert_eq!(
        v("hoist_layer_apply_duration_seconds_count", &[]),
        Some(layers.len() as f64)
    );
    let rpc = |code: &str| {
        v(
            "hoist_cri_request_duration_seconds_count",
            &[("method", "PullImage"), ("code", code)],
        )
    };
    assert_eq!(rpc("OK"), Some(1.0));
    assert_eq!(rpc("NotFound"), Some(1.0));
    // Manifest, config and two layers, and the snapshots they made.
    let content = [("store", "content")];
    assert!(v("hoist_store_inodes", &content).expect("content inodes") >= 4.0);
    assert!(v("hoist_store_bytes", &content).expect("content bytes") >= blobs as f64);
    let snapshots = [("store", "snapshots")];
    assert!(v("hoist_store_inodes", &snapshots).expect("snapshot inodes") >= 1.0);

    c.remove_image(RemoveImageRequest {
        image: spec(&image),
    })
    .await
    .expect("removed");
    let removed = scrape(&address).await;
    let v = |name: &str, labels: &[(&str, &str)]| value(&removed, name, labels);
    assert!(v("hoist_gc_runs_total", &[]).expect("GC counted") >= 1.0);
    let freed = v("hoist_gc_freed_bytes_total", &[]).expect("freed bytes");
    assert!(freed >= blobs as f64, "{freed} < {blobs}");
    assert_eq!(v("hoist_store_inodes", &content), Some(0.0));
    assert_eq!(
        v(
            "hoist_cri_request_duration_seconds_count",
            &[("method", "RemoveImage"), ("code", "OK")]
        ),
        Some(1.0)
    );

    // Only /metrics is served.
    assert_eq!(get(&format!("http://{address}/")).await.status(), 404);
    assert_eq!(daemon.stop(), Some(0));
}
