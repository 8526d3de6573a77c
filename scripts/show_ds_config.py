r"""Show the DeepSpeed config exactly as a recipe run would hand it to DeepSpeed, without training or a GPU.

    python scripts/show_ds_config.py --recipe llava --world_size 8
    python scripts/show_ds_config.py --recipe qwen-vl --accelerate_config accelerate_configs/zero2.yaml \
        --world_size 4 -- --config recipes/configs/qwen_vl_3b.yaml --per_device_train_batch_size 2 --bf16 true

Everything after `--` is what you would pass to the recipe (its YAML with --config, and any overrides). The
DeepSpeed JSON is the one the accelerate config names (or --ds_config). Every "auto" is replaced through the
same accelerate and transformers code a run uses, and each is listed with the argument or model dimension it
came from. The model's config (not its weights) is read from --model_name_or_path: a local folder, or a hub id
when the hub is reachable. On this machine precision resolves to fp32 (no GPU): pass --bf16 true or --fp16 true
after `--` to see a GPU run's config. A run prints the same listing at its start and writes the config it really
used to output_dir/ds_config_resolved.json.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig

from vlm_recipes.config import NO_DEEPSPEED, ConfigError, parse_recipe_args, pop_flag, recipe_argument_classes
from vlm_recipes.data import load_records
from vlm_recipes.ds_config import describe_resolution, resolve_ds_config, text_hidden_size
from vlm_recipes.memory import ModelNotKnownOffline
from vlm_recipes.memory import load_model_config as planner_model_config

REPO = Path(__file__).resolve().parent.parent


def ds_config_path(accelerate_config: Path) -> Path:
    settings = yaml.safe_load(accelerate_config.read_text())
    path = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not path:
        raise ConfigError(f"{accelerate_config} does not use a DeepSpeed config file; nothing to resolve")
    return Path(path)


def load_model_config(model_name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's config, or, offline, the memory planner's config of the recipes' default models
    (vlm_recipes/known_models.py)."""
    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except OSError:
        try:
            return planner_model_config(model_name_or_path, trust_remote_code)[1]
        except ModelNotKnownOffline:
            pass
        raise SystemExit(
            f"cannot read the config of {model_name_or_path} (no hub access?); pass a local folder with "
            "--model_name_or_path after --"
        ) from None


def optimizer_steps(training_args, data_args, world_size: int) -> int:
    if training_args.max_steps > 0:
        return training_args.max_steps
    records = load_records(data_args.dataset_path, data_args.image_root, data_args.dataset_split,
                           data_args.allow_images_outside_root)  # fmt: skip
    batches = math.ceil(len(records) / (training_args.per_device_train_batch_size * world_size))
    return math.ceil(training_args.num_train_epochs * batches / training_args.gradient_accumulation_steps)


def main() -> None:
    argv = sys.argv[1:]
    recipe_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    own_argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="llava", help="llava, qwen-vl, chexagent (recipes/<name>.py)")
    parser.add_argument(
        "--accelerate_config", type=Path, default=REPO / "accelerate_configs/zero3_offload.yaml"
    )
    parser.add_argument(
        "--ds_config", type=Path, default=None, help="a DeepSpeed JSON instead of the one above"
    )
    parser.add_argument("--world_size", type=int, default=1, help="total number of processes (GPUs)")
    parser.add_argument("--num_training_steps", type=int, default=None,
                        help="optimizer steps (only a JSON scheduler uses it); default: max_steps, or counted")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print only the resolved config, as JSON")
    args = parser.parse_args(own_argv)

    recipe_path = REPO / "recipes" / f"{args.recipe.replace('-', '_')}.py"
    if not recipe_path.is_file():
        raise SystemExit(f"no recipe {recipe_path}; --recipe is one of llava, qwen-vl, chexagent")
    extra_classes, default_config = recipe_argument_classes(recipe_path)
    if not torch.cuda.is_available():
        # Lets --bf16/--fp16 through TrainingArguments' GPU check here; it changes nothing in the DeepSpeed config.
        recipe_argv = [*recipe_argv, "--use_cpu", "true"]
    # The JSON is resolved here, as a run would, not by TrainingArguments: a --deepspeed among the recipe's arguments
    # names the file to resolve.
    named, recipe_argv = pop_flag(recipe_argv, "deepspeed")
    model_args, data_args, training_args, *_ = parse_recipe_args(
        default_config, [*recipe_argv, "--deepspeed", "none"], extra_classes
    )
    if named and named.lower() not in NO_DEEPSPEED and args.ds_config is None:
        args.ds_config = Path(named)
    path = args.ds_config or ds_config_path(args.accelerate_config)
    model_config = load_model_config(model_args.model_name_or_path, model_args.trust_remote_code)
    steps = args.num_training_steps
    if steps is None:
        original_has_scheduler = "scheduler" in json.loads(path.read_text())
        steps = optimizer_steps(training_args, data_args, args.world_size) if original_has_scheduler else 1
    resolved = resolve_ds_config(path, training_args, model_config, args.world_size, steps)
    if args.json:
        print(json.dumps(resolved, indent=2, sort_keys=True))
        return
    print(f"DeepSpeed config for {recipe_path.name}, world size {args.world_size}, from {path}:")
    print(json.dumps(resolved, indent=2, sort_keys=True))
    print(f'Where each "auto" of {path} came from:')
    print(describe_resolution(json.loads(path.read_text()), resolved, text_hidden_size(model_config)))


if __name__ == "__main__":
    main()
