//! Input shaping shared by the fuzz targets and `tests/fuzz_regressions.rs` (which includes
//! this file by path), so that a corpus file replays exactly as it was fuzzed.

/// A safetensors file starts with the little-endian u64 length of its JSON header, and the
/// checkpoint's configuration lives in that header. Almost every mutation of the header
/// changes its length and breaks the prefix, so a fuzzer that only sees raw bytes rarely gets
/// past the first check. This returns the input with the prefix rewritten to the length of
/// the JSON value after it (and the spaces that pad it), or `None` when no JSON value follows
/// or the prefix is already right: the checkpoint target loads both versions.
pub fn with_repaired_header_length(data: &[u8]) -> Option<Vec<u8>> {
    let declared = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let rest = &data[8..];
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
    values.next()?.ok()?;
    let mut end = values.byte_offset();
    while rest.get(end) == Some(&b' ') {
        end += 1;
    }
    if declared == end as u64 {
        return None;
    }
    let mut repaired = Vec::with_capacity(data.len());
    repaired.extend_from_slice(&(end as u64).to_le_bytes());
    repaired.extend_from_slice(rest);
    Some(repaired)
}

/// A valid checkpoint (BN, f64, momentum, two estimators) whose metadata the
/// `checkpoint_config` target replaces.
pub const TEMPLATE: &[u8] =
    include_bytes!("../seeds/checkpoint/valid-bn-f64-momentum-two-estimators.safetensors");

/// The metadata keys the `checkpoint_config` target fills from its input, in input order.
pub const CONFIG_KEYS: [&str; 4] = ["model", "train", "progress", "dtype"];

/// The template checkpoint with its metadata entries replaced: the input is split at NUL
/// bytes into the JSON texts of [`CONFIG_KEYS`] (missing parts keep the template's), and the
/// metadata sealed again (the current format version, its checksum over tensors and
/// metadata), so everything the loader does after the checksum, the configuration-driven
/// part that the raw-bytes target rarely reaches, is exercised on arbitrary configurations,
/// whatever version the template was written in.
pub fn template_with_config(data: &[u8]) -> Vec<u8> {
    use safetensors::tensor::SafeTensors;
    let file =
        SafeTensors::deserialize(TEMPLATE).expect("the template is a valid safetensors file");
    let (_, header) =
        SafeTensors::read_metadata(TEMPLATE).expect("the template is a valid safetensors file");
    let mut metadata = header.metadata().clone().unwrap_or_default();
    for (key, text) in CONFIG_KEYS.iter().zip(data.split(|&b| b == 0)) {
        metadata.insert(key.to_string(), String::from_utf8_lossy(text).into_owned());
    }
    let tensors = file.tensors();
    bntrain::model::checkpoint::seal_metadata(&tensors, &mut metadata);
    safetensors::serialize(tensors, Some(metadata))
        .expect("the template's tensors serialize")
}
