//! The json decoder through the real entry point, with content type `application/json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::check(data, Some("application/json"));
});
