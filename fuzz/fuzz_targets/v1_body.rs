//! Fuzz target: see `visionserve::fuzzing::v1_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| visionserve::fuzzing::v1_body(data));
