// Running (population) statistics of every BN layer, for every estimator, in one launch
// (cpu::ops::update_running_stats, called per layer and estimator).
//
// Per estimator e with its batches-so-far count n (per layer), batch size B:
//   keep = decay (EMA)  or  n/(n+1) (cumulative; computed in f64, then rounded to f32)
//   take = 1 − keep,  corr = 1 (biased)  or  B/(B−1) (unbiased; f64, then f32)
//   running_mean ← keep·running_mean + take·μ_B
//   running_var  ← keep·running_var  + take·(σ²_B·corr)
//   n ← n + 1
//
// Layout: the BN layers' features are concatenated: layer l owns [offset_l, offset_l+width_l)
//   of `total` features. batch_mean, batch_var: [total]; running_mean, running_var:
//   [E, total] (estimator-major); batches: [E, layers] u64; estimators: [E, 2] f64 holding
//   (decay, or −1 for the cumulative average; 1 if unbiased else 0).
// Launch: grid.x = number of BN layers (one block per layer, so the counts a block reads
//   are incremented by that block alone, after a barrier), block = 256 threads.

extern "C" __global__ void running_stats_update_f32(
    const float* __restrict__ batch_mean, const float* __restrict__ batch_var,
    const unsigned* __restrict__ layer_offset, const unsigned* __restrict__ layer_width,
    unsigned total, const double* __restrict__ estimators, unsigned n_estimators,
    unsigned batch_size,
    float* __restrict__ running_mean, float* __restrict__ running_var,
    unsigned long long* __restrict__ batches)
{
    const unsigned l = blockIdx.x, layers = gridDim.x;
    const unsigned offset = layer_offset[l], width = layer_width[l];
    for (unsigned e = 0; e < n_estimators; ++e) {
        const double decay = estimators[2 * e];
        const bool unbiased = estimators[2 * e + 1] != 0.0;
        const double n = (double)batches[(size_t)e * layers + l];
        const float keep = decay > 0.0 ? (float)decay : (float)(n / (n + 1.0));
        const float take = 1.0f - keep;
        const float corr = unbiased ? (float)((double)batch_size / ((double)batch_size - 1.0)) : 1.0f;
        float* rm = running_mean + (size_t)e * total + offset;
        float* rv = running_var + (size_t)e * total + offset;
        for (unsigned j = threadIdx.x; j < width; j += blockDim.x) {
            rm[j] = keep * rm[j] + take * batch_mean[offset + j];
            rv[j] = keep * rv[j] + take * (batch_var[offset + j] * corr);
        }
    }
    __syncthreads();  // every thread has read the counts
    for (unsigned e = threadIdx.x; e < n_estimators; e += blockDim.x) batches[(size_t)e * layers + l] += 1;
}
