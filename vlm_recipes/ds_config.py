"""What each "auto" of a DeepSpeed config becomes, and where the value comes from.

Used two ways with the same code: `scripts/show_ds_config.py` resolves a config offline (no training, no GPU)
through the same accelerate and transformers classes a run uses, and every recipe's
ResolvedDeepSpeedConfigCallback prints the config a run really handed to DeepSpeed with the same annotations.
"""

import json
import os
import re
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger("vlm_recipes")

# Where transformers' Trainer (integrations/deepspeed.py) and accelerate's DeepSpeedPlugin take each value.
AUTO_SOURCES = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "train_batch_size": "world size x per_device_train_batch_size x gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
    "optimizer.params.lr": "learning_rate",
    "optimizer.params.betas": "[adam_beta1, adam_beta2]",
    "optimizer.params.eps": "adam_epsilon",
    "optimizer.params.weight_decay": "weight_decay",
    "fp16.enabled": "fp16 (the recipe's precision choice)",
    "bf16.enabled": "bf16 (the recipe's precision choice)",
    "scheduler.params.warmup_min_lr": "0 (fixed by transformers)",
    "scheduler.params.warmup_max_lr": "learning_rate",
    "scheduler.params.total_num_steps": "number of optimizer steps (max_steps, or epochs x steps per epoch)",
    "scheduler.params.warmup_num_steps": "warmup_steps (at least 1)",
    "zero_optimization.reduce_bucket_size": "hidden_size x hidden_size",
    "zero_optimization.stage3_prefetch_bucket_size": "0.9 x hidden_size x hidden_size",
    "zero_optimization.stage3_param_persistence_threshold": "10 x hidden_size",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "accelerate: false (no loadable weights!)",
    "zero_optimization.offload_param.device": 'accelerate: "none"',
    "zero_optimization.offload_optimizer.device": 'accelerate: "none"',
}


def dotted_items(config: dict, prefix: str = ""):
    """(dotted name, value) of every leaf of a nested config."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from dotted_items(value, f"{name}.")
        else:
            yield name, value


def auto_keys(config: dict) -> list[str]:
    """Dotted names of every "auto" value in a DeepSpeed config."""
    return [name for name, value in dotted_items(config) if value == "auto"]


# Key names that hold credentials, such as DeepSpeed's comet monitor `api_key`.
SECRET_KEY = re.compile(r"(^|_)(api_key|token|password|secret)$", re.IGNORECASE)


def secret_keys(config: dict) -> list[str]:
    """Dotted names of the credentials written into a DeepSpeed config."""
    return [
        name
        for name, value in dotted_items(config)
        if SECRET_KEY.search(name.rsplit(".", 1)[-1]) and isinstance(value, str) and value
    ]


def get_dotted(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def text_hidden_size(model_config) -> int | None:
    # Transformers' rule: the model's hidden_size, else its text model's (VLM configs have no top-level one).
    for config in (model_config, getattr(model_config, "text_config", None)):
        if config is not None and getattr(config, "hidden_size", None):
            return config.hidden_size
    return None


def describe_resolution(original: dict, resolved: dict, hidden_size: int | None = None) -> str:
    """One line per "auto" of the original config: the value it became and what it came from."""
    lines = []
    for key in auto_keys(original):
        source = AUTO_SOURCES.get(key, "?")
        if "hidden_size" in source and hidden_size:
            source += f" (hidden_size = {hidden_size})"
        lines.append(f"  {key} = {json.dumps(get_dotted(resolved, key))}    <- {source}")
    return "\n".join(lines)


class WorldSize:
    """TrainingArguments as seen by a run of `world_size` processes (only world_size differs)."""

    def __init__(self, args, world_size: int):
        self._args, self.world_size = args, world_size

    def __getattr__(self, name):
        return getattr(self._args, name)


class ConfigOnly:
    def __init__(self, config):
        self.config = config


def resolve_ds_config(ds_config_path: str | Path, training_args, model_config, world_size: int,
                      num_training_steps: int) -> dict:  # fmt: skip
    """The config DeepSpeed receives, built by the same steps a run takes: accelerate's DeepSpeedPlugin
    (its own rewrites), the Trainer's fill from TrainingArguments, then the fill at train()."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_config_path))
    plugin.set_mixed_precision(training_args.mixed_precision)
    hf_config = HfTrainerDeepSpeedConfig(plugin.hf_ds_config.config)
    args = WorldSize(training_args, world_size)
    hf_config.trainer_config_process(args)
    hf_config.trainer_config_finalize(args, ConfigOnly(model_config), num_training_steps)
    return hf_config.config


def ds_config_in_use(training_args) -> Path | None:
    """The DeepSpeed JSON of this run: --deepspeed, or the one `accelerate launch` names in the environment."""
    path = training_args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return Path(path) if isinstance(path, str | Path) and Path(path).is_file() else None


