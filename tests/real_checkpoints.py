"""The processor files real checkpoints ship, from `../shared/real-checkpoints/` beside the repository (its README
gives each file's provenance). Nothing here is copied into the repository and nothing is downloaded: a test that
needs a folder skips, saying why, where the folder is absent.

    real_processor("llava-1.5-7b-hf")        # AutoProcessor.from_pretrained on the real files
    requires_real("qwen2.5-vl-7b-instruct")  # a skip marker for a test that reads that folder
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_CHECKPOINTS = Path(os.environ.get("VLM_REAL_CHECKPOINTS") or REPO.parent / "shared" / "real-checkpoints")

# Folders with a full processor (tokenizer, chat template, image processor config): the recipes load them as is.
FULL_PROCESSORS = (
    "llava-1.5-7b-hf",
    "qwen2-vl-7b-instruct",
    "qwen2.5-vl-7b-instruct",
    "qwen3-vl-8b-instruct",
)


def real_folder(name: str) -> Path:
    return REAL_CHECKPOINTS / name


def requires_real(*names: str):
    missing = [name for name in names if not real_folder(name).is_dir()]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs the real checkpoints' processor files {', '.join(missing)} in {REAL_CHECKPOINTS} "
        "(../shared/real-checkpoints beside the repository, or VLM_REAL_CHECKPOINTS)",
    )


def real_processor(name: str, **kwargs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(real_folder(name), **kwargs)
