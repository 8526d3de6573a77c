r"""Estimate GPU and host memory for a fine-tune under every shipped launcher config, and recommend the fastest
config that fits, before spending any GPU time.

    python scripts/plan_memory.py --model qwen2.5-vl-7b --mode lora
    python scripts/plan_memory.py --config recipes/configs/llava.yaml --gpus 8 --gpu_memory_gib 40
    python scripts/plan_memory.py --model llava-hf/llava-1.5-7b-hf --micro_batch 8 --seq_len 1024 --breakdown
    python scripts/plan_memory.py --model path/to/checkpoint --mode projector --json

--model is a short name or hub id of the recipes' default models (llava-1.5-7b, qwen2.5-vl-3b, qwen2.5-vl-7b,
chexagent-2-3b: known offline), or a local folder with a config.json (no weights needed), or any hub id when
the hub is reachable. --config takes the model, training mode and batch settings from a recipe YAML; flags
given next to it override them. Hardware defaults: one node with one 80 GiB GPU and 128 GiB of host RAM.

For each config it prints the estimated peak per GPU and the host RAM per node, whether each fits with
--margin to spare, and the fastest config that fits, naming what ruled out the faster ones.

--pick (what `make train` runs): print only the accelerate config file of the recommendation for THIS machine (its
GPUs' memory and host RAM measured, unless given), and the reason on stderr. Without a CUDA GPU, or when nothing
fits or the model is not known offline, it prints the shared accelerate_configs/zero3_offload.yaml and says why.

    python scripts/plan_memory.py --pick --config recipes/configs/qwen_vl.yaml --gpus 1

docs/configs.md
("Memory planner") says what is modelled, how the estimates compare with measured peaks, and the limits.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

from vlm_recipes.masking import image_tokens_at_cap
from vlm_recipes.memory import (
    DEFAULT_MARGIN,
    GIB,
    Hardware,
    ModelNotKnownOffline,
    TrainingSetup,
    as_json,
    estimate_all,
    image_tokens_for_area,
    load_model_config,
    model_shape,
    parameter_split,
    recommend,
)


def defaults_from_recipe_yaml(path: Path) -> dict:
    """The planner's arguments that a recipe YAML sets (its keys are the recipes' argument names)."""
    values = yaml.safe_load(path.read_text()) or {}
    defaults = {
        "model": values.get("model_name_or_path") or None,
        "train_vision_tower": values.get("freeze_vision_tower") is False,
        "lora_r": values.get("lora_r"),
        "use_dora": values.get("use_dora") or None,
        "micro_batch": values.get("per_device_train_batch_size"),
        "seq_len": values.get("max_length"),
        "dataloader_workers": values.get("dataloader_num_workers"),
        "compensated_bf16_updates": values.get("compensated_bf16_updates") or None,
        "fp16": values.get("fp16") or None,
    }
    if values.get("use_lora"):
        defaults["mode"] = "lora"
    elif values.get("freeze_language_model"):
        defaults["mode"] = "projector"
    if values.get("gradient_checkpointing") is False:
        defaults["no_gradient_checkpointing"] = True
    if values.get("max_pixels"):
        defaults["max_pixels"] = values["max_pixels"]
    return {key: value for key, value in defaults.items() if value is not None}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="a recipe YAML to take the model and batch settings from")
    parser.add_argument("--model", help="short name, hub id or local folder (see above)")
    parser.add_argument("--mode", choices=["full", "lora", "projector"], default="full",
                        help="full: language model + projector; lora: adapters + projector; projector: it alone")  # fmt: skip
    parser.add_argument(
        "--train_vision_tower", action="store_true", help="full mode: train the vision tower too"
    )
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument(
        "--use_dora", action="store_true", help="with --mode lora: DoRA's magnitudes counted too"
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (processes) per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    parser.add_argument("--host_ram_gib", type=float, default=128.0, help="host RAM per node")
    parser.add_argument("--micro_batch", type=int, default=4, help="per_device_train_batch_size")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per sample, image tokens included")
    parser.add_argument("--image_tokens", type=int, default=None,
                        help="image tokens per sample (default: measured with the processor of a local checkpoint "
                        "folder; else one image at the model's usual size)")  # fmt: skip
    parser.add_argument("--max_pixels", type=int, default=None,
                        help="pixel-budget models (Qwen-VL): one image of this area per sample")  # fmt: skip
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--dataloader_workers", type=int, default=4)
    parser.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="fraction of memory to keep free"
    )
    parser.add_argument("--fp32_master_weights", action="store_true",
                        help="recommend only configs that keep fp32 master weights (not plain bf16 single_gpu / DDP)")  # fmt: skip
    parser.add_argument("--compensated_bf16_updates", action="store_true",
                        help="single_gpu / multi_gpu with the recipes' --compensated_bf16_updates true: updates as "
                        "precise as fp32 master weights, 2 bytes more per trained parameter")  # fmt: skip
    parser.add_argument("--fp16", action="store_true",
                        help="the run trains in fp16 (--fp16 true): configs the recipes refuse in fp16 are not picked")  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="a CPU-only run: the 'GPU' memory is host memory")
    parser.add_argument("--breakdown", action="store_true", help="list what each estimate is made of")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--pick", action="store_true",
                        help="print only the recommended accelerate config file for this machine (make train)")  # fmt: skip
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**defaults_from_recipe_yaml(first.config))
    args = parser.parse_args(argv)
    if not args.model and not args.pick:
        parser.error("--model (or a --config whose model_name_or_path is set) is required")
    return args


def table(estimates, choice, hardware: Hardware, margin: float) -> str:
    rows = [f"{'config':<26}{'per GPU GiB':>12}{'host GiB/node':>15}   fits ({margin:.0%} margin)"]
    for e in estimates:
        problem = choice.fits[e.config]
        rows.append(
            f"{e.config:<26}{e.gpu_bytes / GIB:>12.1f}{e.host_bytes / GIB:>15.1f}   {'no: ' + problem if problem else 'yes'}"
        )
    return "\n".join(rows)


def breakdown(estimates) -> str:
    lines = []
    for e in estimates:
        lines.append(f"{e.config}:")
        lines += [f"    GPU   {v / GIB:8.2f}  {k}" for k, v in e.gpu.items()]
        lines += [f"    host  {v / GIB:8.2f}  {k} (per node)" for k, v in e.host.items()]
    return "\n".join(lines)


def image_tokens_per_sample(args, config) -> tuple[int | None, str]:
    """(image tokens per sample, where the number comes from): --image_tokens; --max_pixels over the config's patch
    and merge sizes; the processor of a local checkpoint folder, measured at its cap; else None (the config's usual
    size: the planner's default)."""
    if args.image_tokens is not None:
        return args.image_tokens, "--image_tokens"
    vision = getattr(config, "vision_config", None)
    if args.max_pixels and vision is not None:
        return image_tokens_for_area(vision, args.max_pixels), f"--max_pixels {args.max_pixels}"
    if Path(args.model).is_dir():
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(args.model)
        except (OSError, ValueError, TypeError):
            processor = None
        if processor is not None and getattr(processor, "image_token_id", None) is not None:
            return image_tokens_at_cap(processor), f"measured with {args.model}'s processor at its cap"
    return None, "the model's usual image size"


SHARED_CONFIG = "accelerate_configs/zero3_offload.yaml"  # the recipes' YAMLs name its DeepSpeed JSON


def measured_hardware(args, argv: list[str]) -> tuple[bool, str]:
    """Fill --gpu_memory_gib and --host_ram_gib from this machine unless they were given: (a CUDA GPU is
    visible, or a GPU was described on the command line; what was measured)."""
    given = {arg.split("=", 1)[0] for arg in argv}
    if "--gpu_memory_gib" in given:
        return True, "as given"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    from vlm_recipes.host_memory import meminfo_available_bytes

    args.gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    if "--host_ram_gib" not in given:
        args.host_ram_gib = (meminfo_available_bytes() or args.host_ram_gib * GIB) / GIB
    return (
        True,
        f"measured: {torch.cuda.get_device_name(0)}, {args.gpu_memory_gib:.0f} GiB, host {args.host_ram_gib:.0f} GiB available",
    )


def pick(args, argv: list[str]) -> None:
    """stdout: the accelerate config `make train` launches with; stderr: why, and how to force another."""
    force = "force another with make train ACCELERATE_CONFIG=accelerate_configs/<name>.yaml"
    has_gpu, measured = measured_hardware(args, argv)
    choice, reason = None, ""
    if not has_gpu:
        reason = "no CUDA GPU: the shared ZeRO-3 offload config, as the CPU demo runs it"
    elif not args.model:
        reason = "the config names no model_name_or_path to plan for: the shared ZeRO-3 offload config"
    else:
        try:
            name, config = load_model_config(args.model)
        except ModelNotKnownOffline as error:
            reason = f"{error} So the shared ZeRO-3 offload config"
        else:
            shape = model_shape(name, config)
            setup, _ = setup_from(args, config)
            hardware = hardware_from(args)
            recommendation = recommend(estimate_all(shape, setup, hardware), hardware, args.margin,
                                       args.fp32_master_weights)  # fmt: skip
            choice, reason = recommendation.config, f"memory planner ({measured}): {recommendation.reason}"
            if choice is None:
                reason += " So the shared ZeRO-3 offload config; its host-RAM check will say if it cannot run"
    path = f"accelerate_configs/{choice}.yaml" if choice else SHARED_CONFIG
    print(f"make train: {path}: {reason}; {force}", file=sys.stderr)
    print(path)


def setup_from(args, config) -> tuple[TrainingSetup, str]:
    """(what the run trains and its batch, where its image tokens per sample come from)."""
    image_tokens, image_tokens_from = image_tokens_per_sample(args, config)
    setup = TrainingSetup.from_mode(
        args.mode,
        train_vision_tower=args.train_vision_tower,
        lora_r=args.lora_r,
        use_dora=args.use_dora,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        image_tokens=image_tokens,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        dataloader_workers=args.dataloader_workers,
        compensated_updates=args.compensated_bf16_updates,
        fp16=args.fp16,
    )
    return setup, image_tokens_from


def hardware_from(args) -> Hardware:
    return Hardware(
        gpus_per_node=args.gpus, nodes=args.nodes, gpu_memory_gib=args.gpu_memory_gib,
        host_ram_gib=args.host_ram_gib, device="cpu" if args.cpu else "cuda",
    )  # fmt: skip


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.pick:
        pick(args, argv)
        return
    try:
        name, config = load_model_config(args.model)
    except ModelNotKnownOffline as error:
        sys.exit(str(error))
    shape = model_shape(name, config)
    setup, image_tokens_from = setup_from(args, config)
    hardware = hardware_from(args)
    estimates = estimate_all(shape, setup, hardware)
    choice = recommend(estimates, hardware, args.margin, args.fp32_master_weights)
    if args.json:
        print(json.dumps(as_json(shape, setup, hardware, estimates, choice), indent=1))
        return
    trainable, frozen = parameter_split(shape, setup)
    image_tokens = shape.default_image_tokens if setup.image_tokens is None else setup.image_tokens
    print(
        f"Model: {shape.name}, {shape.total_params / 1e9:.2f}B parameters: vision tower {shape.vision_params / 1e9:.3f}B, "
        f"projector {shape.projector_params / 1e9:.3f}B, language model {shape.language_params / 1e9:.3f}B "
        f"(embeddings {'tied' if shape.tied_embeddings else 'not tied'}); largest layer "
        f"{shape.largest_layer_params / 1e6:.0f}M"
    )
    print(
        f"Training: {setup.mode}: {trainable / 1e9:.3f}B trainable, {frozen / 1e9:.3f}B frozen; micro-batch "
        f"{setup.micro_batch} x {setup.seq_len} tokens ({image_tokens} image tokens each, {image_tokens_from}), gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}, {setup.dataloader_workers} data-loader workers"
    )
    print(
        f"Hardware: {hardware.nodes} node(s) x {hardware.gpus_per_node} GPU(s), {hardware.gpu_memory_gib:g} GiB per "
        f"GPU, {hardware.host_ram_gib:g} GiB host RAM per node{' (CPU-only run)' if args.cpu else ''}\n"
    )
    print(table(estimates, choice, hardware, args.margin))
    if args.breakdown:
        print("\n" + breakdown(estimates))
    print(f"\nRecommendation: {choice.reason}")


if __name__ == "__main__":
    main()
