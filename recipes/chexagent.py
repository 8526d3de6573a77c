r"""Fine-tune a CheXagent-2-shaped chest X-ray model (SigLIP vision encoder, MLP projector, Phi language model, as a
transformers-native LLaVA-architecture model) with the HF Trainer under DeepSpeed ZeRO-3 with CPU offload.

CheXagent's two training stages are two configs of this recipe; stage 2 starts from stage 1's output_dir. Each YAML
names ds_configs/zero3_offload.json, so `accelerate launch recipes/chexagent.py --config ...` uses it too:

    accelerate launch --config_file accelerate_configs/zero3_offload.yaml recipes/chexagent.py \
        --config recipes/configs/chexagent_stage1.yaml --dataset_path data/cxr_reports.jsonl --image_root data
    accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 4 recipes/chexagent.py \
        --config recipes/configs/chexagent_stage2.yaml --dataset_path data/chexinstruct.jsonl --image_root data
    make train MODEL=chexagent CONFIG=recipes/configs/chexagent_lora.yaml ARGS="--dataset_path my.jsonl"

Configs: chexagent_stage1.yaml (assemble the model from a CXR SigLIP encoder and a Phi LM, train the new projector
only), chexagent_stage2.yaml (instruction tuning: projector + language model, vision encoder optionally),
chexagent_lora.yaml (LoRA on the language model, projector trained), chexagent_stage{1,2}_demo.yaml (the tiny
CPU demo). With no --config the recipe runs stage 1. Any field can be overridden on the command line by its name.
Re-running the same command resumes from the last complete checkpoint in output_dir.

The model comes from one checkpoint (--model_name_or_path: a LLaVA-architecture checkpoint, such as stage 1's
output) or is assembled from two (--vision_model_name_or_path and --text_model_name_or_path): a new projector,
the "<image>" token and a chat template are added, and output_dir holds a normal from_pretrained checkpoint.
Data: CheXinstruct-style records, LLaVA conversations or the chat format (docs/chexagent.md).

Tested: 2 CPU processes over gloo (tiny SigLIP + tiny Phi, tests/test_chexagent_recipe.py).
A fine-tuned model is a research artefact, not a clinical device (docs/chexagent.md).
"""

from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.utils import logging

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

logger = logging.get_logger("vlm_recipes.chexagent")

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "chexagent_stage1.yaml"
VISION_MODEL_TYPES = ("siglip", "siglip_vision_model")  # MODEL-SPECIFIC: a full SigLIP or its vision half
TEXT_MODEL_TYPES = ("phi",)  # MODEL-SPECIFIC: Phi-2 and RadPhi-2
# MODEL-SPECIFIC: where the assembled (LLaVA-architecture) model keeps its parts, as print(model) shows them;
# freezing, LoRA targets, the projector saved with an adapter, QLoRA's 16-bit modules and the host-RAM check read it.
PARTS = ModelParts(
    vision_tower="model.vision_tower",
    projector=("model.multi_modal_projector",),
    language_model="model.language_model",
)
IMAGE_TOKEN = "<image>"

# MODEL-SPECIFIC: the prompt format of an assembled model. CheXagent-2's own format lives in remote code for
# transformers 4.40 (a Qwen-VL-style "Picture N: <img>path</img>" query in its own template), so this one keeps
# what matters from it in words the LM knows: plain "USER:" / "ASSISTANT:" turns (as CheXagent-8b's prompt has),
# each image of a study introduced as "Picture N:" (so "the second view" means something in multi-view studies),
# and the LM's own end-of-text token after every answer, so the model learns to stop. The new tokens are
# "<image>" (its embeddings are replaced by image features) and, for Phi-2, "<pad>". Checkpoints loaded with
# --model_name_or_path keep their own template.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "USER: {% for p in parts -%}"
    "{%- if p['type'] == 'image' -%}{%- set image_count.value = image_count.value + 1 -%}"
    "Picture {{ image_count.value }}: <image>{{ '\\n' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '\\n' }}"
    "{%- else -%}"
    "ASSISTANT: {% for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


@dataclass
class AssemblyArguments:  # MODEL-SPECIFIC: CheXagent-2's encoder and LM were published as separate checkpoints
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "To assemble the model: SigLIP checkpoint (full or vision-only) for the vision encoder."
        },
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "To assemble the model: Phi causal-LM checkpoint for the language model."},
    )


def assembles(model_args, assembly_args) -> bool:
    """True to assemble the model from a vision and a language checkpoint, False to load one checkpoint."""
    parts = [assembly_args.vision_model_name_or_path, assembly_args.text_model_name_or_path]
    if any(parts) and not all(parts):
        raise ConfigError(
            "assembling a model needs both --vision_model_name_or_path and --text_model_name_or_path"
        )
    if all(parts) and model_args.model_name_or_path:
        raise ConfigError(
            "give either --model_name_or_path (one checkpoint) or --vision_model_name_or_path with "
            "--text_model_name_or_path (assemble one), not both; to train a checkpoint with a config that "
            "assembles, add --vision_model_name_or_path '' --text_model_name_or_path ''"
        )
    if not all(parts) and not model_args.model_name_or_path:
        raise ConfigError(
            "no model: pass --model_name_or_path, or --vision_model_name_or_path and --text_model_name_or_path"
        )
    if all(parts) and model_args.use_lora:
        raise ConfigError(
            "LoRA saves an adapter for a base checkpoint, and an assembled model has none until this run ends: "
            "run stage 1 (chexagent_stage1.yaml) first, then LoRA with --model_name_or_path <its output_dir>"
        )
    return all(parts)


