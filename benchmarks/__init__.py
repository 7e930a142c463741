"""Reference implementations timed side by side with ours (`scripts/benchmark.py --vs-pytorch`).

Each `pytorch_<family>.py` builds the networks of `gan.models.<family>` in PyTorch and exposes
`build(config)` and `benchmark(config, repeats=, steps=)`; `pytorch_common.py` holds the train
step they share. They need PyTorch (`pip install torch==2.13.0`), which the project does not.
"""

import os

# PyTorch's OpenMP threads spin at each barrier by default. On a CPU shared with other work a
# spinning thread that loses its core stalls every parallel op: a smoke-sized DCGAN step took
# 1.7 s instead of 0.03 s on a loaded 2-core machine. Passive waiting is the fair setting there
# (set OMP_WAIT_POLICY yourself to override). It is set in the package because OpenMP reads it
# once, when torch first loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
