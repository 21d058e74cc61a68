#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfetch::fuzz::krpc(data));
