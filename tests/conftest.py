import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests live in folders that mirror the package (tests/engine, tests/tasks/thinkrec, ...); their shared helpers
# (_train_utils, _tolerance, references/, ...) live here at the top, importable from every folder.
sys.path.insert(0, str(Path(__file__).parent))

# Tests are CPU-only and must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Encoded-data caches of the tests (and of the runs they launch) go to a fresh folder, never ~/.cache.
os.environ.setdefault("DISTTHINK_CACHE_DIR", tempfile.mkdtemp(prefix="distthink-test-cache-"))

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The real Qwen3 tokenizer, vendored under tests/fixtures/qwen3 (Apache-2.0, see NOTICE.md)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "qwen3"))
