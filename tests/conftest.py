import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network: any accidental Hub access fails loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def family(tmp_path):
    """A bf16 base and three perturbed fine-tunes, 2 shards each."""
    from models import make_family

    base, models = make_family(tmp_path / "in")
    return base, models
