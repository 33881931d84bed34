"""zidong: pretraining for a tri-modal (text, speech, vision) encoder stack with cross-modal alignment heads.

    import zidong
    model = zidong.ZidongModel(zidong.ZidongConfig.from_preset("tiny"))

`import zidong` registers the "zidong" model type with transformers' AutoConfig, AutoModel,
AutoModelForSequenceClassification, AutoFeatureExtractor and AutoProcessor, and yet imports neither torch nor
transformers itself: the registration happens the moment the program first loads transformers' Auto classes
(zidong/registration.py), and the model classes below load on first use. So the command line's data and config
commands start in a fraction of a second. The model library (`zidong.models`) needs only torch, torchaudio and
transformers; the training code imports accelerate and deepspeed itself.
"""

from zidong.registration import register_with_transformers

__version__ = "0.1.0"

_MODEL_NAMES = ("ZidongConfig", "ZidongFeatureExtractor", "ZidongForClassification", "ZidongModel", "ZidongProcessor")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from zidong.models import zidong as model_package

        return getattr(model_package, name)
    raise AttributeError(f"module 'zidong' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODEL_NAMES])


register_with_transformers()

__all__ = [*_MODEL_NAMES, "__version__"]
