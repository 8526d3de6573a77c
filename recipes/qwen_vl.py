r"""Fine-tune a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL MoE: vision tower, merger, language
model) with the HF Trainer under DeepSpeed ZeRO-3 with CPU offload.

Launch (from the repository root):

    accelerate launch recipes/qwen_vl.py    # under ds_configs/zero3_offload.json, named by the YAML
    accelerate launch --config_file accelerate_configs/zero3_offload.yaml recipes/qwen_vl.py
    accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 4 recipes/qwen_vl.py \
        --config recipes/configs/qwen_vl_lora.yaml --dataset_path data/train.jsonl --image_root data/images
    make train MODEL=qwen-vl CONFIG=recipes/configs/qwen_vl_3b.yaml ARGS="--max_pixels 401408"

Configs: qwen_vl.yaml (Qwen2.5-VL-7B-Instruct: merger + language model, vision tower frozen), qwen_vl_3b.yaml
(the same for Qwen2.5-VL-3B), qwen_vl_lora.yaml (LoRA on the language model, merger trained),
qwen_vl_demo.yaml (the tiny CPU demo). Any field can be overridden on the command line by its name.
--min_pixels / --max_pixels cap each image's resolution, and so its number of tokens (one per 28x28 pixels; Qwen3-VL
32x32): the main GPU-memory knob for these models; --video_min_pixels / --video_max_pixels cap videos. The caps are
checked at start by measuring a probe image through the processor. --attn_implementation sdpa_varlen (the real-size configs' default) gives the windowed vision
tower one packed attention kernel per layer (vlm_recipes/attention.py; 1.8x faster on an H100, docs/benchmarks.md),
and with --packing true the language model's packed rows too (packed Qwen2.5-VL-3B at 89-96% of its fixed-length speed
on an H200, 93% on average over three device commands, from 78% with sdpa's block mask).
--pad_mlp_widths auto (the default) widens the vision MLP from 3,420 to 3,456 with zero units where the weights are
whole (no DeepSpeed, no LoRA): 1.24x a compiled packed Qwen2.5-VL-3B step on an H200, the same losses, saved at 3,420.
Re-running the same command resumes from the last complete checkpoint in output_dir.

Qwen3-VL MoE (Qwen3-VL-30B-A3B): transformers holds each layer's experts as one 3-D parameter, so ZeRO-3 gathers
all of them whichever experts the tokens of a rank pick, and ranks that route differently do not wait on each other
(no ZeRO-3 leaf module is needed); LoRA adapts its attention, not its experts (they are parameters, not Linear layers).

Tested: 2 CPU processes over gloo (tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL MoE, tests/test_qwen_vl_recipe.py;
tiny models around the real checkpoints' processor files, tests/test_real_checkpoints.py).
The original 2023 Qwen-VL exists only as remote code for old transformers and is not supported.
"""

from pathlib import Path

from peft import get_peft_model
from transformers import AutoConfig

from vlm_recipes.attention import PACKED_VISION_ATTENTION, loadable_attention, use_packed_text_attention
from vlm_recipes.collator import ConversationCollator
from vlm_recipes.config import ConfigError, parse_recipe_args
from vlm_recipes.data import ConversationDataset, media_kinds, read_records
from vlm_recipes.ds_config import check_deepspeed_config
from vlm_recipes.host_memory import check_host_memory
from vlm_recipes.masking import image_tokens_at_cap
from vlm_recipes.mlp_padding import check_mlp_padding, pad_mlp_widths
from vlm_recipes.packing import PackedDataset
from vlm_recipes.parts import ModelParts, adapters_for, freeze_parts
from vlm_recipes.preflight import preflight
from vlm_recipes.run_stats import RunStatsCallback
from vlm_recipes.training import (
    CheckpointCompleteCallback,
    RecipeTrainer,
    ResolvedDeepSpeedConfigCallback,
    StopOnNonFiniteGradientCallback,
    check_quantization,
    finish_run,
    input_grads_only_where_trained,
    log_trainable_parameters,
    prepare_output_dir,
    quantized_loading,
    training_dtype,
)

