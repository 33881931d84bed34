"""Imported at start-up by every process of a parity run (tests/train/parity.py puts this folder on PYTHONPATH)."""

import os

if os.environ.get("ZIDONG_PARITY"):
    from tests.train.parity import install

    install()
