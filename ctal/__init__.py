"""ctal: CTAL (Cross-modal Transformer for Audio-and-Language) with Ray Data / Train / Tune.

`import ctal` stays cheap, so the Ray preprocessing actors (ctal.data, ctal.tokenizer, without
transformers) start fast. It also makes transformers' Auto classes know CTAL checkpoints
(`AutoModel.from_pretrained(checkpoint)`): ctal.model registers them when imported, and it needs
torch and transformers' modeling code, so it is imported only once transformers' Auto classes are,
at once if they already are, else by the import hook below. A process that never imports them pays
nothing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

# Where AutoModel* live. Not the auto package itself: transformers.modeling_utils imports
# configuration_auto while it initializes, and importing ctal.model (which needs PreTrainedModel) at
# that moment would be a circular import; modeling_auto is only imported once someone uses AutoModel*.
_AUTO = "transformers.models.auto.modeling_auto"


class _RegisterAfterImport(importlib.abc.Loader):
    """Runs the wrapped loader, then imports ctal.model (which registers with the Auto classes)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if "ctal.model" not in sys.modules:  # being imported already: it registers itself at its end
            importlib.import_module("ctal.model")

    def __getattr__(self, name):  # resource readers and the like: the wrapped loader's
        return getattr(self.loader, name)


class _AutoClassesHook(importlib.abc.MetaPathFinder):
    """Finds transformers.models.auto with the other finders and wraps its loader, once."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterImport(spec.loader)
                return spec
        return None


if _AUTO in sys.modules:
    importlib.import_module("ctal.model")
elif not any(isinstance(f, _AutoClassesHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _AutoClassesHook())
