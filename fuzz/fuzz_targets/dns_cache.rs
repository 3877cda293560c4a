#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbx_net::fuzzing::dns_cache(data));
