"""The objectives' weight names, for the parts of zidong that must not load torch (the recipe schema, plots).

The objectives themselves are the registry of the model folder (zidong/models/zidong/objectives_zidong.py), which
exported models carry as remote code without the rest of zidong; recipes are checked before torch is imported.
So the names live here too, in registry order; tests/test_config.py checks that the two agree. The recipe's `loss`
section (zidong/train/recipe.py) and the loss plot (zidong/train/report.py) are built from this tuple.
"""

OBJECTIVE_NAMES = ("contrastive", "matching", "masked_text", "masked_vision", "masked_speech")
