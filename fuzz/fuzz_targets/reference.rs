//! `reference::parse` on any string: no panic, and what it accepts is a
//! normalised reference that reads back as itself in its canonical and its
//! familiar form.
#![no_main]

use hoist::reference::{self, Reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = reference::parse(input) else {
        return;
    };
    assert!(
        r.tag().is_some() != r.digest().is_some(),
        "{input:?}: exactly one of tag and digest"
    );
    let canonical = r.to_string();
    assert_eq!(reparse(&canonical), r, "{input:?}: canonical {canonical:?}");
    let familiar = r.familiar();
    assert_eq!(reparse(&familiar), r, "{input:?}: familiar {familiar:?}");
    let repository = r.repository();
    assert!(canonical.starts_with(&repository), "{input:?}");
    // Re-pinning keeps the one-pin invariant and the name.
    if let Some(tag) = r.tag() {
        let pinned = r.with_tag(tag).expect("a parsed tag is valid");
        assert_eq!(pinned, r);
    }
    if let Some(digest) = r.digest() {
        let tagged = r.with_tag("latest").expect("latest is a valid tag");
        assert_eq!(tagged.digest(), None);
        let pinned = tagged
            .with_digest(digest)
            .expect("a parsed digest is valid");
        assert_eq!(pinned, r);
    }
});

fn reparse(s: &str) -> Reference {
    match reference::parse(s) {
        Ok(r) => r,
        Err(e) => panic!("{s:?} does not parse back: {e}"),
    }
}