# isort: split
# ==== MODEL-SPECIFIC ==================================================================================================
# All this recipe knows about its models. A recipe for another architecture is a copy of this file with its own
# docstring and this block; main() below reads the block, the checkpoint's config and its processor, nothing else.
from dataclasses import dataclass, field

from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.attention import use_packed_vision_attention
from vlm_recipes.masking import PROBE_SIDE, media_tokens_for

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "qwen_vl.yaml"
# The config.json model_type values this recipe trains.
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
PARTS = ModelParts(  # module paths, as print(model) shows them
    vision_tower="model.visual",
    # The merger inside the tower projects image features into the language model (Qwen3-VL: its deepstack
    # mergers too, which feed early decoder layers).
    projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
    language_model="model.language_model",
    vision_lora_scope="model.visual.blocks",  # vision LoRA in the blocks, not in the merger trained in full
)


@dataclass
class QwenImageArguments:  # Qwen's image and video processors resize to a pixel budget
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Smallest image area in pixels (default: the checkpoint's). Each (patch x merge)^2 block "
                  "is one image token: 28x28 pixels for Qwen2-VL / Qwen2.5-VL, 32x32 for Qwen3-VL."},
    )  # fmt: skip
    max_pixels: int | None = field(
        default=None,
        metadata={"help": "Largest image area in pixels: at most max_pixels / 28^2 tokens per image (Qwen3-VL: / 32^2). "
                  "The real checkpoints allow 12,845,056 (16,384 tokens) or more."},
    )  # fmt: skip
    video_min_pixels: int | None = field(
        default=None, metadata={"help": "The same for videos (the video processor's own min_pixels)."}
    )
    video_max_pixels: int | None = field(
        default=None,
        metadata={"help": "Largest video size in pixels, as the video processor counts it: per frame for "
                  "Qwen2-VL / Qwen2.5-VL, over all sampled frames for Qwen3-VL."},
    )  # fmt: skip


def load_processor(model_args, image_args):
    """The checkpoint's processor, with --min_pixels/--max_pixels applied to its image processor and
    --video_min_pixels/--video_max_pixels to its video processor, checked by measuring a probe image.

    Qwen2-VL / Qwen2.5-VL checkpoints carry top-level min_pixels / max_pixels in preprocessor_config.json, which the
    image processor applies after `size` (so `size=` alone changes nothing); Qwen3-VL's carry only `size`. Both are
    given, so the caps hold on either layout."""
    path, trust = model_args.model_name_or_path, model_args.trust_remote_code
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
    caps = {
        "image": ("image_processor", image_args.min_pixels, image_args.max_pixels),
        "video": ("video_processor", image_args.video_min_pixels, image_args.video_max_pixels),
    }
    for kind, (attribute, low, high) in caps.items():
        if not (low or high):
            continue
        current = getattr(processor, attribute)
        low, high = low or current.size.shortest_edge, high or current.size.longest_edge
        capped = type(current).from_pretrained(
            path, size={"shortest_edge": low, "longest_edge": high}, min_pixels=low, max_pixels=high,
            trust_remote_code=trust,
        )  # fmt: skip
        setattr(processor, attribute, capped)
        pixels_per_token = (capped.patch_size * capped.merge_size) ** 2
        measured = media_tokens_for(processor, kind, PROBE_SIDE, PROBE_SIDE)
        if measured > high // pixels_per_token:
            raise ConfigError(
                f"the {kind} processor of {path} ignored the pixel cap {high:,}: a {PROBE_SIDE}x{PROBE_SIDE} probe "
                f"became {measured:,} tokens, more than {high // pixels_per_token:,}"
            )
    return processor


PACKING_REFUSED = ()  # model types whose packed rows transformers masks wrongly (image_text_to_text.py)
RECIPE_ARGUMENTS = (
    QwenImageArguments,
)  # this recipe's own argument dataclasses, parsed with the shared ones


