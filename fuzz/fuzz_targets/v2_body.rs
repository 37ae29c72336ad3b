//! Fuzz target: see `visionserve::fuzzing::v2_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| visionserve::fuzzing::v2_body(data));
