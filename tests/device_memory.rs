//! The up-front device-memory check: its estimate and its message (no GPU needed).

use bntrain::bench::synthetic_dataset;
use bntrain::backend::GemmPrecision;
use bntrain::cuda::{device_bytes_needed, CudaError, CudaOptions};
use bntrain::model::{ModelConfig, TrainConfig};

#[test]
fn the_estimate_covers_data_parameters_and_activations() {
    let data = synthetic_dataset(6000, 1000, 784, 3);
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let with = |gemm, eval_stream| CudaOptions { gemm, eval_stream, backward_streams: Some(false), ..CudaOptions::default() };
    let backward = |gemm| CudaOptions { gemm, backward_streams: Some(true), ..CudaOptions::default() };
    let bytes = device_bytes_needed(&model, &train, &data, &with(GemmPrecision::F32, false));
    let dataset = 7000 * 785;
    let parameters = model.parameter_count().unwrap() * 4 * 2;
    assert!(bytes > dataset + parameters + (32 << 20), "data, parameters and cuBLAS's 32 MiB workspace: {bytes}");
    // The evaluation chunk takes the larger split at once (6000 rows here), each row with its
    // input, four activations per layer and two gradient rows.
    let eval_rows = 6000 * (784 + 4 * (100 + 100 + 10) + 2 * 784) * 4;
    assert!(bytes > eval_rows, "{bytes}");
    assert!(bytes < 4 * (dataset + parameters) + 2 * eval_rows + (64 << 20), "a loose upper bound, not a wild one: {bytes}");

    // A wide network scales with its parameters: 784-65536-65536-10 needs > 2·65536² f32s.
    let mut wide = model.clone();
    wide.hidden = vec![65536, 65536];
    assert!(device_bytes_needed(&wide, &train, &data, &with(GemmPrecision::F32, false)) > 2 * 65536 * 65536 * 4);

    // bf16 GEMMs add two operand copies (u16) of the largest operand: here the 6000-row
    // evaluation chunk's 784 inputs; tf32 adds nothing.
    assert_eq!(device_bytes_needed(&model, &train, &data, &with(GemmPrecision::Tf32, false)), bytes);
    let bf16_operands = 2 * 2 * 6000 * 784;
    assert_eq!(device_bytes_needed(&model, &train, &data, &with(GemmPrecision::Bf16, false)), bytes + bf16_operands);

    // A stream for evaluation points brings its own cuBLAS workspace and bf16 operands.
    assert_eq!(device_bytes_needed(&model, &train, &data, &with(GemmPrecision::F32, true)), bytes + (32 << 20));
    assert_eq!(device_bytes_needed(&model, &train, &data, &with(GemmPrecision::Bf16, true)), bytes + (32 << 20) + 2 * bf16_operands);
    // The backward's second stream: a workspace, a second dz buffer ([60, 784] f32s), and
    // bf16 operands of the training batch's size (60 rows of 784, under W1's 100 × 784).
    let dz = 60 * 784 * 4;
    assert_eq!(device_bytes_needed(&model, &train, &data, &backward(GemmPrecision::F32)), bytes + (32 << 20) + dz);
    assert_eq!(device_bytes_needed(&model, &train, &data, &backward(GemmPrecision::Bf16)), bytes + bf16_operands + (32 << 20) + dz + 2 * 2 * 100 * 784);
    // By default that stream comes with f32 GEMMs only.
    let default_for = |gemm| device_bytes_needed(&model, &train, &data, &CudaOptions { gemm, ..CudaOptions::default() });
    assert_eq!(default_for(GemmPrecision::F32), device_bytes_needed(&model, &train, &data, &backward(GemmPrecision::F32)));
    assert_eq!(default_for(GemmPrecision::Tf32), device_bytes_needed(&model, &train, &data, &with(GemmPrecision::Tf32, false)));
}

#[test]
fn out_of_memory_says_how_much_and_what_to_do() {
    let msg = CudaError::OutOfMemory { bytes_needed: 34_359_738_368 }.to_string();
    assert!(msg.contains("out of GPU memory"), "{msg}");
    assert!(msg.contains("32768.0 MiB"), "{msg}");
    assert!(msg.contains("--device cpu"), "{msg}");
}