def fewer_media_tokens(tokens_at_cap: int) -> str:
    """The advice for a sample whose images do not fit --max_length."""
    return f"lower --max_pixels or --video_max_pixels (an image is now up to {tokens_at_cap:,} tokens)"


def packed_position_ids(model, batch):
    """--packing true: the positions of a packed row. Qwen-VL's rotary positions are (temporal, height, width) per
    token; the model computes them over the whole row, where each sample's start after the previous one's end (rotary
    attention sees only differences, so within a sample they act as its own), under the per-sample 0..n-1 the
    collator wrote, from which transformers finds the samples' boundaries."""
    import torch

    rope, _ = model.model.get_rope_index(
        input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
        second_per_grid_ts=batch.get("second_per_grid_ts"),
    )  # fmt: skip
    return torch.cat([batch["position_ids"][None], rope.to(batch["position_ids"].device)])


def load_model(model_args, **loading):
    """The model, with the shared loading arguments (dtype, attention, QLoRA's quantization). sdpa_varlen gives the
    vision tower one attention kernel per layer instead of one per 8x8-patch window (see attention.py)."""
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **loading)
    if model_args.attn_implementation == PACKED_VISION_ATTENTION:
        use_packed_vision_attention(model, model.config.vision_config)
    return model


# ==== end of MODEL-SPECIFIC ===========================================================================================


