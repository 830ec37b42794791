// The CUDA kernels of cuda/*.cu, compiled as C++ against cuda_emu.h (one std::thread per
// CUDA thread, real barriers, the launch shapes of src/cuda/kernels.rs) and checked against
// double-precision references written out here, on awkward sizes, with poisoned outputs.
// This is how CI, which has no GPU, checks every kernel's arithmetic and indexing; the GPU
// tests (tests/gpu_kernels.rs) check the same kernels on a device against src/cpu/ops.rs.
// Run: scripts/kernel-emulation.sh
#include "cuda_emu.h"
#include "gather.cu"
#include "batchnorm.cu"
#include "activation.cu"
#include "softmax_xent.cu"
#include "running_stats.cu"
#include "sgd.cu"
#include "fused_step.cu"
#include "fused_cluster.cu"
#include "finite.cu"
#include "bf16.cu"
#include "small_gemm.cu"
#include <algorithm>
#include <array>
#include <string>

static uint64_t rs = 88172645463325252ull;
static double rnd() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (rs >> 11) * (1.0 / 9007199254740992.0); }
static std::vector<float> uni(size_t n, float lo, float hi) { std::vector<float> v(n); for (auto& x : v) x = lo + (hi - lo) * (float)rnd(); return v; }
static int failures = 0;
static void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double atol, double rtol, size_t tail_from = SIZE_MAX) {
    size_t bad = 0, worst = 0; double wex = -1;
    for (size_t i = 0; i < want.size(); ++i) {
        // A NaN reference wants a NaN; a NaN where the reference is a number is a failure.
        double ex = std::isnan(want[i]) ? (std::isnan(got[i]) ? -1.0 : INFINITY)
                  : std::isnan(got[i]) ? INFINITY : fabs(got[i] - want[i]) - (atol + rtol * fabs(want[i]));
        if (ex > 0) { bad++; if (ex > wex) { wex = ex; worst = i; } }
    }
    for (size_t i = want.size(); i < got.size(); ++i) if (!std::isnan(got[i])) { printf("%s: wrote past end at %zu\n", what.c_str(), i); failures++; break; }
    if (bad) { failures++; printf("FAIL %s: %zu/%zu bad, worst %zu got %g want %g\n", what.c_str(), bad, want.size(), worst, got[worst], want[worst]); }
}
static std::vector<float> poison(size_t n) { return std::vector<float>(n + 5, NAN); }
static dim3 cols(unsigned w) { return {(w + TILE_COLS - 1) / TILE_COLS, 1, 1}; }
static dim3 ew(size_t n) { return {(unsigned)std::clamp<size_t>((n + 255) / 256, 1, 4096), 1, 1}; }
static double act(int a, double y) { return a == 0 ? 1.0 / (1.0 + exp(-y)) : (y > 0 ? y : 0); }
static double actb(int a, double o, double g) { return a == 0 ? g * o * (1 - o) : (o > 0 ? g : 0); }
#include "fused.inc"

