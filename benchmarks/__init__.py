"""Reference implementations timed side by side with ours (`scripts/benchmark.py --vs-pytorch`).

Each `pytorch_<family>.py` builds the networks of `gan.models.<family>` in PyTorch and exposes
`build(config)` and `benchmark(config, repeats=, steps=)`; `pytorch_common.py` holds the train
step they share. They need PyTorch (`pip install torch==2.13.0`), which the project does not.
`speed.py` times our train step; `wait_policy.py` runs the comparison once per OpenMP wait
policy. Nothing here sets OMP_WAIT_POLICY at import: PyTorch runs under whatever the process has.
"""