def main():
    # ---- arguments ------------------------------------------------------------------------------------------
    # TrainingArguments come first: under ZeRO-3 they switch on partitioned model construction (zero.Init).
    model_args, data_args, training_args, *recipe_args = parse_recipe_args(
        DEFAULT_CONFIG, extra_classes=RECIPE_ARGUMENTS
    )
    resume_from = prepare_output_dir(training_args)
    # Contradictions between the DeepSpeed JSON and the arguments fail here, not at train().
    check_deepspeed_config(training_args, model_args.model_name_or_path, model_args.trust_remote_code)
    check_quantization(model_args, training_args)  # --load_in_4bit's needs, before anything loads
    check_mlp_padding(model_args, training_args)  # --pad_mlp_widths' needs, the same

    # ---- data (read and checked before any weights are loaded) -----------------------------------------------
    # Records that cannot be read are listed by the preflight with the problems it finds: one run, every problem.
    train_records, unread_train = read_records(
        data_args.dataset_path,
        data_args.image_root,
        data_args.dataset_split,
        data_args.allow_images_outside_root,
    )
    eval_records, unread_eval = (
        read_records(
            data_args.eval_dataset_path,
            data_args.image_root,
            "validation",
            data_args.allow_images_outside_root,
        )
        if data_args.eval_dataset_path
        else (None, [])
    )

    # ---- model + processor ------------------------------------------------------------------------------------
    model_type = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    ).model_type
    if MODEL_TYPES and model_type not in MODEL_TYPES:  # an empty MODEL_TYPES takes any
        raise ConfigError(
            f"{model_args.model_name_or_path} is a {model_type!r} checkpoint; recipes/{Path(__file__).name} trains "
            f"{', '.join(MODEL_TYPES)} models (README: the model table)"
        )
    if data_args.packing and model_type in PACKING_REFUSED:
        raise ConfigError(
            f"--packing true: transformers masks packed {model_type!r} rows wrongly (samples would see each other); "
            "pass --packing false (--train_sampling_strategy group_by_length also cuts padding)"
        )
    processor = load_processor(model_args, *recipe_args)
    # An offload config needing more host RAM than the machine has (model states and the records) fails here; the
    # image tokens per sample are the processor's own, measured at its cap.
    tokens_at_cap = image_tokens_at_cap(processor)
    check_host_memory(
        training_args, model_args, data_args, image_tokens=tokens_at_cap, records=(train_records, eval_records),
        parts=PARTS,
    )  # fmt: skip
    # ---- preflight: every record becomes a sample once, before any weights load -------------------------------
    advice = fewer_media_tokens(tokens_at_cap)  # for a sample whose images do not fit max_length
    train_dataset = preflight(
        ConversationDataset(train_records, processor, data_args.max_length, advice),
        data_args.dataset_path,
        data_args.skip_bad_records,
        training_args.dataloader_num_workers,
        unread=unread_train,
        batch_size=training_args.per_device_train_batch_size,
    )
    eval_dataset = (
        preflight(
            ConversationDataset(eval_records, processor, data_args.max_length, advice),
            data_args.eval_dataset_path,
            data_args.skip_bad_records,
            training_args.dataloader_num_workers,
            unread=unread_eval,
            batch_size=training_args.per_device_eval_batch_size,
        )
        if eval_records is not None
        else None
    )

    model = load_model(
        model_args,
        dtype=training_dtype(training_args),
        attn_implementation=loadable_attention(model_args.attn_implementation),  # sdpa_varlen loads as sdpa
        trust_remote_code=model_args.trust_remote_code,
        # --load_in_4bit: QLoRA's 4-bit language model; the vision tower, projector and output head stay 16-bit.
        **quantized_loading(model_args, training_args, PARTS.kept_in_16_bit()),
    )
    # --pad_mlp_widths: widths the GPU's matrix kernels take whole, exact, saved at the checkpoint's (mlp_padding.py)
    pad_mlp_widths(model, model_args, training_args)
    if data_args.packing and model_args.attn_implementation == PACKED_VISION_ATTENTION:
        # Packed rows: the language model's attention as one varlen call per layer, not sdpa with a block mask.
        use_packed_text_attention(model)
    freeze_parts(
        model, PARTS, model_args
    )  # --freeze_vision_tower, --freeze_projector, --freeze_language_model
    if model_args.use_lora:
        # LoRA (or DoRA with --use_dora true) on the named linear layers of the language model and vision tower;
        # the projector, new for every fine-tune, is trained in full and saved with the adapter unless frozen.
        model = get_peft_model(model, adapters_for(model, PARTS, model_args))
    # With gradient checkpointing the Trainer hooks the input embeddings so that reentrant checkpointing has an
    # input that requires grad; only where something trains, so that a frozen vision tower runs no backward.
    input_grads_only_where_trained(model)
    log_trainable_parameters(model)

    # ---- data + collator --------------------------------------------------------------------------------------
    # Pads what is per token (input_ids, labels, attention masks, token types) and concatenates what is per image
    # (pixel values, grids, sizes). Every micro-batch holds each kind of visual input the data has (blank unlabelled
    # rows where missing), so every ZeRO-3 rank makes the same vision-tower calls (see the collator).
    collator = ConversationCollator(
        processor,
        guard_text_only_batches=data_args.guard_text_only_batches,
        media_kinds=media_kinds(train_dataset, eval_dataset),
        packing=data_args.packing,
    )
    if data_args.packing:  # rows of --max_length tokens, each of several samples (vlm_recipes/packing.py)
        train_dataset = PackedDataset(train_dataset, data_args.max_length)
        if training_args.process_index == 0:
            print(train_dataset.describe(), flush=True)

    # ---- trainer ------------------------------------------------------------------------------------------------
    trainer = RecipeTrainer(  # the HF Trainer; group_by_length takes the preflight's lengths
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[
            ResolvedDeepSpeedConfigCallback(),
            RunStatsCallback(),
            CheckpointCompleteCallback(),
            StopOnNonFiniteGradientCallback(),
        ],
        packed_position_ids=packed_position_ids,
    )

    # ---- train --------------------------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=resume_from)

    # ---- save ---------------------------------------------------------------------------------------------------
    # With stage3_gather_16bit_weights_on_model_save the full weights are gathered from all ranks and written
    # as safetensors (or just the adapter, for LoRA), next to the processor.
    if training_args.save_final_model:
        trainer.save_model(training_args.output_dir)
        trainer.save_state()
    finish_run(trainer)  # all ranks done writing, then a clean exit (see its docstring)


if __name__ == "__main__":
    main()
