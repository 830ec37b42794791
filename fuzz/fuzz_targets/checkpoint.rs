//! The checkpoint loader on arbitrary bytes, and on the same bytes with the safetensors
//! header length repaired (see `with_repaired_header_length`), so that mutations of the
//! header's configuration reach the code that trusts it: any input may give an error, none
//! may panic or allocate hugely.
#![no_main]

use bntrain::model::checkpoint::Checkpoint;
use bntrain_fuzz::with_repaired_header_length;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let _ = Checkpoint::from_bytes(data, path);
    if let Some(repaired) = with_repaired_header_length(data) {
        let _ = Checkpoint::from_bytes(&repaired, path);
    }
});
