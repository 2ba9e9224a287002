//! containerd's filter syntax: each line of the input is one filter (a list
//! call takes several); what parses is matched against an image record, as
//! `ListImages` and `hoist images` do. No panic.
#![no_main]

use hoist::descriptor::Descriptor;
use hoist::digest::Digest;
use hoist::filters::Filter;
use hoist::images::OCI_INDEX;
use hoist::metadata::images::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let filters: Vec<&str> = input.lines().collect();
    let Ok(filter) = Filter::parse_all(&filters) else {
        return;
    };
    let mut image = Image::new(
        "docker.io/library/busybox:1.36",
        Descriptor::new(OCI_INDEX, Digest::of(b"index"), 1234),
    );
    image.labels.insert(
        "containerd.io/gc.root".into(),
        "2024-01-01T00:00:00Z".into(),
    );
    image
        .labels
        .insert("io.cri-containerd.image".into(), "managed".into());
    image.labels.insert("team".into(), "a b,c".into());
    let _ = filter.matches(&image);
    // An empty list matches everything.
    if filters.is_empty() {
        assert!(filter.matches(&image));
    }
});
