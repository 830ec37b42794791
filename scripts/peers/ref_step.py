#!/usr/bin/env python3
"""A float64 numpy reference of bntrain's training step, for `--check`: the losses of the
first N steps and the L1 norm of the parameters after them, from the fixed initial state
that torch_step.py and jax_step.py build (host_problem, seed 0). Gradients by hand.

  python3 ref_step.py --check 5 [--cfg seed,wide] [--bn both|on|off]

Prints one JSON line per (cfg, bn) in the peers' --check format, impl "numpy-f64".
"""
import argparse
import json

import numpy as np

from problem import CLASSES, CONFIGS, DECAY, EPS, INPUTS, LR, host_problem  # noqa: E402,F401


def run(cfg, bn, steps, mnist=None):
    widths, ws, images, labels, perm, batch = host_problem(cfg, 0, mnist=mnist)
    f = np.float64
    w = [x.astype(f) for x in ws]
    hidden = widths[1:3]
    gamma = [np.ones(h, f) for h in hidden]
    beta = [np.zeros(h, f) for h in hidden]
    bias = [np.zeros(h, f) for h in hidden]
    out_bias = np.zeros(CLASSES, f)
    rmean = [np.zeros(h, f) for h in hidden]
    rvar = [np.ones(h, f) for h in hidden]
    per_epoch = len(perm) // batch
    losses = []
    for step in range(steps):
        idx = perm[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        x = images[idx].astype(f) / 255.0
        y = labels[idx]
        # forward
        acts, xhats, invs = [x], [], []
        a = x
        for l in range(2):
            z = a @ w[l]
            if bn:
                mean = z.mean(0)
                var = ((z - mean) ** 2).mean(0)
                inv = 1.0 / np.sqrt(var + EPS)
                xh = (z - mean) * inv
                xhats.append(xh)
                invs.append(inv)
                rmean[l] = DECAY * rmean[l] + (1 - DECAY) * mean
                rvar[l] = DECAY * rvar[l] + (1 - DECAY) * var
                u = gamma[l] * xh + beta[l]
            else:
                u = z + bias[l]
            a = 1.0 / (1.0 + np.exp(-u))
            acts.append(a)
        logits = a @ w[2] + out_bias
        m = logits.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        losses.append(float(np.sum(lse - logits[np.arange(batch), y])))
        # backward
        dz = np.exp(logits - lse[:, None])
        dz[np.arange(batch), y] -= 1.0
        grads_w = [None] * 3
        grads_w[2] = acts[2].T @ dz
        d_out_bias = dz.sum(0)
        da = dz @ w[2].T
        d_gamma, d_beta, d_bias = [None] * 2, [None] * 2, [None] * 2
        for l in (1, 0):
            a = acts[l + 1]
            du = da * a * (1 - a)
            if bn:
                xh, inv = xhats[l], invs[l]
                d_gamma[l] = (du * xh).sum(0)
                d_beta[l] = du.sum(0)
                dxh = du * gamma[l]
                dz = inv * (dxh - dxh.mean(0) - xh * (dxh * xh).mean(0))
            else:
                d_bias[l] = du.sum(0)
                dz = du
            grads_w[l] = acts[l].T @ dz
            da = dz @ w[l].T
        # SGD
        for l in range(3):
            w[l] -= LR * grads_w[l]
        out_bias -= LR * d_out_bias
        for l in range(2):
            if bn:
                gamma[l] -= LR * d_gamma[l]
                beta[l] -= LR * d_beta[l]
            else:
                bias[l] -= LR * d_bias[l]
    params = w + [out_bias] + (gamma + beta if bn else bias)
    l1 = float(sum(np.abs(p).sum() for p in params))
    return batch, losses, l1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", type=int, default=5, metavar="N")
    ap.add_argument("--cfg", default="seed")
    ap.add_argument("--bn", choices=["both", "on", "off"], default="both")
    ap.add_argument("--mnist", metavar="DIR")
    args = ap.parse_args()
    for cfg in [c.strip() for c in args.cfg.split(",") if c.strip()]:
        for bn in {"both": [True, False], "on": [True], "off": [False]}[args.bn]:
            with np.errstate(over="ignore"):  # exp(-u) of a saturated sigmoid
                batch, losses, l1 = run(cfg, bn, args.check, args.mnist)
            print(json.dumps({"impl": "numpy-f64", "cfg": cfg, "bn": bn, "batch": batch, "check": True,
                              "losses": losses, "params_l1": l1, "device": "cpu"}), flush=True)


if __name__ == "__main__":
    main()