def arch_list_deepspeed_can_parse(environ=os.environ) -> str | None:
    """Drop the architecture-variant letters from TORCH_CUDA_ARCH_LIST ("9.0a" -> "9.0", "10.0f+PTX" -> "10.0+PTX")
    and return the new value, or None when there were none.

    DeepSpeed 0.19.8 compiles its CUDA ops on first use (FusedAdam, for every config that does not offload the
    optimizer) for TORCH_CUDA_ARCH_LIST, and reads each entry as numbers: "9.0a", which PyTorch 2.11 accepts and
    CUDA images for Hopper set, fails with "ValueError: invalid literal for int() with base 10: '0a'" after the
    model has loaded (deepspeedai/DeepSpeed#7589, fix pending in #8619). Measured on the H100 node: the zero2 and
    zero3 runs of `make test-gpu` failed so. The plain architecture builds the same optimizer kernels."""
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = [entry for entry in re.split(r"[;\s]+", value.strip()) if entry]
    plain = []
    for entry in entries:
        entry = re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", entry)
        if entry not in plain:
            plain.append(entry)
    if plain == entries:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(plain)
    return environ["TORCH_CUDA_ARCH_LIST"]


def check_deepspeed_config(training_args, model_name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before any weights load, a DeepSpeed config that would silently override or contradict the
    arguments (a scheduler block, hard-coded values that differ from what the arguments imply) or that holds
    credentials, listing every such problem in one error. Also makes
    TORCH_CUDA_ARCH_LIST one DeepSpeed can compile its ops for (arch_list_deepspeed_can_parse)."""
    from transformers import AutoConfig

    from vlm_recipes.config import ConfigError

    path = ds_config_in_use(training_args)
    if path is None:
        return
    original_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if plain := arch_list_deepspeed_can_parse():
        logger.warning(
            f"TORCH_CUDA_ARCH_LIST={original_arch_list!r} -> {plain!r} for this run: DeepSpeed 0.19.8 cannot parse "
            "architecture variants when it compiles its CUDA ops (deepspeedai/DeepSpeed#7589)"
        )
    config = json.loads(path.read_text())
    problems = []  # every problem at once, so that one edit of the file fixes them all
    if secrets := secret_keys(config):
        problems.append(
            f"it holds credentials ({', '.join(secrets)}): the Trainer pickles the DeepSpeed config into "
            "training_args.bin in every checkpoint, and the run writes it to ds_config_resolved.json. Delete "
            "them and set them in the environment instead (DeepSpeed's comet monitor reads COMET_API_KEY)."
        )
    if "scheduler" in config and training_args.allow_deepspeed_scheduler:
        logger.warning(
            f"{path}: its {config['scheduler'].get('type')} scheduler replaces --lr_scheduler_type "
            "(--allow_deepspeed_scheduler true)"
        )
    elif "scheduler" in config:
        scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
        problems.append(
            f"it has a scheduler block ({config['scheduler'].get('type')}), which would silently replace "
            f"--lr_scheduler_type {scheduler}. Delete the block: the Trainer then builds the scheduler your "
            "arguments name, and DeepSpeed steps it."
        )
    if training_args.fp16 and (problem := fp16_problem(config)):
        problems.append(problem)
    model_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    try:
        resolve_ds_config(
            path, training_args, model_config, training_args.world_size, max(training_args.max_steps, 1)
        )
    except ValueError as error:
        problems.append(
            f'it contradicts the arguments:\n{error}\nSet those keys to "auto" (they are then filled from the '
            "arguments) or change the arguments to match."
        )
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(f"- {problem}" for problem in problems))


def fp16_problem(config: dict) -> str | None:
    """What is known to break in fp16 for this config, or None. An fp32 gradient-accumulation buffer
    (data_types.grad_accum_dtype) under ZeRO-2 with the optimizer offloaded never trained in fp16 on DeepSpeed 0.19.8:
    on one H200 every one of the tiny LLaVA's 12 steps overflowed (grad_norm inf), where zero2_offload.json, the same
    config without the buffer, skipped its first 3 as the loss scale came down and then trained (make test-gpu)."""
    zero = config.get("zero_optimization", {})
    if (
        config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
        and zero.get("stage") == 2
        and offloads(config)["optimizer"]
    ):
        return (
            "with --fp16 true its fp32 gradient accumulation (data_types.grad_accum_dtype) under ZeRO-2 optimizer "
            "offload does not train on DeepSpeed 0.19.8: every step overflowed and was skipped (on one H200). "
            "Use --bf16 true, or ds_configs/zero2_offload.json (accelerate_configs/zero2_offload.yaml) for fp16."
        )
    return None


def offloads(ds_config: dict) -> dict[str, bool]:
    zero = ds_config.get("zero_optimization", {})
    return {
        part: (zero.get(f"offload_{part}") or {}).get("device", "none") in ("cpu", "nvme")
        for part in ("optimizer", "param")
    }
