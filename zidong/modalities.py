"""The three modalities, in the order every part of zidong lists them (samples, batches, towers, pairs).

The model folder (zidong/models/zidong/configuration_zidong.py) holds its own copy, because exported models
carry that folder as remote code without the rest of zidong; tests/test_config.py checks that the two agree.
This module imports nothing, so data and config code can use it without loading torch.
"""

MODALITIES = ("text", "vision", "speech")
