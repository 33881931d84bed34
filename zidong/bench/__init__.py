"""Benchmarks: zidong measured as ratios against stock baselines in one run (`scripts/bench.py`).

Training glue like `zidong.train`: imports accelerate and the trainer. See docs/PERFORMANCE.md.
"""
