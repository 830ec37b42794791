#!/usr/bin/env python3
"""bntrain's training step in PyTorch, timed: the peer for `bntrain bench`.

The step (the same as bntrain's, see README "The command line" and src/bench.rs):
  network   784-H-H-10, sigmoid; config seed: H=100, batch 60; config wide: H=1024, batch 1024
  BN        before each hidden sigmoid, no bias before it; gamma=1, beta=0 (trained);
            eps=1e-3; batch mean and biased batch variance; running statistics by EMA with
            decay 0.999 (PyTorch momentum 0.001)
  plain     (--bn off) a bias instead of BN
  loss      softmax cross-entropy summed over the batch (also accumulated into a device scalar)
  update    SGD, lr 0.01, no momentum
  init      weights N(0,1) unscaled, biases 0
  numbers   fp32, TF32 disabled for matmul and cuDNN
  data      batch*12 random u8 "pixels" and labels resident on the device (like bntrain's
            bench); each step gathers its rows through a device-side permutation and a
            device-side batch counter, converts to f32 and divides by 255

BN goes through F.batch_norm (the fused kernel a PyTorch user gets). Its running variance
is fed the unbiased batch variance, bntrain's the biased one: a scalar factor inside the
same kernel, no difference in time. `--bn-impl manual` writes BN out by hand with
bntrain's exact statistics (more kernels in eager mode).

Variants (impl):
  torch-eager           a Python loop of steps
  torch-cudagraph-k1    the step captured once in a CUDA graph (static buffers), replayed
  torch-cudagraph-kK    K steps captured in one graph (--k, default 100)
The graph variants need CUDA; on the CPU only torch-eager runs.

Each measurement: a warm-up, then --runs timed runs of about --seconds each (synchronized
with torch.cuda.synchronize); µs per step is the median run. Output: one JSON line each,
  {"impl", "cfg", "bn", "batch", "us_per_step", "device", ...}.

  python3 torch_step.py --device cuda|cpu [--quick] [--cfg seed,wide] [--bn both|on|off]
  python3 torch_step.py --device cpu --check 5     # losses of 5 steps from a fixed init,
                                                  # to compare with ref_step.py / jax_step.py
"""
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from problem import CLASSES, CONFIGS, DECAY, EPS, INPUTS, LR, host_problem, measurement_plan, peer_arguments  # noqa: E402,F401


class Problem:
    """Parameters, running statistics, data and the step, all on `dev`."""

    def __init__(self, cfg, bn, dev, seed=0, manual_bn=False, examples=None, mnist=None):
        widths, ws, images, labels, perm, batch = host_problem(cfg, seed, examples, mnist)
        self.bn, self.batch, self.manual_bn = bn, batch, manual_bn
        t = lambda a: torch.tensor(a, device=dev)
        self.weights = [t(w).requires_grad_() for w in ws]
        hidden = widths[1:3]
        if bn:
            self.gammas = [torch.ones(h, device=dev, requires_grad=True) for h in hidden]
            self.betas = [torch.zeros(h, device=dev, requires_grad=True) for h in hidden]
            self.biases = []
            self.rmean = [torch.zeros(h, device=dev) for h in hidden]
            self.rvar = [torch.ones(h, device=dev) for h in hidden]
        else:
            self.gammas, self.betas, self.rmean, self.rvar = [], [], [], []
            self.biases = [torch.zeros(h, device=dev, requires_grad=True) for h in hidden]
        self.out_bias = torch.zeros(CLASSES, device=dev, requires_grad=True)
        self.params = self.weights + self.gammas + self.betas + self.biases + [self.out_bias]
        self.images = t(images)  # u8 [n, 784]
        self.labels = t(labels)  # i64 [n]
        self.per_epoch = len(perm) // batch
        self.batches = t(perm[: self.per_epoch * batch]).view(self.per_epoch, batch)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=dev)  # batch counter
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=dev)

    def forward(self, x):
        a = x
        for l in range(2):
            z = a @ self.weights[l]
            if self.bn:
                if self.manual_bn:
                    mean = z.mean(0)
                    var = (z - mean).square().mean(0)  # biased
                    z = (z - mean) * torch.rsqrt(var + EPS) * self.gammas[l] + self.betas[l]
                    with torch.no_grad():
                        self.rmean[l].lerp_(mean.detach(), 1 - DECAY)
                        self.rvar[l].lerp_(var.detach(), 1 - DECAY)
                else:
                    z = F.batch_norm(z, self.rmean[l], self.rvar[l], self.gammas[l], self.betas[l],
                                     training=True, momentum=1 - DECAY, eps=EPS)
            else:
                z = z + self.biases[l]
            a = torch.sigmoid(z)
        return torch.addmm(self.out_bias, a, self.weights[2])

    def step(self):
        """One training step, entirely on the device (capturable in a CUDA graph)."""
        idx = self.batches.index_select(0, self.cursor).view(-1)
        x = self.images.index_select(0, idx).to(torch.float32).div_(255.0)
        y = self.labels.index_select(0, idx)
        with torch.enable_grad():
            loss = F.cross_entropy(self.forward(x), y, reduction="sum")
            grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            torch._foreach_add_(self.params, grads, alpha=-LR)  # what optim.SGD(foreach) does
            self.loss_sum.add_(loss.detach())
            self.cursor.add_(1).remainder_(self.per_epoch)
        return loss


