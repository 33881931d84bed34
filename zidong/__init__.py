"""zidong: pretraining for a tri-modal (text, speech, vision) encoder stack with cross-modal alignment heads.

    import zidong
    model = zidong.ZidongModel(zidong.ZidongConfig.from_preset("tiny"))

Importing the package registers the "zidong" model type with transformers' AutoConfig, AutoModel,
AutoFeatureExtractor and AutoProcessor. The model library (`zidong.models`) needs only torch, torchaudio and
transformers; the training code imports accelerate and deepspeed itself.
"""

__version__ = "0.1.0"

from zidong.models.zidong import (
    ZidongConfig,
    ZidongFeatureExtractor,
    ZidongModel,
    ZidongProcessor,
)

__all__ = ["ZidongConfig", "ZidongFeatureExtractor", "ZidongModel", "ZidongProcessor", "__version__"]
