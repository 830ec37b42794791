// What the fused kernels (fused_step.cu, fused_cluster.cu) share: the layer table's fields,
// the kernels' parameters (see fused_step.cu's header for their layout) and the running
// statistics' rounding.
#pragma once
#include <stdint.h>

// What the CPU emulation (tests/kernel_emulation/cuda_emu.h) replaces: a trap (there, an
// abort with a message); the aligned 32- and 128-bit loads and stores of pixels and staged
// rows, and 4-float loads and stores (there, byte copies, without type punning, that abort
// where the GPU would fault: on an address not aligned to the access).
#ifndef FUSED_TRAP
#define FUSED_TRAP() __trap()
#endif
// The dynamic shared memory the launch gave, in bytes (the emulation: what its launch gave).
#ifndef FUSED_DYNAMIC_BYTES
#define FUSED_DYNAMIC_BYTES() fused_dynamic_smem_size()
__device__ __forceinline__ unsigned fused_dynamic_smem_size() {
    unsigned bytes;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}
#endif
#ifndef FUSED_LOAD_U32
#define FUSED_LOAD_U32(p) (*(const unsigned*)(p))
#endif
#ifndef FUSED_STORE_U32
#define FUSED_STORE_U32(p, v) (*(unsigned*)(p) = (v))
#endif
#ifndef FUSED_LOAD_U128
#define FUSED_LOAD_U128(p) (*(const uint4*)(p))
#endif
#ifndef FUSED_STORE_U128
#define FUSED_STORE_U128(p, v) (*(uint4*)(p) = (v))
#endif
#ifndef FUSED_LOAD_F4
#define FUSED_LOAD_F4(p) (*(const float4*)(p))
#endif
#ifndef FUSED_STORE_F4
#define FUSED_STORE_F4(p, v) (*(float4*)(p) = (v))
#endif

#define LAYER_FIELDS 10
#define L_IN 0
#define L_OUT 1
#define L_W 2
#define L_BIAS 3
#define L_GAMMA 4
#define L_BETA 5
#define L_ACT 6
#define L_COL 7
#define L_BN 8
#define L_STAGE 9

// A running statistic's update, keep·old + take·x, rounded as written: one fused multiply-add
// over a rounded product, whichever kernel computes it (left to itself, the compiler fuses a
// different product in each, and the staged and unstaged kernels would differ in the last bit).
__device__ __forceinline__ float blend(float keep, float old, float take, float x) {
    return __fmaf_rn(take, x, __fmul_rn(keep, old));
}

// Estimator e's factors after `seen` batches (running_stats.cu's arithmetic): the old
// statistic's weight (the decay, or n/(n+1) for the cumulative average), the new batch's,
// and the unbiased variance's correction B/(B−1) (or 1).
struct EstimatorFactors {
    float keep, take, corr;
};
// From the estimator's row ([E, 2] f64: decay, unbiased), as loaded.
__device__ __forceinline__ EstimatorFactors estimator_factors_of(double decay, double unbiased, unsigned long long seen, unsigned batch) {
    const double n = (double)seen;
    const float keep = decay > 0.0 ? (float)decay : (float)(n / (n + 1.0));
    const float corr = unbiased != 0.0 ? (float)((double)batch / ((double)batch - 1.0)) : 1.0f;
    return EstimatorFactors{keep, 1.0f - keep, corr};
}
__device__ __forceinline__ EstimatorFactors estimator_factors(const double* estimators, unsigned e, unsigned long long seen, unsigned batch) {
    return estimator_factors_of(estimators[2 * e], estimators[2 * e + 1], seen, batch);
}

// One BN feature's running mean and variance, updated in place by estimator factors `f`
// with the batch's mean and (biased) variance.
__device__ __forceinline__ void update_running_stats(const EstimatorFactors& f, float* mean, float* var, float mu, float sigma2) {
    *mean = blend(f.keep, *mean, f.take, mu);
    *var = blend(f.keep, *var, f.take, __fmul_rn(sigma2, f.corr));
}

// One SGD step of a weight w with gradient g (sgd.cu's arithmetic): the new weight, w − lr·v
// after v ← μ·v + g (*v updated), or w − lr·g without velocity (v null). Every fused
// kernel's update goes through it, so that they all round alike.
__device__ __forceinline__ float sgd_value(float w, float g, float* v, float lr, float momentum) {
    if (v != nullptr) {
        const float vi = momentum * *v + g;
        *v = vi;
        return w - lr * vi;
    }
    return w - lr * g;
}

