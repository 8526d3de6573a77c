"""Every recipe by convention: a recipe `recipes/<name>.py` has a demo YAML `recipes/configs/<name>*_demo.yaml` and a
tiny model builder `scripts/make_tiny_model.py --family <name with dashes>` (what `make demo MODEL=<name>` runs), and
each single-stage recipe trains its own demo config end to end: the loss falls, the DeepSpeed config resolves every
"auto", the saved model equals the trained weights. A new recipe that lacks one of these fails here. CheXagent's two
stages (stage 2 starts from stage 1's output) run in tests/test_chexagent_recipe.py."""

import importlib.util
import json
import subprocess
import sys

import pytest
from transformers import AutoModelForImageTextToText

from tests.conftest import (
    NUM_PROCESSES,
    REPO,
    assert_resolved_like_arguments,
    assert_saved_equals_trained,
    launch_recipe,
    logged_losses,
)
from vlm_recipes.run_stats import read_run_stats

RECIPES = sorted(path.stem for path in (REPO / "recipes").glob("*.py"))
MULTI_STAGE = {"chexagent"}


def builders() -> dict:
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BUILDERS


def demo_configs(recipe: str) -> list:
    return sorted((REPO / "recipes" / "configs").glob(f"{recipe}*_demo.yaml"))


def test_every_recipe_has_a_demo_config_and_a_tiny_model_builder_by_its_name():
    assert {"llava", "qwen_vl", "chexagent", "image_text_to_text"} <= set(RECIPES)
    families = builders()
    missing = [
        recipe for recipe in RECIPES if not demo_configs(recipe) or recipe.replace("_", "-") not in families
    ]
    assert missing == [], (
        f"recipes without a *_demo.yaml or a make_tiny_model family of their name: {missing}"
    )


# Tools around training, not what a run needs: a recipe loads them only when asked (an offload config's host-RAM
# check, scripts/benchmark.py --profile).
NOT_ON_THE_IMPORT_PATH = ("vlm_recipes.memory", "vlm_recipes.known_models", "vlm_recipes.profiling")


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_imports_no_planner_known_models_or_profiler(recipe):
    probe = (
        "import sys; from pathlib import Path; from vlm_recipes.config import load_recipe; "
        f"load_recipe(Path('recipes/{recipe}.py')); "
        f"print([name for name in {NOT_ON_THE_IMPORT_PATH!r} if name in sys.modules])"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip().splitlines()[-1] == "[]", loaded.stdout


@pytest.mark.parametrize("recipe", sorted(MULTI_STAGE))
def test_each_demo_config_of_a_multi_stage_recipe_is_named_in_its_own_tests(recipe):
    stage_tests = (REPO / "tests" / f"test_{recipe}_recipe.py").read_text()
    untested = [config.name for config in demo_configs(recipe) if config.name not in stage_tests]
    assert demo_configs(recipe) and untested == [], untested


# The image-text-to-text demo's Gemma 3 is refused --packing true (tests/test_packing.py): its packed run trains
# Idefics3 / SmolVLM instead.
PACKED_FAMILY = {"image_text_to_text": "idefics3"}


@pytest.mark.distributed
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("recipe", [recipe for recipe in RECIPES if recipe not in MULTI_STAGE])
def test_each_recipe_trains_its_demo_config_under_the_shared_zero3_offload_config(
    recipe, packing, tiny_model, demo_data, tmp_path
):
    (config,) = demo_configs(recipe)
    family = PACKED_FAMILY.get(recipe, recipe) if packing else recipe
    model_dir, output_dir = tiny_model(family.replace("_", "-")), tmp_path / "out"
    args = [
        "--config", config.relative_to(REPO), "--model_name_or_path", model_dir,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
        "--max_steps", "12", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--learning_rate", "2e-3", "--logging_steps", "4", "--save_strategy", "steps", "--save_steps", "12",
        "--packing", str(packing).lower(),
        # packed: the language model's rows through the varlen attention (on a CPU its window-by-window fallback)
        *(["--attn_implementation", "sdpa_varlen"] if packing else []),
    ]  # fmt: skip
    launched = launch_recipe(f"{recipe}.py", args)
    losses = logged_losses(output_dir)
    assert losses[12] < losses[4], losses
    resolved = json.loads((output_dir / "ds_config_resolved.json").read_text())
    assert_resolved_like_arguments(
        resolved, world_size=NUM_PROCESSES, micro=4, accumulation=1, learning_rate=2e-3
    )
    assert_saved_equals_trained(AutoModelForImageTextToText, output_dir, "checkpoint-12", model_dir)
    # What each rank computed on, padding included, against the samples' own tokens: packed rows of 128 tokens
    # (the demo's max_length) hold several samples where they fit (LLaVA's ~40-token samples: 3 a row), fewer where
    # the images' tokens make them long (Idefics3: measured 17% padding). The length-mix benchmark has the figures.
    stats = read_run_stats(output_dir)
    real = sum(sum(rank["real_tokens_per_step"]) for rank in stats)
    slots = sum(sum(rank["slots_per_step"]) for rank in stats)
    assert 0 < real <= slots
    if packing:
        assert "packing: 96 samples into" in launched.stdout + launched.stderr
        assert 1 - real / slots < 0.25, (real, slots)
