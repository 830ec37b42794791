#!/usr/bin/env python3
"""bntrain's training step in JAX, timed: the peer for `bntrain bench`.

The step (the same as bntrain's, see README "The command line" and src/bench.rs):
  network   784-H-H-10, sigmoid; config seed: H=100, batch 60; config wide: H=1024, batch 1024
  BN        before each hidden sigmoid, no bias before it; gamma=1, beta=0 (trained);
            eps=1e-3; batch mean and biased batch variance; running statistics by EMA with
            decay 0.999 of the batch mean and biased variance (as bntrain)
  plain     (--bn off) a bias instead of BN
  loss      softmax cross-entropy summed over the batch (also accumulated into a device scalar)
  update    SGD, lr 0.01, no momentum
  init      weights N(0,1) unscaled, biases 0
  numbers   fp32; every dot at precision HIGHEST (no TF32), jax_default_matmul_precision too
  data      batch*12 random u8 "pixels" and labels resident on the device (like bntrain's
            bench); each step gathers its rows through a device-side permutation and a
            device-side batch counter, converts to f32 and divides by 255

The whole state (parameters, running statistics, batch counter, loss sum) is donated to
each call, so XLA updates it in place.

Variants (impl):
  jax-jit       one jitted step per Python call
  jax-scan-kK   lax.scan over K steps in one jitted call (--k, default 100)

Each measurement: compilation and a warm-up, then --runs timed runs of about --seconds
each (synchronized with block_until_ready); µs per step is the median run. Output: one
JSON line each, {"impl", "cfg", "bn", "batch", "us_per_step", "device", ...}.

  python3 jax_step.py --device cuda|cpu [--quick] [--cfg seed,wide] [--bn both|on|off]
  python3 jax_step.py --device cpu --check 5     # losses of 5 steps from a fixed init,
                                                # to compare with ref_step.py / torch_step.py
"""
import json
import math
import statistics
import sys
import time
import warnings

import numpy as np

from problem import CLASSES, CONFIGS, DECAY, EPS, INPUTS, LR, host_problem, measurement_plan, peer_arguments  # noqa: E402,F401


