//! The IDX reader on arbitrary bytes, as images and as labels, raw and as the contents of a
//! `.gz`: any input may give an error, none may panic or allocate hugely.
#![no_main]

use bntrain::data::{parse_idx_images, parse_idx_labels};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    for compressed in [false, true] {
        let path = Path::new(if compressed {
            "fuzz-idx.gz"
        } else {
            "fuzz-idx"
        });
        if let Ok(images) = parse_idx_images(data, path, compressed) {
            assert_eq!(
                images.pixels.len(),
                images.count * images.rows * images.cols
            );
        }
        let _ = parse_idx_labels(data, path, compressed);
    }
});
