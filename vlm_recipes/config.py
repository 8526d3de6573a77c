"""Recipe arguments: dataclasses mirrored one-to-one by the YAML files, with command-line overrides on top.

    accelerate launch recipes/llava.py                                   # the recipe's default YAML
    accelerate launch recipes/llava.py --config recipes/configs/llava_lora.yaml --learning_rate 1e-5

Every key of a YAML file is a field name of ModelArguments, DataArguments or transformers' TrainingArguments,
so a key greps to its field. Unknown keys are refused with the file and the closest field names.

Which DeepSpeed config a run uses (`resolve_deepspeed`): the recipe YAMLs name the shared
ds_configs/zero3_offload.json (`deepspeed:`), so the plain `accelerate launch recipes/llava.py` trains under it. A
launcher config that picks a backend itself (an accelerate DeepSpeed config naming its JSON, or FSDP) replaces the
YAML's value, and the run says so. A `--deepspeed` given on the command line is an explicit choice: it must agree
with the launcher's, else the run is refused before anything loads. `--deepspeed none` trains without DeepSpeed
(single_gpu.yaml, multi_gpu.yaml: `make train` adds it for those).
"""

import dataclasses
import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file or flag and the fix."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Hub id or local folder of the checkpoint to fine-tune."}
    )
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Keep the image encoder's weights fixed."}
    )
    freeze_projector: bool = field(
        default=False, metadata={"help": "Keep the vision-to-text projector fixed."}
    )
    freeze_language_model: bool = field(default=False, metadata={"help": "Keep the language model fixed."})
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters instead of the full weights."}
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "With --use_lora: DoRA (peft's use_dora), which trains each adapted weight's magnitude apart "
            "from its direction; slower per step than LoRA, saved and merged the same way."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: the base weights quantized to 4-bit NF4 by bitsandbytes as they load (with --use_lora "
            "true, on a CUDA GPU, without DeepSpeed for now: single_gpu.yaml or multi_gpu.yaml with --deepspeed none)."
        },
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layer names of the language model that get LoRA adapters."},
    )
    lora_vision_target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Linear layer names of the vision tower that also get LoRA adapters (none by default)."
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "eager, sdpa or flash_attention_2, or sdpa_varlen: PyTorch's varlen attention kernel for "
            "packed rows (--packing true, every recipe) and Qwen-VL's windowed vision tower, sdpa elsewhere."
        },
    )
    pad_mlp_widths: str = field(
        default="auto",
        metadata={
            "help": "auto, true or false. Widen gated MLPs (gate_proj/up_proj/down_proj) whose hidden width is not a "
            "multiple of 64 with zero units that stay zero, so the GPU's matrix kernels take them whole (Qwen2.5-VL's "
            "vision MLP: 3,420 -> 3,456; 1.24x a compiled packed 3B step on an H200); saved at the checkpoint's "
            "widths. Full fine-tunes without DeepSpeed only; auto: wherever that holds (vlm_recipes/mlp_padding.py)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the checkpoint. Off unless you trust it."},
    )

    def __post_init__(self):
        # A local folder is recorded by absolute path (in the saved config and a LoRA adapter's
        # base_model_name_or_path), so the output loads from any working directory.
        if self.model_name_or_path and os.path.isdir(self.model_name_or_path):
            self.model_name_or_path = os.path.abspath(self.model_name_or_path)


