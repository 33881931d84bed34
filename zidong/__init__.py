"""zidong: pretraining for a tri-modal (text, speech, vision) encoder stack with cross-modal alignment heads.

The package root stays light (no torch import) so that `zidong --help` and config validation answer at once;
the model, data and training modules import their heavy dependencies themselves.
"""

__version__ = "0.1.0"