// The BN forward with batch statistics in f64 (two-pass moments) of a [rows, width] z,
// and the check of a kernel's six outputs against it.
struct BnForward { std::vector<double> mean, var, inv_std, x_hat, y, a; };
static BnForward bn_forward_reference(const std::vector<float>& z, const std::vector<float>& g, const std::vector<float>& b, float eps, int a, unsigned rows, unsigned width) {
    size_t n = (size_t)rows * width;
    BnForward f{std::vector<double>(width), std::vector<double>(width), std::vector<double>(width), std::vector<double>(n), std::vector<double>(n), std::vector<double>(n)};
    for (unsigned c = 0; c < width; ++c) {
        double s = 0; for (unsigned r = 0; r < rows; ++r) s += z[(size_t)r * width + c];
        f.mean[c] = s / rows;
        double q = 0; for (unsigned r = 0; r < rows; ++r) { double d = z[(size_t)r * width + c] - f.mean[c]; q += d * d; }
        f.var[c] = q / rows; f.inv_std[c] = 1 / sqrt(f.var[c] + (double)eps);
        for (unsigned r = 0; r < rows; ++r) { size_t i = (size_t)r * width + c; f.x_hat[i] = (z[i] - f.mean[c]) * f.inv_std[c]; f.y[i] = g[c] * f.x_hat[i] + b[c]; f.a[i] = act(a, f.y[i]); }
    }
    return f;
}
static void check_bn_forward(const std::string& kernel, const std::string& tag, const BnForward& want, const std::vector<float>& mean, const std::vector<float>& var,
                             const std::vector<float>& istd, const std::vector<float>& xh, const std::vector<float>& y, const std::vector<float>& av) {
    check(kernel + " mean " + tag, mean, want.mean, 1e-6, 2e-5); check(kernel + " var " + tag, var, want.var, 1e-6, 2e-5); check(kernel + " istd " + tag, istd, want.inv_std, 1e-6, 2e-5);
    check(kernel + " xhat " + tag, xh, want.x_hat, 1e-4, 1e-4); check(kernel + " y " + tag, y, want.y, 1e-4, 1e-4); check(kernel + " a " + tag, av, want.a, 1e-4, 1e-4);
}

// The split BN forward (bn_column_moments_f32, then bn_act_fwd_train_parts_f32) on a
// [rows, width] batch in parts of part_rows rows, against the f64 two-pass statistics;
// twice from the same tickets, which the first launch must leave at zero.
static void bn_parts_case(unsigned rows, unsigned width, unsigned part_rows, int a) {
    std::string tag = std::to_string(rows) + "x" + std::to_string(width) + " parts of " + std::to_string(part_rows) + " act" + std::to_string(a);
    size_t n = (size_t)rows * width;
    unsigned parts = (rows + part_rows - 1) / part_rows;
    auto z = uni(n, 1, 3), g = uni(width, 0.5, 2), b = uni(width, -1, 1);
    float eps = 1e-3f;
    dim3 grid{(width + TILE_COLS - 1) / TILE_COLS, parts, 1};
    std::vector<unsigned> tickets(grid.x, 0u);
    // Every part's mean and M2, then nothing past them.
    std::vector<double> rmom(2 * (size_t)parts * width);
    for (unsigned p = 0; p < parts; ++p) for (unsigned c = 0; c < width; ++c) {
        unsigned first = p * part_rows, count = std::min(part_rows, rows - first);
        double s = 0; for (unsigned r = first; r < first + count; ++r) s += z[(size_t)r * width + c];
        double m = s / count, q = 0; for (unsigned r = first; r < first + count; ++r) { double d = z[(size_t)r * width + c] - m; q += d * d; }
        rmom[(size_t)p * width + c] = m; rmom[(size_t)(parts + p) * width + c] = q;
    }
    BnForward want = bn_forward_reference(z, g, b, eps, a, rows, width);
    for (int pass = 0; pass < 2; ++pass) {
        auto moments = poison(2 * (size_t)parts * width);
        auto mean = poison(width), var = poison(width), istd = poison(width), xh = poison(n), y = poison(n), av = poison(n);
        launch(grid, {TILE_COLS, TILE_ROWS, 1}, [&]{ bn_column_moments_f32(z.data(), rows, width, part_rows, eps, moments.data(), tickets.data(), mean.data(), var.data(), istd.data()); });
        if (std::any_of(tickets.begin(), tickets.end(), [](unsigned t) { return t != 0; })) { failures++; printf("FAIL bn_moments tickets left %s\n", tag.c_str()); }
        check("bn_moments " + tag, moments, rmom, 1e-4 * part_rows / 64, 2e-5);
        launch_seq(grid, {TILE_COLS, TILE_ROWS, 1}, [&]{ bn_act_fwd_train_parts_f32(z.data(), g.data(), b.data(), a, rows, width, part_rows, mean.data(), istd.data(), xh.data(), y.data(), av.data()); });
        check_bn_forward("bn_parts", tag + " pass " + std::to_string(pass), want, mean, var, istd, xh, y, av);
    }
}