@dataclass
class DataArguments:
    dataset_path: str = field(
        metadata={"help": "LLaVA/chat JSON or JSONL file, or a `datasets` folder or name."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder that image paths are relative to."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a `datasets` source."})
    eval_dataset_path: str | None = field(
        default=None, metadata={"help": "Optional held-out set, same format."}
    )
    max_length: int | None = field(
        default=2048, metadata={"help": "Tokens per sample, image tokens included; longer samples are cut."}
    )
    allow_images_outside_root: bool = field(
        default=False, metadata={"help": "Allow absolute image paths and '..' escapes from --image_root."}
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={"help": "Drop records the preflight finds unusable (listing them) instead of stopping."},
    )
    guard_text_only_batches: bool = field(
        default=True,
        metadata={
            "help": "Give image-less micro-batches a blank, unlabelled image row so every ZeRO-3 rank runs "
            "the vision tower (without it, mixed text-only/image data can hang); the loss is unchanged."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several samples into each row of --max_length tokens (vlm_recipes/packing.py): almost no "
            "padding on data of mixed lengths; no sample attends to another; the loss is the same per token. "
            "--per_device_train_batch_size then counts rows."
        },
    )


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds a finished model, replacing it."},
    )
    save_final_model: bool = field(
        default=True,
        metadata={
            "help": "Write the trained model to output_dir at the end. false: train and report only (benchmarks, "
            "dry runs); checkpoints still follow --save_strategy."
        },
    )
    allow_deepspeed_scheduler: bool = field(
        default=False,
        metadata={
            "help": "Let a `scheduler` block in the DeepSpeed JSON replace --lr_scheduler_type (refused "
            "otherwise). Only for reproducing a config that has one, such as the seed's."
        },
    )
    skip_memory_check: bool = field(
        default=False,
        metadata={
            "help": "Start even when the memory planner estimates that the DeepSpeed offload config needs more "
            "host RAM than this machine has available (refused otherwise, before any weights load)."
        },
    )
    compensated_bf16_updates: bool = field(
        default=False,
        metadata={
            "help": "Without DeepSpeed: AdamW whose updates of 16-bit weights are as precise as with fp32 master "
            "weights, for 2 bytes more per trained parameter instead of 4 (vlm_recipes/optim.py)."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, RecipeTrainingArguments)


def auto_precision() -> dict[str, bool]:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    return {"bf16": False, "fp16": False}


def auto_backend() -> dict[str, str]:
    # Without a GPU, accelerate (1.15) leaves the backend unset, counts one process and DeepSpeed then
    # rejects train_batch_size ("8 != 8 * 1 * 2"). Naming gloo makes every process see the real world size.
    launched = "LOCAL_RANK" in os.environ  # set by accelerate launch / torchrun, not by a plain `python`
    return {"ddp_backend": "gloo"} if launched and not torch.cuda.is_available() else {}


def pop_flag(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """(value of --name, argv without it); None when the flag is absent."""
    for k, arg in enumerate(argv):
        if arg == f"--{name}" and k + 1 < len(argv):
            return argv[k + 1], argv[:k] + argv[k + 2 :]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1], argv[:k] + argv[k + 1 :]
    return None, argv


def split_config_flag(argv: list[str], default_config: Path) -> tuple[Path, list[str]]:
    value, rest = pop_flag(argv, "config")
    return (Path(value) if value is not None else default_config), rest


def read_yaml_config(path: Path, argument_classes=ARGUMENT_CLASSES) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a file in recipes/configs/")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe config is a flat mapping of argument names to values")
    known = {f.name for cls in argument_classes for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [
            f"{key} (did you mean {', '.join(difflib.get_close_matches(key, known, 2)) or '?'})"
            for key in unknown
        ]
        raise ConfigError(f"{path}: unknown key(s): {'; '.join(hints)}")
    return values


REPO = Path(__file__).resolve().parent.parent
NO_DEEPSPEED = ("none", "false", "")


def existing_ds_config(value: str, where: str) -> str:
    # Relative to the working directory, as every path argument; else to the repository root, so the recipe YAMLs'
    # `ds_configs/zero3_offload.json` also works from another directory.
    for candidate in (Path(value), REPO / value):
        if candidate.is_file():
            return str(candidate.resolve())
    raise ConfigError(
        f"DeepSpeed config {value} ({where}) does not exist; give a path to a JSON in ds_configs/"
    )


def same_file(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def resolve_deepspeed(yaml_value, cli_value: str | None, config_path: Path, environ=os.environ):
    """(the `deepspeed` argument for TrainingArguments, a line saying what was chosen or None). See the module
    docstring for the rules; a contradiction between two explicit choices raises ConfigError."""
    launcher_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    launcher = None
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        launcher = (
            f"DeepSpeed ({launcher_file})" if launcher_file else "DeepSpeed (settings in the launcher config)"
        )
    elif environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        launcher = "FSDP"
    if cli_value is not None:
        wanted = (
            None
            if str(cli_value).strip().lower() in NO_DEEPSPEED
            else existing_ds_config(cli_value, "--deepspeed")
        )
        agrees = launcher is None or (
            wanted is not None and launcher_file is not None and same_file(wanted, launcher_file)
        )
        if not agrees:
            raise ConfigError(
                f"the launcher config runs {launcher}, but --deepspeed {cli_value} asks for "
                f"{'no DeepSpeed' if wanted is None else wanted}. Pick one: drop --deepspeed to use the launcher's, "
                "or launch with another accelerate config (or none: `accelerate launch recipes/<model>.py` takes "
                "the recipe YAML's DeepSpeed config)."
            )
        # Where the launcher runs DeepSpeed, accelerate hands its file to the Trainer: set it once, not twice.
        return (None if launcher else wanted), None
    if yaml_value is None or str(yaml_value).strip().lower() in NO_DEEPSPEED:
        return None, None
    from_yaml = existing_ds_config(str(yaml_value), f"deepspeed in {config_path}")
    if launcher is None:
        return from_yaml, f"DeepSpeed config: {from_yaml} (deepspeed in {config_path})"
    if launcher_file is not None and same_file(from_yaml, launcher_file):
        return None, None
    return None, (
        f"the launcher config's {launcher} replaces {config_path}'s deepspeed: {yaml_value} (the launcher config wins; "
        "--deepspeed on the command line must agree with it)"
    )


def single_process_environment(environ=os.environ) -> None:
    """DeepSpeed needs the variables a launcher sets; `python recipes/x.py` or a one-process `accelerate launch`
    sets none, and DeepSpeed then looks for MPI and fails. One process is rank 0 of a world of 1."""
    if "RANK" in environ or "LOCAL_RANK" in environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    environ.setdefault("MASTER_PORT", str(port))


def load_recipe(recipe_path: Path):
    """The recipe file as a module (its main() not run), for what its MODEL-SPECIFIC block defines."""
    spec = importlib.util.spec_from_file_location(recipe_path.stem, recipe_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_for_model_type(model_type: str) -> Path:
    """The recipe that trains checkpoints of `model_type`: the one whose MODEL_TYPES names it, else the one that
    takes any image-text-to-text model (MODEL_TYPES = ()). Only recipes that declare MODEL_TYPES are loaded."""
    import re

    declaring = [
        path
        for path in sorted(RECIPES_DIR.glob("*.py"))
        if re.search(r"^MODEL_TYPES\s*=", path.read_text(), re.MULTILINE)
    ]
    modules = {path: load_recipe(path) for path in declaring}
    for path, module in modules.items():
        if model_type in module.MODEL_TYPES:
            return path
    return next(path for path, module in modules.items() if not module.MODEL_TYPES)


def recipe_argument_classes(recipe_path: Path) -> tuple[tuple, Path]:
    """(the recipe's own argument dataclasses, e.g. Qwen's pixel caps, its DEFAULT_CONFIG), so that its YAML and
    arguments parse outside the recipe too (scripts/show_ds_config.py, the tests)."""
    module = load_recipe(recipe_path)
    classes = [
        obj for obj in vars(module).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)
    ]
    return tuple(cls for cls in classes if cls.__module__ == module.__name__), module.DEFAULT_CONFIG


def parse_recipe_args(default_config: Path, argv: list[str] | None = None, extra_classes: tuple = ()):
    """(ModelArguments, DataArguments, RecipeTrainingArguments, *extra) from the YAML config and the command
    line. `extra_classes` are a recipe's own argument dataclasses (e.g. Qwen's pixel caps).

    Precision is "auto" (see `auto_precision`) unless bf16 or fp16 is set in the YAML or on the command line;
    on a machine without a GPU ddp_backend defaults to gloo.
    """
    argument_classes = ARGUMENT_CLASSES + tuple(extra_classes)
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = split_config_flag(argv, default_config)
    values = read_yaml_config(config_path, argument_classes)
    cli_deepspeed, argv = pop_flag(argv, "deepspeed")
    values["deepspeed"], deepspeed_line = resolve_deepspeed(
        values.get("deepspeed"), cli_deepspeed, config_path
    )
    if values["deepspeed"] is not None:
        single_process_environment()
        if not torch.cuda.is_available():
            # A DeepSpeed config given to TrainingArguments on a machine without a GPU: without use_cpu the
            # Trainer's process group counts 1 process and DeepSpeed refuses train_batch_size ("2 != 2 * 1 * 2").
            values.setdefault("use_cpu", True)
    if deepspeed_line and os.environ.get("RANK", "0") == "0":
        print(deepspeed_line, file=sys.stderr, flush=True)
    given = set(values) | {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    parser = HfArgumentParser(argument_classes)
    if not given & {"bf16", "fp16"}:
        parser.set_defaults(**auto_precision())
    parser.set_defaults(**auto_backend())
    parser.set_defaults(**values)
    # Fields without defaults are "required" to argparse even when the YAML supplies them.
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parsed = parser.parse_args_into_dataclasses(args=argv)
    training_args = next(a for a in parsed if isinstance(a, TrainingArguments))
    model_args = next((a for a in parsed if isinstance(a, ModelArguments)), None)
    if model_args is not None and model_args.use_dora and not model_args.use_lora:
        raise ConfigError(
            "--use_dora true adapts the LoRA adapters, but --use_lora is false: pass --use_lora true as well "
            "(DoRA is LoRA with each adapted weight's magnitude trained apart)"
        )
    data_args = next((a for a in parsed if isinstance(a, DataArguments)), None)
    if data_args is not None and data_args.packing and not data_args.max_length:
        raise ConfigError(
            "--packing true packs samples into rows of --max_length tokens, but --max_length is unset: give it "
            "(2048 in the recipes' YAMLs) or pass --packing false"
        )
    under_deepspeed = (
        training_args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )
    if getattr(training_args, "compensated_bf16_updates", False) and under_deepspeed:
        raise ConfigError(
            "--compensated_bf16_updates true replaces the optimizer, but DeepSpeed makes its own (with fp32 master "
            "weights): train without DeepSpeed (accelerate_configs/single_gpu.yaml, or --deepspeed none) or drop "
            "the flag"
        )
    move_secrets_to_environment(training_args)
    return parsed


# TrainingArguments fields that hold a secret, and the environment variable the library using it reads instead.
SECRET_ARGUMENTS = {"hub_token": "HF_TOKEN"}


def move_secrets_to_environment(training_args: TrainingArguments) -> None:
    """Clear the token fields of the arguments, handing each token to its library through the environment of
    this process (and its children) instead.

    The Trainer pickles the whole TrainingArguments, token included, into training_args.bin in every checkpoint
    and in output_dir (its JSON and TensorBoard copies hide tokens; the pickle does not). huggingface_hub reads
    HF_TOKEN when the Trainer passes it no token, so --push_to_hub still works.
    """
    for name, variable in SECRET_ARGUMENTS.items():
        secret = getattr(training_args, name, None)
        if secret:
            os.environ[variable] = secret
            setattr(training_args, name, None)
            if training_args.process_index == 0:
                print(
                    f"--{name} is kept in memory only (as {variable} for this run), never written to "
                    f"output_dir; `hf auth login` or {variable} in the environment keeps it off the command line",
                    file=sys.stderr,
                )
