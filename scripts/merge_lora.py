r"""Merge a LoRA adapter into its base model and save a standalone model that loads with from_pretrained.

    python scripts/merge_lora.py --adapter runs/llava-1.5-7b-lora --output_dir runs/llava-1.5-7b-lora-merged

--adapter is a LoRA run's output_dir (or one of its checkpoint-* folders): adapter_config.json,
adapter_model.safetensors and the processor, as recipes/llava.py saves them. The base model is the one named
in adapter_config.json (override with --base_model_name_or_path). Modules trained in full next to the adapter
(the projector, through PEFT's modules_to_save) replace the base model's copies.

The merge is done in float32 on the CPU, so the result does not depend on the GPU's precision; the merged
weights are then saved in --dtype (default: the base model's own dtype, as recorded in its config). Before
saving, the script runs one test input (a prompt and a synthetic image) through the model with the adapter
and again after merging, prints the largest logit difference, and stops without saving if it is beyond
rounding error. The output folder holds config.json, generation_config.json, model.safetensors and the
processor: it loads with from_pretrained, scripts/infer.py and scripts/evaluate.py like any full model.
Needs RAM for the base model in float32 (about 4 bytes a parameter, ~28 GB for a 7B model).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor
from transformers.utils import logging

from vlm_recipes.inference import load_for_inference, user_turn
from vlm_recipes.masking import add_special_tokens_for, render

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Merging reorders float32 sums (W x + B (A x) becomes (W + B A) x): differences are ~1e-6 of the logits'
# size. Anything near this bound means the merge changed the model, not the rounding.
RELATIVE_TOLERANCE = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter",
        required=True,
        type=Path,
        help="folder with adapter_config.json (a LoRA run's output_dir)",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="where the merged model is saved")
    parser.add_argument(
        "--base_model_name_or_path",
        default=None,
        help="the base model, if not where adapter_config.json says (it may be a path relative to the run)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the saved weights; auto: the base model's dtype from its config (default)",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a model already in --output_dir"
    )
    parser.add_argument(
        "--skip_check", action="store_true", help="do not compare logits before and after merging"
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="run code shipped with the checkpoint"
    )
    return parser.parse_args()


def check_paths(adapter: Path, output_dir: Path, overwrite: bool) -> None:
    if not (adapter / "adapter_config.json").is_file():
        if (adapter / "config.json").is_file():
            fix = "it holds a full model already (config.json), so there is nothing to merge: use it as it is"
        else:
            checkpoints = sorted(p.name for p in adapter.glob("checkpoint-*") if p.is_dir())
            fix = (
                f"pass a LoRA run's output_dir{' or one of ' + ', '.join(checkpoints) if checkpoints else ''}"
            )
        sys.exit(f"error: {adapter} has no adapter_config.json, so it is not a PEFT adapter; {fix}")
    peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
    if peft_type != "LORA":
        sys.exit(f"error: {adapter} holds a {peft_type} adapter; this script merges LoRA adapters only")
    if output_dir.resolve() == adapter.resolve():
        sys.exit("error: --output_dir must differ from --adapter (the adapter would be mixed with the merge)")
    if (output_dir / "model.safetensors").exists() or (output_dir / "model.safetensors.index.json").exists():
        if not overwrite:
            sys.exit(
                f"error: {output_dir} already holds a model; choose another --output_dir or pass --overwrite_output_dir"
            )


def test_inputs(processor, dtype: torch.dtype) -> dict:
    """One prompt with one image. The image is a colour gradient, not blank, so that the vision tower and
    the projector (often trained next to the adapter) produce varied features."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 128)], -1)
    text = render(processor, user_turn("Describe the image.", 1), add_generation_prompt=True)
    inputs = processor(
        text=[text],
        images=[Image.fromarray(pixels.astype(np.uint8))],
        add_special_tokens=add_special_tokens_for(processor, text),
        return_tensors="pt",
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def base_dtype(args) -> torch.dtype:
    # From the base's config.json as saved: the loaded model's config says float32, the dtype it was loaded in.
    base = (
        args.base_model_name_or_path
        or json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    dtype = AutoConfig.from_pretrained(base, trust_remote_code=args.trust_remote_code).dtype
    return DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype or torch.float32


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


def main() -> None:
    args = parse_args()
    check_paths(args.adapter, args.output_dir, args.overwrite_output_dir)
    logging.disable_progress_bar()

    try:
        model, _ = load_for_inference(
            str(args.adapter),
            dtype=torch.float32,
            device="cpu",
            trust_remote_code=args.trust_remote_code,
            base_model_name_or_path=args.base_model_name_or_path,
        )
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    # load_for_inference pads on the left for generation; the saved processor keeps the training settings.
    processor = AutoProcessor.from_pretrained(args.adapter, trust_remote_code=args.trust_remote_code)
    saved_dtype = base_dtype(args) if args.dtype == "auto" else DTYPES[args.dtype]

    inputs = None if args.skip_check else test_inputs(processor, torch.float32)
    before = None if inputs is None else logits(model, inputs)

    merged = model.merge_and_unload()

    if inputs is not None:
        after = logits(merged, inputs)
        difference = (after - before).abs().max().item()
        scale = before.abs().max().item()
        print(f"merge check: max |logit difference| {difference:.3g} (logits up to {scale:.3g})")
        if difference > RELATIVE_TOLERANCE * max(scale, 1.0):
            sys.exit(
                f"error: merging changed the logits by {difference:.3g}, more than rounding; nothing was saved. "
                "Check that --base_model_name_or_path is the model the adapter was trained on."
            )

    merged = merged.to(saved_dtype)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"merged model ({str(saved_dtype).removeprefix('torch.')}) saved to {args.output_dir}")


if __name__ == "__main__":
    main()
