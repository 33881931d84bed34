"""zidong: pretraining for a tri-modal (text, speech, vision) encoder stack with cross-modal alignment heads.

    import zidong
    model = zidong.ZidongModel(zidong.ZidongConfig.from_preset("tiny"))

`import zidong` imports neither torch nor transformers: the model names below load on first use, so the command
line's data and config commands start in a fraction of a second. `import zidong.models` (which every use of the
model does) registers the "zidong" model type with transformers' AutoConfig, AutoModel,
AutoModelForSequenceClassification, AutoFeatureExtractor and AutoProcessor. The model library needs only torch,
torchaudio and transformers; the training code imports accelerate and deepspeed itself.
"""

__version__ = "0.1.0"

_MODEL_NAMES = ("ZidongConfig", "ZidongFeatureExtractor", "ZidongForClassification", "ZidongModel", "ZidongProcessor")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        import zidong.models

        return getattr(zidong.models, name)
    raise AttributeError(f"module 'zidong' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODEL_NAMES])


__all__ = [*_MODEL_NAMES, "__version__"]
