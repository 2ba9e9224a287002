//! The `WWW-Authenticate` challenge parser, and the base64 `auth` field of
//! CRI and docker credentials, on any string: no panic.
#![no_main]

use hoist::remote::Credentials;
use hoist::remote::auth::{Challenge, parse_challenge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    match parse_challenge(input) {
        Some(Challenge::Bearer { realm, .. }) => {
            // The realm is a parameter's value: never longer than the header.
            assert!(realm.len() <= input.len());
        }
        Some(Challenge::Basic) | None => {}
    }
    if let Ok(Credentials::Basic { username, .. }) = Credentials::from_auth_field(input) {
        assert!(!username.contains(':'));
    }
});
