#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| tower_coalesce::fuzz::body_keys(bytes));
