"""The problem every peer solves, shared so that their starting states and data are the
same draws in the same order: the configurations, the constants of the seed's step, and the
initial parameters, data and permutation from one numpy RandomState."""
import numpy as np

CONFIGS = {"seed": (100, 60), "wide": (1024, 1024)}
INPUTS, CLASSES = 784, 10
EPS, DECAY, LR = 1e-3, 0.999, 0.01


def host_problem(cfg, seed, examples=None):
    """Initial parameters ([in, out] layout), data and permutation as numpy arrays."""
    hidden, batch = CONFIGS[cfg]
    n = examples or batch * 12
    rs = np.random.RandomState(seed)
    widths = [INPUTS, hidden, hidden, CLASSES]
    layers = [rs.standard_normal((widths[i], widths[i + 1])).astype(np.float32)  # [in, out]
              for i in range(3)]
    images = rs.randint(0, 256, size=(n, INPUTS)).astype(np.uint8)
    labels = rs.randint(0, CLASSES, size=n).astype(np.int64)
    perm = rs.permutation(n).astype(np.int64)
    return widths, layers, images, labels, perm, batch
