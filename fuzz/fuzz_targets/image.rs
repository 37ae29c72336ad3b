//! Fuzz target: see `visionserve::fuzzing::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| visionserve::fuzzing::image(data));
