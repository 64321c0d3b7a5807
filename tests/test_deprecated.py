"""Names that moved keep working for one release from their old module, with a DeprecationWarning that names the
new home; names that never existed there still raise AttributeError."""

import importlib

import pytest

MOVED = [
    ("distthink.data.packing", "model_inputs", "distthink.models.attention"),
    ("distthink.data.packing", "attn_implementation_of", "distthink.models.attention"),
    ("distthink.data.packing", "block_causal_mask", "distthink.models.attention"),
    ("distthink.data.packing", "cu_seq_lens", "distthink.models.attention"),
    ("distthink.models.molora", "EntropyGate", "distthink.tasks.thinkrec.gate"),
    ("distthink.models.molora", "entropy_gate", "distthink.tasks.thinkrec.gate"),
    ("distthink.models.molora_export", "load_molora", "distthink.tasks.thinkrec.gate"),
]


@pytest.mark.parametrize("old,name,new", MOVED)
def test_old_path_serves_the_new_object_with_a_warning(old, name, new):
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


def test_unknown_names_still_raise():
    module = importlib.import_module("distthink.data.packing")
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018