// Parameter i's SGD step with gradient g. w holds its value, and v its velocity where there
// is one (velocity non-null: momentum), when `loaded`; else both are loaded here from
// params[i] and velocity[i]. The new value goes to to[i] (params, or a copy elsewhere), then
// the new velocity to velocity[i]; the new value is also returned.
__device__ __forceinline__ float sgd_step_at(
    const float* params, float* to, float* velocity, size_t i, float g, float& w, float& v, bool loaded, float lr, float momentum)
{
    if (!loaded) {
        w = params[i];
        if (velocity != nullptr) v = velocity[i];
    }
    const float updated = sgd_value(w, g, velocity != nullptr ? &v : nullptr, lr, momentum);
    to[i] = updated;
    if (velocity != nullptr) velocity[i] = v;
    return updated;
}

// One SGD step on parameter i, in place.
__device__ __forceinline__ void sgd_element(float* params, const float* grads, float* velocity, size_t i, float lr, float momentum) {
    float w, v = 0.0f;
    (void)sgd_step_at(params, params, velocity, i, grads[i], w, v, false, lr, momentum);
}

// The kernels' parameters (see the header's Layout), and the same names as arguments; P
// prefixes every name (empty for the one-network kernels, a_ and b_ for the pair kernels).
#define FUSED_PARAMS_P(P)                                                                                             \
    const uint8_t* __restrict__ P##images, const uint8_t* __restrict__ P##labels, unsigned P##count,                   \
    unsigned P##features, const unsigned* __restrict__ P##order, unsigned P##order_len, unsigned* P##cursor,           \
    const int* __restrict__ P##layer_info, unsigned P##n_layers, int P##weight_row_stage, unsigned P##batch,           \
    float P##epsilon, int P##activation, float P##grad_scale, float P##lr, float P##momentum,                          \
    float* P##params, float* P##grads, float* P##velocity, const double* __restrict__ P##estimators,                  \
    unsigned P##n_estimators, unsigned P##bn_total, unsigned P##bn_layers, float* P##running_mean,                    \
    float* P##running_var, unsigned long long* P##batches, float* P##acts, float* P##xhat, float* P##dz,              \
    float* P##inv_std, double* P##row_loss, unsigned* P##row_correct, double* P##loss_sum,                            \
    unsigned long long* P##correct, unsigned* P##barrier, unsigned P##steps
#define FUSED_ARGS_P(P)                                                                                               \
    P##images, P##labels, P##count, P##features, P##order, P##order_len, P##cursor, P##layer_info, P##n_layers,       \
    P##weight_row_stage, P##batch, P##epsilon, P##activation, P##grad_scale, P##lr, P##momentum, P##params,           \
    P##grads, P##velocity, P##estimators, P##n_estimators, P##bn_total, P##bn_layers, P##running_mean,               \
    P##running_var, P##batches, P##acts, P##xhat, P##dz, P##inv_std, P##row_loss, P##row_correct, P##loss_sum,         \
    P##correct, P##barrier, P##steps
// The arguments of network B where C holds, of A otherwise: one call of the body for either.
// What the pair launcher gives both networks alike (the batches, the hyperparameters, the
// layer count, the staging layout, the barrier) is taken from A, so it stays a kernel
// parameter instead of taking a register.
#define FUSED_ARGS_SELECT(C, A, B) \
    A##images, A##labels, A##count, A##features, A##order, A##order_len, (C ? B##cursor : A##cursor), \
    (C ? B##layer_info : A##layer_info), A##n_layers, A##weight_row_stage, A##batch, A##epsilon, A##activation, \
    A##grad_scale, A##lr, A##momentum, (C ? B##params : A##params), (C ? B##grads : A##grads), \
    (C ? B##velocity : A##velocity), (C ? B##estimators : A##estimators), \
    (C ? B##n_estimators : A##n_estimators), (C ? B##bn_total : A##bn_total), (C ? B##bn_layers : A##bn_layers), \
    (C ? B##running_mean : A##running_mean), (C ? B##running_var : A##running_var), \
    (C ? B##batches : A##batches), (C ? B##acts : A##acts), (C ? B##xhat : A##xhat), (C ? B##dz : A##dz), \
    (C ? B##inv_std : A##inv_std), (C ? B##row_loss : A##row_loss), (C ? B##row_correct : A##row_correct), \
    (C ? B##loss_sum : A##loss_sum), (C ? B##correct : A##correct), A##barrier, A##steps
#define FUSED_PARAMS FUSED_PARAMS_P()
#define FUSED_ARGS FUSED_ARGS_P()
