"""Benchmarks: zidong measured as ratios against stock baselines in one run (`python -m benchmarks`).

Training glue like `zidong.train`: imports accelerate and the trainer. See docs/PERFORMANCE.md.
"""
