"""The problem every peer solves, shared so that their starting states and data are the
same draws in the same order: the configurations, the constants of the seed's step, and the
initial parameters, data and permutation from one numpy RandomState."""
import argparse
import gzip
import os
import sys

import numpy as np

CONFIGS = {"seed": (100, 60), "wide": (1024, 1024)}
INPUTS, CLASSES = 784, 10
EPS, DECAY, LR = 1e-3, 0.999, 0.01


def read_idx(directory, name, n):
    """The first n items of an IDX file (raw or .gz) in `directory`, as uint8."""
    path = os.path.join(directory, name)
    opener = open if os.path.exists(path) else gzip.open
    if opener is gzip.open:
        path += ".gz"
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    if shape[0] < n:
        sys.exit(f"{path} holds {shape[0]} items, {n} are needed")
    size = int(np.prod(shape[1:], dtype=np.int64))
    start = 4 + 4 * dims
    return np.frombuffer(data, np.uint8, count=n * size, offset=start).reshape([n] + shape[1:])


def host_problem(cfg, seed, examples=None, mnist=None):
    """Initial parameters ([in, out] layout), data and permutation as numpy arrays. The data
    are random bytes, or with `mnist` (a directory of MNIST's IDX files) the first examples
    of its training set: what `bntrain bench --data DIR` trains on."""
    hidden, batch = CONFIGS[cfg]
    n = examples or batch * 12
    rs = np.random.RandomState(seed)
    widths = [INPUTS, hidden, hidden, CLASSES]
    layers = [rs.standard_normal((widths[i], widths[i + 1])).astype(np.float32)  # [in, out]
              for i in range(3)]
    images = rs.randint(0, 256, size=(n, INPUTS)).astype(np.uint8)
    labels = rs.randint(0, CLASSES, size=n).astype(np.int64)
    perm = rs.permutation(n).astype(np.int64)
    if mnist:  # drawn above all the same, so the weights and the permutation do not change
        images = read_idx(mnist, "train-images-idx3-ubyte", n).reshape(n, INPUTS).copy()
        labels = read_idx(mnist, "train-labels-idx1-ubyte", n).astype(np.int64)
    return widths, layers, images, labels, perm, batch


def peer_arguments(doc, impls, k_help, check_help):
    """The command line every peer script shares; `impls` is its comma-separated default."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="a few steps per measurement (smoke test)")
    ap.add_argument("--cfg", default="seed,wide", help="comma-separated: seed, wide")
    ap.add_argument("--bn", choices=["both", "on", "off"], default="both")
    ap.add_argument("--impl", default=impls, help=f"comma-separated: {impls.replace(',', ', ')}")
    ap.add_argument("--k", type=int, default=100, help=k_help)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3, help="approximate seconds per timed run")
    ap.add_argument("--check", type=int, default=0, metavar="N", help=check_help)
    ap.add_argument("--mnist", metavar="DIR", help="train on the first images of MNIST's training set in DIR "
                    "(IDX files, raw or .gz) instead of random bytes")
    return ap


def measurement_plan(args, program):
    """What to measure, from peer_arguments' options: configs, BN on/off, implementations,
    and the timing (runs, seconds per run, warm-up steps, K steps per graph or scan)."""
    cfgs = [c.strip() for c in args.cfg.split(",") if c.strip()]
    for c in cfgs:
        if c not in CONFIGS:
            sys.exit(f"{program}: unknown config {c!r} (seed, wide)")
    bns = {"both": [True, False], "on": [True], "off": [False]}[args.bn]
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    runs, seconds, warm, k = args.runs, args.seconds, 20, args.k
    if args.quick:
        runs, seconds, warm, k = 3, 0.01, 2, min(k, 4)
    return cfgs, bns, impls, runs, seconds, warm, k
