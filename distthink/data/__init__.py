"""Data: sample formats, chat encoding, packing. `encode_chat`, `ChatPolicy`, `build_sft_dataset` are exported
lazily so that importing a submodule (e.g. packing) does not pull in the encoder."""

import importlib

_EXPORTS = {"encode_chat": "distthink.data.chat", "ChatPolicy": "distthink.data.chat",
            "build_sft_dataset": "distthink.data.dataset", "EncodedSample": "distthink.data.types"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distthink.data' has no attribute {name!r}")
