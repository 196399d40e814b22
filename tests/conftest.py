"""Shared fixtures: tiny random checkpoints in the hub layout, built once per test session."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

# name -> make_tiny_checkpoint arguments. Covers both key layouts, MQA and GQA, two image sizes, and Gemma 2.
CHECKPOINTS = {
    "pg1-legacy-mqa-224": dict(variant="pg1", layout="legacy", num_key_value_heads=1),
    "pg1-new-gqa-112": dict(variant="pg1", layout="new", num_key_value_heads=2, image_size=112),
    "pg2-legacy-gqa-224": dict(variant="pg2", layout="legacy", num_key_value_heads=2, sliding_window=8),
    # PaliGemma 2 as the hub ships it: bfloat16 shards, `model.*` keys; 448-style explicit image_size.
    "pg2-new-bf16-112": dict(variant="pg2", layout="new", num_key_value_heads=1, image_size=112,
                             dtype=torch.bfloat16, sliding_window=8),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> path of that tiny hub-layout checkpoint (built on first use)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), **CHECKPOINTS[name])
        return built[name]

    return get


def random_image(seed: int, size=(64, 48), mode="RGB") -> Image.Image:
    """A deterministic noise image (noise, so resizing and colour handling are really exercised)."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)
