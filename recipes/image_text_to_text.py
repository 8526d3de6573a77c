r"""Fine-tune any image-text-to-text model (AutoModelForImageTextToText) whose processor has a chat template, with
the HF Trainer under DeepSpeed ZeRO-3 with CPU offload: the same arguments, data formats, label masking, preflight
and saving as the family recipes.

Launch (from the repository root):

    accelerate launch recipes/image_text_to_text.py    # image_text_to_text.yaml: Gemma 3 4B, ZeRO-3 offload
    accelerate launch recipes/image_text_to_text.py --model_name_or_path OpenGVLab/InternVL3-1B-hf \
        --dataset_path data/train.json --image_root data
    make train MODEL=image-text-to-text ARGS="--model_name_or_path HuggingFaceTB/SmolVLM2-2.2B-Instruct"

Configs: image_text_to_text.yaml (google/gemma-3-4b-it: projector + language model, vision tower frozen). Any field
can be overridden on the command line by its name. Re-running the same command resumes from the last complete
checkpoint in output_dir.

The parts are found by the names transformers' image-text-to-text models use (PARTS below: the vision tower is
model.vision_tower, model.vision_model or model.visual; the projector model.multi_modal_projector or model.connector;
the language model model.language_model or model.text_model); a model that uses others is refused, naming its
top-level modules: copy this file and write its paths into the block. Processors that wrap each image in tokens
of their own (Gemma 3's <start_of_image> ... <end_of_image>, InternVL's <img> ... </img>, Idefics3's tile tags,
Pixtral's [IMG_BREAK] / [IMG_END]) are handled by the shared masking, which aligns the processor's tokens with the
template's. Not supported: models whose inputs carry per-token masks over images (Llama 3.2 Vision's cross-attention).

Tested: 2 CPU processes over gloo (tiny Gemma 3, InternVL, Idefics3 / SmolVLM and Mistral 3, each with its real
checkpoint's chat template: tests/test_image_text_to_text_recipe.py).
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
from transformers import AutoModelForImageTextToText, AutoProcessor

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "image_text_to_text.yaml"
# The config.json model_type values this recipe trains: none named, so any model AutoModelForImageTextToText loads.
MODEL_TYPES = ()
PARTS = ModelParts(  # module paths, as print(model) shows them: each the first of these the model has
    vision_tower=("model.vision_tower", "model.vision_model", "model.visual"),
    projector=("model.multi_modal_projector", "model.connector", "model.visual.merger"),
    language_model=("model.language_model", "model.text_model"),
)
# --packing true is refused for these: transformers masks their packed rows wrongly (Gemma 3's sliding-window
# layers look up its bidirectional image blocks by position, so samples see each other; tests/test_packing.py).
PACKING_REFUSED = ("gemma3",)
RECIPE_ARGUMENTS = ()  # this recipe's own argument dataclasses, parsed with the shared ones (qwen_vl.py: pixel caps)


def load_processor(model_args, *recipe_args):
    return AutoProcessor.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )


def fewer_media_tokens(tokens_at_cap: int) -> str:
    """The advice for a sample whose images do not fit --max_length."""
    return f"use fewer or smaller images per sample (an image is up to {tokens_at_cap:,} tokens)"


def packed_position_ids(model, batch):
    """--packing true: the positions of a packed row. This model's rotary positions are 1-D, so they are each
    sample's own 0..n-1, as the collator wrote them."""
    return batch["position_ids"]


def load_model(model_args, **loading):
    """The model, with the shared loading arguments (dtype, attention, QLoRA's quantization)."""
    return AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **loading)


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
