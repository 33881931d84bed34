"""The zidong tri-modal model in the Hugging Face layout; importing it registers the Auto classes.

After `import zidong` (or this package), `AutoConfig`, `AutoModel`, `AutoFeatureExtractor` and `AutoProcessor`
know the "zidong" model type, and `save_pretrained` folders carry an `auto_map` so that they also load with
`trust_remote_code=True` where zidong is not installed.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoProcessor,
)

from .classification_zidong import ZidongForClassification
from .configuration_zidong import PRESETS, ZidongConfig
from .feature_extraction_zidong import ZidongFeatureExtractor
from .modeling_zidong import OBJECTIVES, ZidongModel, ZidongOutput, ZidongPreTrainedModel
from .processing_zidong import ZidongProcessor

AutoConfig.register(ZidongConfig.model_type, ZidongConfig, exist_ok=True)
AutoModel.register(ZidongConfig, ZidongModel, exist_ok=True)
AutoModelForSequenceClassification.register(ZidongConfig, ZidongForClassification, exist_ok=True)
AutoFeatureExtractor.register(ZidongConfig, ZidongFeatureExtractor, exist_ok=True)
AutoProcessor.register(ZidongConfig, ZidongProcessor, exist_ok=True)
ZidongConfig.register_for_auto_class()
ZidongModel.register_for_auto_class("AutoModel")
ZidongForClassification.register_for_auto_class("AutoModelForSequenceClassification")
ZidongFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
ZidongProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "OBJECTIVES",
    "PRESETS",
    "ZidongConfig",
    "ZidongFeatureExtractor",
    "ZidongForClassification",
    "ZidongModel",
    "ZidongOutput",
    "ZidongPreTrainedModel",
    "ZidongProcessor",
]
