#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfetch::fuzz::tracker_udp(data));
