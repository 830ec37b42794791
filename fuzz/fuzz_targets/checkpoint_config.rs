//! The checkpoint loader on a valid checkpoint whose configuration metadata (model, train,
//! progress, dtype) is arbitrary: see `template_with_config`. Errors are fine; a panic, or an
//! allocation sized from the configuration rather than from the file, is a crash.
#![no_main]

use bntrain::model::checkpoint::Checkpoint;
use bntrain_fuzz::template_with_config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = Checkpoint::from_bytes(&template_with_config(data), Path::new("fuzz.safetensors"));
});