def main():
    ap = peer_arguments(__doc__, "jit,scan", "steps per lax.scan call in jax-scan-kK",
                        "print the losses of N jitted steps from the fixed init instead of timing")
    args = ap.parse_args()

    import jax
    jax.config.update("jax_platforms", args.device)  # before any backend starts
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    from jax import lax

    HI = lax.Precision.HIGHEST
    try:
        device = jax.devices()[0]
    except Exception as e:  # RuntimeError, or an AssertionError from some versions
        sys.exit(f"jax_step: JAX has no {args.device} backend here ({type(e).__name__}: {e}); "
                 "for cuda, JAX must be installed with its CUDA plugin")
    device_name = device.device_kind if args.device == "cuda" else "cpu"
    warnings.filterwarnings("ignore", message=".*donated buffers.*")

    cfgs, bns, impls, runs, seconds, warm, k = measurement_plan(args, "jax_step")

    def setup(cfg, bn):
        widths, ws, images, labels, perm, batch = host_problem(cfg, 0, mnist=args.mnist)
        hidden = widths[1:3]
        params = {"w": [jnp.asarray(w) for w in ws], "out_bias": jnp.zeros(CLASSES, jnp.float32)}
        running = {}
        if bn:
            params["gamma"] = [jnp.ones(h, jnp.float32) for h in hidden]
            params["beta"] = [jnp.zeros(h, jnp.float32) for h in hidden]
            running = {"mean": [jnp.zeros(h, jnp.float32) for h in hidden],
                       "var": [jnp.ones(h, jnp.float32) for h in hidden]}
        else:
            params["bias"] = [jnp.zeros(h, jnp.float32) for h in hidden]
        per_epoch = len(perm) // batch
        data = (jnp.asarray(images), jnp.asarray(labels.astype(np.int32)),
                jnp.asarray(perm[: per_epoch * batch].astype(np.int32).reshape(per_epoch, batch)))
        state = {"params": params, "running": running, "cursor": jnp.zeros((), jnp.int32),
                 "loss_sum": jnp.zeros((), jnp.float32)}
        return jax.device_put(state, device), jax.device_put(data, device), batch

    def loss_fn(params, x, y, bn):
        a, stats = x, []
        for l in range(2):
            z = jnp.dot(a, params["w"][l], precision=HI)
            if bn:
                mean = jnp.mean(z, axis=0)
                var = jnp.mean(jnp.square(z - mean), axis=0)  # biased
                z = (z - mean) * lax.rsqrt(var + EPS) * params["gamma"][l] + params["beta"][l]
                stats.append((mean, var))
            else:
                z = z + params["bias"][l]
            a = jax.nn.sigmoid(z)
        logits = jnp.dot(a, params["w"][2], precision=HI) + params["out_bias"]
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked), stats

    def make_step(bn):
        def step(state, data):
            images, labels, batches = data
            idx = lax.dynamic_index_in_dim(batches, state["cursor"], axis=0, keepdims=False)
            x = images[idx].astype(jnp.float32) / 255.0
            y = labels[idx]
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, y, bn)
            params = jax.tree_util.tree_map(lambda p, g: p - LR * g, state["params"], grads)
            running = state["running"]
            if bn:
                running = {"mean": [DECAY * m + (1 - DECAY) * lax.stop_gradient(s[0])
                                    for m, s in zip(running["mean"], stats)],
                           "var": [DECAY * v + (1 - DECAY) * lax.stop_gradient(s[1])
                                   for v, s in zip(running["var"], stats)]}
            new = {"params": params, "running": running,
                   "cursor": (state["cursor"] + 1) % batches.shape[0],
                   "loss_sum": state["loss_sum"] + loss}
            return new, loss
        return step

    def emit(impl, cfg, bn, batch, **kw):
        line = {"impl": impl, "cfg": cfg, "bn": bn, "batch": batch, **kw,
                "device": device_name, "framework": "jax " + jax.__version__}
        print(json.dumps(line), flush=True)

    if args.check:
        for cfg in cfgs:
            for bn in bns:
                state, data, batch = setup(cfg, bn)
                step = jax.jit(make_step(bn), donate_argnums=0)
                losses = []
                for _ in range(args.check):
                    state, loss = step(state, data)
                    losses.append(float(loss))
                l1 = sum(float(np.abs(np.asarray(p, np.float64)).sum())
                         for p in jax.tree_util.tree_leaves(state["params"]))
                emit("jax-jit", cfg, bn, batch, check=True, losses=losses, params_l1=l1)
        return

    class Runner:
        def __init__(self, fn, state, data):
            self.fn, self.state, self.data = fn, state, data

        def __call__(self, n):
            for _ in range(n):
                self.state = self.fn(self.state, self.data)

        def sync(self):
            jax.block_until_ready(self.state)

    for cfg in cfgs:
        for bn in bns:
            step = make_step(bn)
            variants = []
            if "jit" in impls:
                variants.append(("jax-jit", 1, lambda s, d: step(s, d)[0]))
            if "scan" in impls:
                def multi(s, d, step=step):
                    return lax.scan(lambda c, _: (step(c, d)[0], None), s, None, length=k)[0]
                variants.append((f"jax-scan-k{k}", k, multi))
            for impl, steps_per_call, fn in variants:
                state, data, batch = setup(cfg, bn)
                run = Runner(jax.jit(fn, donate_argnums=0), state, data)
                t = time.perf_counter()
                run(1)  # compiles
                run.sync()
                compile_s = time.perf_counter() - t
                warm_calls = max(1, warm // steps_per_call)
                run(warm_calls)
                run.sync()
                t = time.perf_counter()
                run(warm_calls)
                run.sync()
                per_call = (time.perf_counter() - t) / warm_calls
                calls = max(3 if steps_per_call == 1 else 1,
                            min(100_000, math.ceil(seconds / max(per_call, 1e-9))))
                us = []
                for _ in range(runs):
                    t = time.perf_counter()
                    run(calls)
                    run.sync()
                    us.append((time.perf_counter() - t) * 1e6 / (calls * steps_per_call))
                if not math.isfinite(float(run.state["loss_sum"])):
                    print(f"jax_step: note: loss is not finite after the {cfg} run (timing unaffected)",
                          file=sys.stderr)
                emit(impl, cfg, bn, batch, us_per_step=statistics.median(us), us_min=min(us),
                     us_max=max(us), runs=runs, steps_per_run=calls * steps_per_call,
                     k=steps_per_call, compile_s=round(compile_s, 3))
                del run


if __name__ == "__main__":
    main()