int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "cluster") {  // the cluster kernel only (quick)
        fused_cluster_cases(fused_case_list(), argc > 2);
        printf("%s (%d failures)\n", failures ? "FAILED" : "the cluster kernel matches", failures);
        return failures != 0;
    }
    if (argc > 1 && std::string(argv[1]) == "replicated") {  // the one-barrier kernel only (quick)
        fused_replicated_cases(fused_case_list(), argc > 2);
        printf("%s (%d failures)\n", failures ? "FAILED" : "the replicated kernel matches", failures);
        return failures != 0;
    }
    if (argc > 1 && std::string(argv[1]) == "fused") {  // the ThreadSanitizer run: the cooperative kernel only
        fused_cases(false);
        printf("%s (%d failures)\n", failures ? "FAILED" : "the fused kernel matches", failures);
        return failures != 0;
    }
    std::vector<std::pair<unsigned, unsigned>> shapes = {{1,1},{1,1000},{2,2},{2,127},{60,100},{60,10},{100,60},{127,127},{127,33},{1000,1},{1030,100},{300,1000}};
    // gather
    for (unsigned features : {1u, 2u, 60u, 784u}) for (unsigned rows : {1u, 2u, 60u, 127u, 1030u}) {
        unsigned count = 1100;
        std::vector<uint8_t> img(count * features), lab(count);
        for (auto& v : img) v = (uint8_t)(rnd() * 256); for (auto& v : lab) v = (uint8_t)(rnd() * 10);
        std::vector<unsigned> order(2 * rows + 5); for (auto& o : order) o = (unsigned)(rnd() * count);
        unsigned cursor = 1;
        auto x = poison(rows * features); std::vector<uint8_t> bl(rows + 3, 0xEE);
        launch_seq({rows,1,1}, {256,1,1}, [&]{ gather_rows_f32(img.data(), lab.data(), count, features, order.data(), (unsigned)order.size(), &cursor, 0, rows, x.data(), bl.data()); });
        std::vector<double> want(rows * features); bool ok = true;
        for (unsigned r = 0; r < rows; ++r) { unsigned idx = order[rows + r]; for (unsigned f = 0; f < features; ++f) want[r * features + f] = img[idx * features + f] / 255.0; ok &= bl[r] == lab[idx]; }
        ok &= bl[rows] == 0xEE;
        if (!ok) { failures++; printf("FAIL gather labels\n"); }
        check("gather " + std::to_string(rows) + "x" + std::to_string(features), x, want, 0, 1e-6);
        // eval form
        auto x2 = poison(rows * features);
        std::fill(bl.begin(), bl.end(), (uint8_t)0xEE);
        launch_seq({rows,1,1}, {256,1,1}, [&]{ gather_rows_f32(img.data(), lab.data(), count, features, nullptr, 0, nullptr, count - rows, rows, x2.data(), bl.data()); });
        bool eval_ok = bl[rows] == 0xEE;
        for (unsigned r = 0; r < rows; ++r) { for (unsigned f = 0; f < features; ++f) want[r * features + f] = img[(count - rows + r) * features + f] / 255.0; eval_ok &= bl[r] == lab[count - rows + r]; }
        if (!eval_ok) { failures++; printf("FAIL gather eval labels\n"); }
        check("gather eval", x2, want, 0, 1e-6);
    }
    // The split BN forward beyond the shapes: a 1-row last part; more parts than the merge's
    // TILE_ROWS thread rows (65 and 130: a thread row merges two or three in turn); 33
    // parts (an odd count into the tree); a part narrower than the block's rows.
    for (auto [rows, width, part_rows] : std::vector<std::array<unsigned, 3>>{{257, 33, 256}, {1030, 9, 16}, {8300, 5, 64}, {2049, 8, 64}, {100, 3, 16}})
        for (int a : {0, 1}) bn_parts_case(rows, width, part_rows, a);
    for (auto [rows, width] : shapes) for (int a : {0, 1}) {
        std::string tag = std::to_string(rows) + "x" + std::to_string(width) + " act" + std::to_string(a);
        size_t n = (size_t)rows * width;
        // bn forward train
        auto z = uni(n, 1, 3), g = uni(width, 0.5, 2), b = uni(width, -1, 1);
        float eps = 1e-3f;
        auto mean = poison(width), var = poison(width), istd = poison(width), xh = poison(n), y = poison(n), av = poison(n);
        launch(cols(width), {TILE_COLS, TILE_ROWS, 1}, [&]{ bn_act_fwd_train_f32(z.data(), g.data(), b.data(), eps, a, rows, width, mean.data(), var.data(), istd.data(), xh.data(), y.data(), av.data()); });
        check_bn_forward("bn_train", tag, bn_forward_reference(z, g, b, eps, a, rows, width), mean, var, istd, xh, y, av);
        std::vector<double> ry(n), ra(n);
        // the same in parts of 256 rows (kernels::BN_PART_ROWS): one part, or up to five
        bn_parts_case(rows, width, 256, a);
        // bn infer
        auto pm = uni(width, -1, 1), pv = uni(width, 0.1, 2), z2 = uni(n, -3, 3);
        auto y2 = poison(n), a2 = poison(n);
        launch_seq(ew(n), {256,1,1}, [&]{ bn_act_fwd_infer_f32(z2.data(), g.data(), b.data(), pm.data(), pv.data(), eps, a, rows, width, y2.data(), a2.data()); });
        for (size_t i = 0; i < n; ++i) { unsigned c = i % width; ry[i] = (z2[i] - pm[c]) * (g[c] / sqrt(pv[c] + (double)eps)) + b[c]; ra[i] = act(a, ry[i]); }
        check("bn_infer y " + tag, y2, ry, 1e-6, 1e-5); check("bn_infer a " + tag, a2, ra, 1e-6, 1e-5);
        // act_bn_bwd
        auto da = uni(n, -1, 1), ao = a == 0 ? uni(n, 0.01, 0.99) : uni(n, -1, 1); if (a == 1) for (auto& v : ao) v = v > 0 ? v : 0;
        auto xh2 = uni(n, -2, 2), is2 = uni(width, 0.5, 3);
        auto dz = poison(n), dg = poison(width), db = poison(width);
        launch(cols(width), {TILE_COLS, TILE_ROWS, 1}, [&]{ act_bn_bwd_f32(da.data(), ao.data(), xh2.data(), g.data(), is2.data(), a, rows, width, dz.data(), dg.data(), db.data()); });
        std::vector<double> rdz(n), rdg(width), rdb(width);
        for (unsigned c = 0; c < width; ++c) { double sb = 0, sg = 0; for (unsigned r = 0; r < rows; ++r) { size_t i = (size_t)r * width + c; double dy = actb(a, ao[i], da[i]); sb += dy; sg += dy * xh2[i]; } rdb[c] = sb; rdg[c] = sg;
            for (unsigned r = 0; r < rows; ++r) { size_t i = (size_t)r * width + c; double dy = actb(a, ao[i], da[i]); rdz[i] = g[c] * is2[c] / rows * (rows * dy - sb - xh2[i] * sg); } }
        check("act_bn_bwd db " + tag, db, rdb, 1e-5 * rows, 1e-4); check("act_bn_bwd dg " + tag, dg, rdg, 2e-5 * rows, 1e-4); check("act_bn_bwd dz " + tag, dz, rdz, 1e-4 * 6, 1e-3);
        // bias_act_fwd
        auto y3 = poison(n), a3 = poison(n);
        launch_seq(ew(n), {256,1,1}, [&]{ bias_act_fwd_f32(z2.data(), b.data(), a, rows, width, y3.data(), a3.data()); });
        for (size_t i = 0; i < n; ++i) { ry[i] = (float)(z2[i] + b[i % width]); ra[i] = act(a, ry[i]); }
        check("bias_act y " + tag, y3, ry, 0, 0); check("bias_act a " + tag, a3, ra, 1e-6, 1e-5);
        auto a4 = poison(n);
        launch_seq(ew(n), {256,1,1}, [&]{ bias_act_fwd_f32(z2.data(), nullptr, a, rows, width, nullptr, a4.data()); });
        for (size_t i = 0; i < n; ++i) ra[i] = act(a, z2[i]);
        check("bias_act nobias a " + tag, a4, ra, 1e-6, 1e-5);
        // act_bwd_bias_grad
        auto dz5 = poison(n), db5 = poison(width);
        launch(cols(width), {TILE_COLS, TILE_ROWS, 1}, [&]{ act_bwd_bias_grad_f32(da.data(), ao.data(), a, rows, width, dz5.data(), db5.data()); });
        for (unsigned c = 0; c < width; ++c) { double s = 0; for (unsigned r = 0; r < rows; ++r) { size_t i = (size_t)r * width + c; rdz[i] = actb(a, ao[i], da[i]); s += rdz[i]; } rdb[c] = s; }
        check("act_bwd_bias dz " + tag, dz5, rdz, 1e-7, 1e-6); check("act_bwd_bias db " + tag, db5, rdb, 1e-5 * rows, 1e-4);
    }
    // softmax
    // Row counts from one block to the most (128: 40000 rows, two rows a thread); launched
    // twice from the same scratch, as the host does, which checks that the ticket is reset.
    for (auto [rows, classes] : std::vector<std::pair<unsigned,unsigned>>{{1,2},{1,10},{2,10},{60,10},{100,3},{127,127},{1030,10},{300,256},{1000,1},{10000,10},{40000,3}}) {
        size_t n = (size_t)rows * classes;
        auto z = uni(n, -5, 5), b = uni(classes, -1, 1);
        std::vector<uint8_t> lab(rows); for (auto& l : lab) l = (uint8_t)(rnd() * classes);
        float scale = 1.0f / rows;
        auto dl = poison(n), db = poison(classes); std::vector<uint8_t> pred(rows + 2, 0xEE);
        double loss = 0.5; unsigned long long correct = 3;
        const unsigned blocks = std::clamp((rows + SOFTMAX_THREADS - 1) / SOFTMAX_THREADS, 1u, (unsigned)SOFTMAX_MAX_BLOCKS);
        std::vector<double> part_loss(blocks, NAN); std::vector<unsigned long long> part_correct(blocks, 99);
        std::vector<float> part_db((size_t)blocks * classes, NAN); unsigned ticket = 0;
        for (int twice = 0; twice < 2; ++twice)
            launch({blocks,1,1}, {256,1,1}, [&]{ softmax_xent_f32(z.data(), b.data(), lab.data(), rows, classes, scale, dl.data(), db.data(), pred.data(), &loss, &correct,
                part_loss.data(), part_correct.data(), part_db.data(), &ticket); });
        if (ticket != 0) { failures++; printf("FAIL softmax ticket left at %u\n", ticket); }
        std::vector<double> rdl(n), rdb(classes, 0); double rl = 0; unsigned long long rc = 0; bool pok = pred[rows] == 0xEE;
        for (unsigned r = 0; r < rows; ++r) {
            std::vector<double> v(classes); for (unsigned k = 0; k < classes; ++k) v[k] = (float)(z[r * classes + k] + b[k]);
            unsigned best = 0; for (unsigned k = 1; k < classes; ++k) if (v[k] > v[best]) best = k;
            double m = v[best], d = 0; for (unsigned k = 0; k < classes; ++k) d += exp(v[k] - m);
            for (unsigned k = 0; k < classes; ++k) { rdl[r * classes + k] = (exp(v[k] - m) / d - (k == lab[r])) * scale; rdb[k] += rdl[r * classes + k]; }
            rl += log(d) + m - v[lab[r]]; rc += best == lab[r]; pok &= pred[r] == best;
        }
        std::string tag = std::to_string(rows) + "x" + std::to_string(classes);
        if (!pok) { failures++; printf("FAIL softmax pred %s\n", tag.c_str()); }
        if (correct - 3 != 2 * rc) { failures++; printf("FAIL softmax correct %s %llu %llu\n", tag.c_str(), correct - 3, 2 * rc); }
        // Written so that a NaN loss (a partial sum never written: the scratch starts as NaN) fails.
        if (!(fabs(loss - 0.5 - 2 * rl) <= 6e-5 * rows + 1e-6 * fabs(rl))) { failures++; printf("FAIL softmax loss %s %g %g\n", tag.c_str(), loss - 0.5, 2 * rl); }
        check("softmax dl " + tag, dl, rdl, 3e-5 * scale, 1e-4); check("softmax db " + tag, db, rdb, 3e-5 * scale * rows, 1e-4);
    }
    // running stats
    {
        std::vector<unsigned> widths = {100, 1, 127}; unsigned total = 228, L = 3, E = 4, B = 60;
        std::vector<unsigned> off = {0, 100, 101};
        std::vector<double> est = {0.999, 0, 0.9, 1, -1, 0, -1, 1};
        auto rm = uni(E * total, -1, 1), rv = uni(E * total, 0.5, 2);
        std::vector<unsigned long long> cnt(E * L); for (unsigned i = 0; i < E * L; ++i) cnt[i] = i % 5;
        std::vector<double> rm64(rm.begin(), rm.end()), rv64(rv.begin(), rv.end()); auto cnt64 = cnt;
        for (int step = 0; step < 3; ++step) {
            auto bm = uni(total, -2, 2), bv = uni(total, 0, 3);
            launch({L,1,1}, {256,1,1}, [&]{ running_stats_update_f32(bm.data(), bv.data(), off.data(), widths.data(), total, est.data(), E, B, rm.data(), rv.data(), cnt.data()); });
            for (unsigned l = 0; l < L; ++l) for (unsigned e = 0; e < E; ++e) {
                double n = cnt64[e * L + l]; double keep = est[2*e] > 0 ? est[2*e] : n / (n + 1); double corr = est[2*e+1] ? B / (B - 1.0) : 1;
                for (unsigned j = 0; j < widths[l]; ++j) { size_t i = e * total + off[l] + j; rm64[i] = keep * rm64[i] + (1 - keep) * bm[off[l] + j]; rv64[i] = keep * rv64[i] + (1 - keep) * bv[off[l] + j] * corr; }
                cnt64[e * L + l]++;
            }
        }
        check("running mean", rm, rm64, 1e-6, 1e-5); check("running var", rv, rv64, 1e-6, 1e-5);
        if (cnt != cnt64) { failures++; printf("FAIL counts\n"); }
    }
    // sgd
    for (size_t n : {1ul, 2ul, 1000ul, 89610ul, 2000000ul}) for (float mu : {0.0f, 0.9f}) {
        auto w = uni(n, -2, 2), g = uni(n, -5, 5), v = uni(n, -1, 1);
        std::vector<double> rw(w.begin(), w.end()), rv(v.begin(), v.end());
        unsigned cursor = 7;
        launch_seq(ew(n), {256,1,1}, [&]{ sgd_update_f32(w.data(), g.data(), mu > 0 ? v.data() : nullptr, n, 0.01f, mu, &cursor); });
        for (size_t i = 0; i < n; ++i) { if (mu > 0) { rv[i] = mu * rv[i] + g[i]; rw[i] -= 0.01 * rv[i]; } else rw[i] -= 0.01 * g[i]; }
        check("sgd w", w, rw, 1e-6, 1e-6); check("sgd v", v, rv, 1e-6, 1e-6);
        if (cursor != 8) { failures++; printf("FAIL cursor\n"); }
    }
    // count_non_finite: NaN, ±∞ counted; the largest finite float and huge values not.
    for (size_t n : {1ul, 5ul, 1000ul, 70001ul}) {
        auto x = uni(n, -1e30f, 1e30f);
        unsigned want = 0;
        for (size_t i = 0; i < n; i += 7) { x[i] = i % 3 == 0 ? NAN : (i % 3 == 1 ? INFINITY : -INFINITY); want++; }
        if (n > 3) { x[n - 2] = 3.402823466e38f; x[n - 3] = -3.402823466e38f; }
        unsigned count = 5;
        launch_seq(ew(n), {256,1,1}, [&]{ count_non_finite_f32(x.data(), n, &count); });
        if (count - 5 != want) { failures++; printf("FAIL count_non_finite n=%zu: %u want %u\n", n, count - 5, want); }
    }
    // small GEMMs: every transpose (the dot form: a·bᵀ), with and without accumulate, against
    // the f64 product; k below, at and above the 32 lanes, m·n not a multiple of a block.
    for (auto [m, n, k] : std::vector<std::array<unsigned, 3>>{{1,1,1},{2,3,1},{7,13,100},{60,10,100},{3,5,784},{33,9,31},{1,40,65}})
        for (int ta : {0, 1}) for (int tb : {0, 1}) for (int acc : {0, 1}) {
            auto a = uni((size_t)m * k, -1, 1), b = uni((size_t)k * n, -1, 1), c0 = uni((size_t)m * n, -1, 1);
            std::vector<double> want(m * n);
            for (unsigned i = 0; i < m; ++i) for (unsigned j = 0; j < n; ++j) {
                double s = acc ? c0[i * n + j] : 0.0;
                for (unsigned q = 0; q < k; ++q) s += (double)(ta ? a[q * m + i] : a[i * k + q]) * (tb ? b[j * k + q] : b[q * n + j]);
                want[i * n + j] = s;
            }
            std::string tag = std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) + " ta" + std::to_string(ta) + " tb" + std::to_string(tb) + " acc" + std::to_string(acc);
            auto c = acc ? c0 : poison(m * n);
            launch_seq({(m * n + 255) / 256, 1, 1}, {256,1,1}, [&]{ small_gemm_outer_f32(a.data(), b.data(), c.data(), m, n, k, ta, tb, acc); });
            check("small_gemm_outer " + tag, c, want, 1e-5 * k, 1e-5);
            if (!ta && tb) {
                auto c2 = acc ? c0 : poison(m * n);
                launch({(m * n + 7) / 8, 1, 1}, {256,1,1}, [&]{ small_gemm_dot_f32(a.data(), b.data(), c2.data(), m, n, k, acc); });
                check("small_gemm_dot " + tag, c2, want, 1e-5 * k, 1e-5);
            }
        }
    // round_to_bf16 against the `half` crate's branchy formulation (round bit and sticky bits),
    // on every float class: ties both ways, carries into the exponent and to ±∞, NaN, ±0.
    {
        auto x = uni(20000, -3.0f, 3.0f);
        const unsigned specials[] = {0x3F808000u, 0x3F818000u, 0x3F80FFFFu, 0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F7F8000u,
                                     0x7F800000u, 0xFF800000u, 0x7FC00001u, 0xFF800001u, 0x00000000u, 0x80000000u, 0x00008000u};
        for (size_t i = 0; i < sizeof specials / sizeof specials[0]; ++i) memcpy(&x[i], &specials[i], 4);
        std::vector<unsigned short> out(x.size(), 0xDEAD);
        size_t n = x.size();
        launch_seq(ew(n), {256,1,1}, [&]{ round_to_bf16(x.data(), n, out.data()); });
        for (size_t i = 0; i < n; ++i) {
            unsigned b; memcpy(&b, &x[i], 4);
            unsigned short want;
            if ((b & 0x7FFFFFFFu) > 0x7F800000u) want = (unsigned short)((b >> 16) | 0x40u);
            else if ((b & 0x8000u) && (b & 0x17FFFu)) want = (unsigned short)((b >> 16) + 1);
            else want = (unsigned short)(b >> 16);
            if (out[i] != want) { failures++; printf("FAIL round_to_bf16 %08x: %04x want %04x\n", b, out[i], want); break; }
        }
    }
    fused_cases(true);
    printf("%s (%d failures)\n", failures ? "FAILED" : "all kernels match", failures);
    return failures != 0;
}