def check_part_types(vision_path: str, text_path: str, trust_remote_code: bool) -> None:
    """Refuse unsupported encoders and LMs from their configs, before any weights are read."""
    vision_type = AutoConfig.from_pretrained(vision_path, trust_remote_code=trust_remote_code).model_type
    text_type = AutoConfig.from_pretrained(text_path, trust_remote_code=trust_remote_code).model_type
    if vision_type not in VISION_MODEL_TYPES or text_type not in TEXT_MODEL_TYPES:
        raise ConfigError(
            f"recipes/chexagent.py assembles a {' or '.join(VISION_MODEL_TYPES)} vision encoder with a "
            f"{' or '.join(TEXT_MODEL_TYPES)} language model; got {vision_type!r} ({vision_path}) and "
            f"{text_type!r} ({text_path})"
        )


def build_processor(vision_path: str, text_path: str, trust_remote_code: bool) -> LlavaProcessor:
    """The encoder's image processor, the LM's tokenizer plus the new tokens, and CHAT_TEMPLATE."""
    tokenizer = AutoTokenizer.from_pretrained(text_path, trust_remote_code=trust_remote_code)
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # Phi-2 has none. Not EOS: the embedding row of the LM's pad_token_id never trains, and EOS must.
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = SiglipImageProcessor.from_pretrained(vision_path)  # MODEL-SPECIFIC
    vision_config = SiglipVisionConfig.from_pretrained(vision_path)
    size = image_processor.size
    if (size["height"], size["width"]) != (vision_config.image_size, vision_config.image_size):
        raise ConfigError(
            f"{vision_path}: its image processor resizes to {size['height']}x{size['width']} but the encoder was "
            f"trained at {vision_config.image_size}x{vision_config.image_size}; fix its preprocessor_config.json"
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,  # SigLIP has no class token: one image token per patch
        chat_template=CHAT_TEMPLATE,
    )


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every parameter of `target` from the parameter of the same name in `source`.

    Under ZeRO-3 both models are partitioned: each process holds a slice of every tensor. A tensor is gathered
    whole for its copy, and with modifier_rank=0 what rank 0 wrote is partitioned back to all processes, so only
    one tensor is ever whole, whatever the model's size. Without ZeRO-3 the gathers do nothing. Rows the source
    lacks (tokens added to the vocabulary) get the mean of its rows.
    """
    sources = dict(source.named_parameters())
    for name, parameter in target.named_parameters():
        with (
            deepspeed.zero.GatheredParameters([sources[name]]),
            deepspeed.zero.GatheredParameters([parameter], modifier_rank=0),
        ):
            value = sources[name].data
            new_rows = parameter.shape[0] - value.shape[0]
            if new_rows > 0:
                value = torch.cat([value, value.mean(dim=0, keepdim=True).expand(new_rows, -1)])
            parameter.data.copy_(value)


def assembled_config(vision_path: str, text_path: str, processor, trust_remote_code: bool) -> LlavaConfig:
    """The config of the LLaVA-architecture model that stage 1 assembles from the two parts."""
    # LLaVA reads the encoder's hidden states, so SigLIP's pooling head is left out. Set on the config, not passed
    # as a keyword: transformers 5.17's SiglipVisionConfig has no such field and hands the keyword to the model.
    vision_config = SiglipVisionConfig.from_pretrained(vision_path)
    vision_config.vision_use_head = False
    text_config = AutoConfig.from_pretrained(text_path, trust_remote_code=trust_remote_code)
    text_config.vocab_size = max(text_config.vocab_size, len(processor.tokenizer))  # room for the new tokens
    text_config.pad_token_id = processor.tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=processor.image_token_id,
        vision_feature_layer=-1,  # MODEL-SPECIFIC: SigLIP's last layer, every patch ("full": no class token)
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    return config


def assemble_model(
    config: LlavaConfig, vision_path: str, text_path: str, processor, model_args, training_args
):
    """A LLaVA-architecture model from a SigLIP encoder and a Phi LM, with a new projector."""
    dtype = training_dtype(training_args)
    # Built from the config after TrainingArguments exist: under ZeRO-3, zero.Init partitions it as it is created.
    model = AutoModelForImageTextToText.from_config(
        config, dtype=dtype, attn_implementation=loadable_attention(model_args.attn_implementation)
    )
    # The parts are loaded one at a time (partitioned too) and copied in, then dropped.
    vision = SiglipVisionModel.from_pretrained(vision_path, config=config.vision_config, dtype=dtype)
    copy_weights(vision, model.model.vision_tower)
    del vision
    language_model = AutoModelForCausalLM.from_pretrained(
        text_path, dtype=dtype, trust_remote_code=model_args.trust_remote_code
    )
    copy_weights(language_model.model, model.model.language_model)  # MODEL-SPECIFIC: the LM's module names
    copy_weights(language_model.lm_head, model.lm_head)
    if language_model.lm_head.bias is not None:
        with deepspeed.zero.GatheredParameters([language_model.lm_head.bias]):
            norm = language_model.lm_head.bias.float().norm().item()
        # LLaVA's output layer has no bias; Phi's has. The logits lose that per-token offset; stage 2 trains the
        # language model and can absorb it, stage 1 (frozen LM) cannot.
        logger.warning(
            f"dropping the language model's output bias (norm {norm:.3g}): LLaVA's lm_head has none"
        )
    del language_model
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


def main():
    # ---- arguments ------------------------------------------------------------------------------------------
    # TrainingArguments come first: under ZeRO-3 they switch on partitioned model construction (zero.Init).
    model_args, data_args, training_args, assembly_args = parse_recipe_args(
        DEFAULT_CONFIG, extra_classes=(AssemblyArguments,)
    )
    assemble = assembles(model_args, assembly_args)
    resume_from = prepare_output_dir(training_args)
    # Contradictions between the DeepSpeed JSON and the arguments fail here, not at train().
    check_deepspeed_config(
        training_args,
        assembly_args.text_model_name_or_path if assemble else model_args.model_name_or_path,
        model_args.trust_remote_code,
    )
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
    vision_path, text_path = assembly_args.vision_model_name_or_path, assembly_args.text_model_name_or_path
    if assemble:
        check_part_types(vision_path, text_path, model_args.trust_remote_code)
        processor = build_processor(vision_path, text_path, model_args.trust_remote_code)
        config = assembled_config(vision_path, text_path, processor, model_args.trust_remote_code)
    else:
        model_type = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        ).model_type
        if model_type != "llava":  # MODEL-SPECIFIC: the architecture this recipe trains
            raise ConfigError(
                f"{model_args.model_name_or_path} is a {model_type!r} checkpoint; recipes/chexagent.py trains "
                "'llava' (CheXagent-2-shaped) checkpoints, such as its stage 1's output. The published CheXagent "
                "checkpoints are remote code for transformers 4.40: assemble one from the published encoder and "
                "language model instead (chexagent_stage1.yaml, docs/chexagent.md)."
            )
        processor = AutoProcessor.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        )
    # An offload config that needs more host RAM than the machine has fails here, not by the kernel's hand later;
    # the image tokens per sample are the processor's own, measured at its cap.
    check_host_memory(
        training_args, model_args, data_args, image_tokens=image_tokens_at_cap(processor),
        model_config=(f"{vision_path} + {text_path}", config) if assemble else None,
        records=(train_records, eval_records), parts=PARTS,
    )  # fmt: skip
    # ---- preflight: every record becomes a sample once, before any weights load -------------------------------
    train_dataset = preflight(
        ConversationDataset(train_records, processor, data_args.max_length),
        data_args.dataset_path,
        data_args.skip_bad_records,
        training_args.dataloader_num_workers,
        unread=unread_train,
        batch_size=training_args.per_device_train_batch_size,
    )
    eval_dataset = (
        preflight(
            ConversationDataset(eval_records, processor, data_args.max_length),
            data_args.eval_dataset_path,
            data_args.skip_bad_records,
            training_args.dataloader_num_workers,
            unread=unread_eval,
            batch_size=training_args.per_device_eval_batch_size,
        )
        if eval_records is not None
        else None
    )

    # The weights come last, once everything that can fail cheaply (arguments, data, configs) has been checked.
    if assemble:
        model = assemble_model(config, vision_path, text_path, processor, model_args, training_args)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(  # MODEL-SPECIFIC: the model class
            model_args.model_name_or_path,
            dtype=training_dtype(training_args),
            attn_implementation=loadable_attention(model_args.attn_implementation),
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
    # Every micro-batch holds each kind of visual input the data has (blank unlabelled rows where missing), so every
    # ZeRO-3 rank makes the same vision-tower calls (see the collator).
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
    )

    # ---- train --------------------------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=resume_from)

    # ---- save ---------------------------------------------------------------------------------------------------
    # With stage3_gather_16bit_weights_on_model_save the full weights are gathered from all ranks and written
    # as safetensors (or just the adapter, for LoRA), next to the processor: an assembled model leaves stage 1
    # as a normal checkpoint that stage 2 loads with --model_name_or_path.
    if training_args.save_final_model:
        trainer.save_model(training_args.output_dir)
        trainer.save_state()
    finish_run(trainer)  # all ranks done writing, then a clean exit (see its docstring)


if __name__ == "__main__":
    main()
