//! Fuzz target: safetensors header parsing must return Ok or Err on any input, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flowgate_formats::safetensors::parse_header(data);
});
