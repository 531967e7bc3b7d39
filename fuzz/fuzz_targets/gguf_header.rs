//! Fuzz target: GGUF header parsing must return Ok or Err on any input, never panic, hang or
//! allocate without bound. Accepted headers are checked for internal consistency.
#![no_main]

use flowgate_formats::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = GgufFile::parse_bytes(data) {
        assert!(g.alignment.is_power_of_two());
        assert!(g.tensors.is_empty() || g.data_offset <= data.len() as u64);
        for t in &g.tensors {
            assert!(t.offset >= g.data_offset);
            assert!(t.offset + t.nbytes <= data.len() as u64);
            assert_eq!(t.dtype.tensor_bytes(&t.shape()).ok(), Some(t.nbytes));
        }
    }
});