def median_timing(run_units, steps_per_unit, sync, runs, seconds, warm_units, min_units):
    """`run_units(n)` queues n units of `steps_per_unit` steps. Returns µs/step (median,
    min, max over `runs` runs) and the steps in one run."""
    run_units(warm_units)
    sync()
    t = time.perf_counter()
    run_units(warm_units)
    sync()
    per_unit = (time.perf_counter() - t) / warm_units
    units = max(min_units, min(100_000, math.ceil(seconds / max(per_unit, 1e-9))))
    us = []
    for _ in range(runs):
        t = time.perf_counter()
        run_units(units)
        sync()
        us.append((time.perf_counter() - t) * 1e6 / (units * steps_per_unit))
    return statistics.median(us), min(us), max(us), units * steps_per_unit


def main():
    ap = peer_arguments(__doc__, "eager,graph1,graphk", "steps per CUDA graph in torch-cudagraph-kK",
                        "print the losses of N eager steps from the fixed init instead of timing")
    ap.add_argument("--bn-impl", choices=["native", "manual"], default="native")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_step: --device cuda but torch.cuda.is_available() is False")
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    manual = args.bn_impl == "manual"
    suffix = "-manualbn" if manual else ""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfgs, bns, impls, runs, seconds, warm, k = measurement_plan(args, "torch_step")

    def emit(impl, cfg, bn, batch, **kw):
        line = {"impl": impl + suffix, "cfg": cfg, "bn": bn, "batch": batch, **kw,
                "device": device_name, "framework": "torch " + torch.__version__}
        print(json.dumps(line), flush=True)

    if args.check:
        for cfg in cfgs:
            for bn in bns:
                p = Problem(cfg, bn, dev, manual_bn=manual, mnist=args.mnist)
                losses = [float(p.step()) for _ in range(args.check)]
                l1 = float(sum(q.detach().double().abs().sum() for q in p.params))
                emit("torch-eager", cfg, bn, p.batch, check=True, losses=losses, params_l1=l1)
        return

    for cfg in cfgs:
        for bn in bns:
            if "eager" in impls:
                p = Problem(cfg, bn, dev, manual_bn=manual, mnist=args.mnist)

                def run_eager(n, p=p):
                    for _ in range(n):
                        p.step()
                med, lo, hi, steps = median_timing(run_eager, 1, sync, runs, seconds, warm, 3)
                emit("torch-eager", cfg, bn, p.batch, us_per_step=med, us_min=lo, us_max=hi,
                     runs=runs, steps_per_run=steps)
                del p
            for kind, steps_per_graph in (("graph1", 1), ("graphk", k)):
                if kind not in impls:
                    continue
                if dev.type != "cuda":
                    print(f"torch_step: {kind} needs CUDA; skipped on {dev.type}", file=sys.stderr)
                    continue
                p = Problem(cfg, bn, dev, manual_bn=manual, mnist=args.mnist)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # lazy initialization outside the capture
                    for _ in range(3):
                        p.step()
                torch.cuda.current_stream().wait_stream(side)
                sync()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(steps_per_graph):
                        p.step()
                sync()

                def run_graph(n, graph=graph):
                    for _ in range(n):
                        graph.replay()
                med, lo, hi, steps = median_timing(
                    run_graph, steps_per_graph, sync, runs, seconds,
                    max(1, warm // steps_per_graph), 3 if steps_per_graph == 1 else 1)
                if not math.isfinite(float(p.loss_sum)):
                    print(f"torch_step: note: loss is not finite after the {cfg} run (timing unaffected)",
                          file=sys.stderr)
                emit(f"torch-cudagraph-k{steps_per_graph}", cfg, bn, p.batch, us_per_step=med,
                     us_min=lo, us_max=hi, runs=runs, steps_per_run=steps, k=steps_per_graph)
                del graph, p
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
