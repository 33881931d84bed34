"""The model library: `import zidong.models` registers the "zidong" model type with transformers' Auto classes.

After it, `AutoConfig`, `AutoModel`, `AutoModelForSequenceClassification`, `AutoFeatureExtractor` and
`AutoProcessor` load zidong folders; elsewhere (zidong not installed, or not imported) an export loads with
`trust_remote_code=True`. `import zidong` alone stays light (no torch, no transformers): its model names
(`zidong.ZidongModel`, ...) import this package on first use.
"""

from zidong.models.zidong import (
    ZidongConfig,
    ZidongFeatureExtractor,
    ZidongForClassification,
    ZidongModel,
    ZidongProcessor,
)

__all__ = ["ZidongConfig", "ZidongFeatureExtractor", "ZidongForClassification", "ZidongModel", "ZidongProcessor"]
