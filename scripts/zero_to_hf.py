r"""Turn a DeepSpeed ZeRO-2/3 checkpoint into a model folder that loads with from_pretrained.

    python scripts/zero_to_hf.py runs/llava-1.5-7b-finetune/checkpoint-500 runs/llava-1.5-7b-finetune-step500

When is this needed? Under ZeRO-3 each process holds a slice of every weight. With
stage3_gather_16bit_weights_on_model_save on (as in ds_configs/zero3_offload.json) the Trainer also writes
the gathered weights as model.safetensors, and no conversion is needed. With it off, or when that file was
not written, a checkpoint holds only DeepSpeed's shards: CHECKPOINT_DIR/global_step*/ with one
*_model_states.pt and one *_optim_states.pt per process, and a `latest` file naming the global_step folder.
CHECKPOINT_DIR is a checkpoint-* folder, or the output_dir itself when the final save wrote shards.

The weights are consolidated by DeepSpeed's own code (deepspeed.utils.zero_to_fp32), from the float32 master
copy the optimizer keeps, so they are exactly the weights training ended with, whatever precision the forward
pass ran in. They are loaded into the model built from the checkpoint's config.json, every parameter
accounted for (tied weights re-tied), and saved with save_pretrained as safetensors (sharded above
--max_shard_size). generation_config.json and the processor files are copied from the checkpoint, or from its
parent output_dir. A LoRA run's checkpoint (adapter_config.json) becomes a PEFT adapter folder instead,
loadable with scripts/infer.py or scripts/merge_lora.py.

Needs RAM for the model once in float32 (4 bytes a parameter); the optimizer moments are never loaded.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a Trainer checkpoint holds besides weights, that a model folder needs: generation defaults and the
# processor (tokenizer, image processor, chat template). config.json is written by save_pretrained.
COPIED_FILES = (
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template*",
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the path and the fix."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint_dir",
        type=Path,
        help="a checkpoint-* folder (or output_dir) holding global_step*/ and `latest`",
    )
    parser.add_argument("output_dir", type=Path, help="where the from_pretrained-loadable model is written")
    parser.add_argument(
        "--tag", default=None, help="the global_step* folder to convert (default: the one `latest` names)"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the saved weights (default float32: the master weights exactly as trained)",
    )
    parser.add_argument(
        "--max_shard_size",
        default="5GB",
        help="larger models are split into shards of this size (default 5GB)",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a model already in output_dir"
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="run code shipped with the checkpoint"
    )
    return parser.parse_args()


def find_tag(checkpoint_dir: Path, tag: str | None) -> str:
    """The global_step* folder to convert: --tag, else the one `latest` names, else the only one there is."""
    if not checkpoint_dir.is_dir():
        raise ConversionError(f"{checkpoint_dir} is not a folder; pass a checkpoint-* folder of a ZeRO run")
    steps = sorted(p.name for p in checkpoint_dir.glob("global_step*") if p.is_dir())
    if tag is None and (checkpoint_dir / "latest").is_file():
        tag = (checkpoint_dir / "latest").read_text().strip()
    if tag is None and len(steps) == 1:
        tag = steps[0]
    if tag is None and steps:
        raise ConversionError(
            f"{checkpoint_dir} has several ZeRO checkpoints ({', '.join(steps)}) and no `latest` file naming "
            "one: pass --tag with the one to convert"
        )
    if tag is None:
        checkpoints = sorted(
            (p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: p.name
        )
        if checkpoints:
            fix = (
                f"it is an output_dir: pass one of its checkpoints ({', '.join(p.name for p in checkpoints)})"
            )
        elif (checkpoint_dir / "model.safetensors").is_file():
            fix = "it already holds model.safetensors, which loads with from_pretrained as it is"
        else:
            fix = "pass a checkpoint-* folder written by a DeepSpeed ZeRO run"
        raise ConversionError(
            f"{checkpoint_dir} holds no ZeRO checkpoint (no global_step* folder, no `latest` file); {fix}"
        )
    shards = checkpoint_dir / tag
    if not shards.is_dir():
        raise ConversionError(
            f"{shards} does not exist; pass --tag with one of: {', '.join(steps) or 'none'}"
        )
    if not any(shards.glob("*_optim_states.pt")):
        raise ConversionError(
            f"{shards} has no *_optim_states.pt: the float32 weights live in the optimizer shards, so this "
            "checkpoint was cut off while being written or copied without them; use another checkpoint"
        )
    return tag


def find_model_files(checkpoint_dir: Path) -> Path:
    """The folder with config.json (or adapter_config.json) and the processor: the checkpoint, or its parent."""
    for folder in (checkpoint_dir, checkpoint_dir.resolve().parent):
        if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            return folder
    raise ConversionError(
        f"neither {checkpoint_dir} nor its parent has config.json (or adapter_config.json), so the model's "
        "architecture is unknown; copy the config.json of the model that was trained into the checkpoint folder"
    )


def empty_model(config, trust_remote_code: bool) -> torch.nn.Module:
    """The model's modules with weights on the meta device: built in no time and no memory, then given the
    consolidated tensors. The class is the one training saved (config.architectures), when transformers has it."""
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):
        if model_class is not None:
            return model_class._from_config(config)
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def load_consolidated(
    model: torch.nn.Module, state_dict: dict, checkpoint_dir: Path, allowed_missing: set
) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = set(result.missing_keys) - allowed_missing
    if result.unexpected_keys or missing:
        raise ConversionError(
            f"the weights in {checkpoint_dir} do not fit the model its config.json describes: "
            f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {sorted(result.unexpected_keys)[:3]}). Was config.json copied from another model?"
        )


def convert_full_model(state_dict: dict, checkpoint_dir: Path, model_files: Path, args) -> None:
    config = AutoConfig.from_pretrained(model_files, trust_remote_code=args.trust_remote_code)
    model = empty_model(config, args.trust_remote_code)
    # Tied weights (lm_head = embed_tokens) are one tensor; DeepSpeed records the shared names, but a
    # checkpoint written without them is complete once the tie is restored.
    tied = set(model.all_tied_weights_keys) | set(model.all_tied_weights_keys.values())
    load_consolidated(model, state_dict, checkpoint_dir, allowed_missing=tied)
    model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise ConversionError(
            f"{checkpoint_dir} has no weights for {still_empty[:5]}; the checkpoint is incomplete"
        )
    model.to(DTYPES[args.dtype]).save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)


def convert_adapter(state_dict: dict, checkpoint_dir: Path, model_files: Path, args) -> None:
    from peft import PeftConfig, get_peft_model

    peft_config = PeftConfig.from_pretrained(model_files)
    # Only the base model's config.json is read (for the module layout), never its weights.
    try:
        base_config = AutoConfig.from_pretrained(
            peft_config.base_model_name_or_path, trust_remote_code=args.trust_remote_code
        )
    except OSError as error:
        raise ConversionError(
            f"cannot read the config of the base model {peft_config.base_model_name_or_path!r} named in "
            f"{model_files / 'adapter_config.json'} ({error}); run from the folder training ran in, or fix "
            "base_model_name_or_path in that file"
        ) from error
    model = get_peft_model(empty_model(base_config, args.trust_remote_code), peft_config)
    # LoRA checkpoints hold the trained weights only (the Trainer excludes the frozen base): every adapter and
    # modules_to_save weight must be there; the base model's weights are not needed to save an adapter.
    trained = {name for name in model.state_dict() if "lora_" in name or "modules_to_save" in name}
    load_consolidated(model, state_dict, checkpoint_dir, allowed_missing=set(model.state_dict()) - trained)
    model.to(DTYPES[args.dtype]).save_pretrained(args.output_dir)


def main() -> None:
    args = parse_args()
    try:
        tag = find_tag(args.checkpoint_dir, args.tag)
        model_files = find_model_files(args.checkpoint_dir)
    except ConversionError as error:
        sys.exit(f"error: {error}")
    existing = [p.name for p in args.output_dir.glob("*.safetensors*")] if args.output_dir.is_dir() else []
    if existing and not args.overwrite_output_dir:
        sys.exit(
            f"error: {args.output_dir} already holds {existing[0]}; pick another output_dir or pass --overwrite_output_dir"
        )

    # DeepSpeed's own consolidation: reads every rank's shard of the fp32 master weights and reassembles
    # each parameter, frozen ones included, under the model's parameter names.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(args.checkpoint_dir), tag=tag)
    is_adapter = (model_files / "adapter_config.json").is_file()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        convert = convert_adapter if is_adapter else convert_full_model
        convert(state_dict, args.checkpoint_dir, model_files, args)
    except ConversionError as error:
        sys.exit(f"error: {error}")

    copied = []
    for pattern in COPIED_FILES:
        for source in sorted(model_files.glob(pattern)):
            target = args.output_dir / source.name
            if target.resolve() != source.resolve():  # converting into the run's own output_dir is allowed
                shutil.copy2(source, target)
            copied.append(source.name)
    if not any(name.startswith(("tokenizer", "processor_config")) for name in copied):
        print(f"warning: no processor files in {model_files}; copy them from the base model", file=sys.stderr)
    kind = "PEFT adapter" if is_adapter else "model"
    print(
        json.dumps(
            {
                "converted": str(args.checkpoint_dir / tag),
                "output_dir": str(args.output_dir),
                "kind": kind,
                "dtype": args.dtype,
                "parameters": len(state_dict),
                "copied": copied,
            }  # fmt: skip
        )
    )


if __name__ == "__main__":
    main()
