r"""Fine-tune a LLaVA model (LLaVA-1.5 layout: vision tower, projector, language model) with the HF Trainer
under DeepSpeed ZeRO-3 with CPU offload.

Launch (from the repository root):

    accelerate launch recipes/llava.py    # under ds_configs/zero3_offload.json, named by the YAML
    accelerate launch --config_file accelerate_configs/zero3_offload.yaml recipes/llava.py
    accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 4 recipes/llava.py \
        --config recipes/configs/llava_lora.yaml --dataset_path data/train.json --image_root data/images
    make train MODEL=llava CONFIG=recipes/configs/llava_pretrain.yaml ARGS="--max_steps 100"

Configs: llava.yaml (LLaVA-1.5 fine-tune stage: projector + language model, vision tower frozen),
llava_lora.yaml (LoRA on the language model, projector trained), llava_pretrain.yaml (stage 1: projector
only), llava_demo.yaml (the tiny CPU demo). Any field can be overridden on the command line by its name.
Re-running the same command resumes from the last complete checkpoint in output_dir.

Tested: 2 CPU processes over gloo (tiny model, tests/test_llava_recipe.py; a tiny model around llava-1.5-7b-hf's own
processor files, launched plainly, learns to answer and stop: tests/test_real_checkpoints.py).
To fine-tune another LLaVA-architecture model, copy this file and its YAML: the lines marked MODEL-SPECIFIC
are the ones to change.
"""

from pathlib import Path

from peft import get_peft_model
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from vlm_recipes.collator import ConversationCollator
from vlm_recipes.config import ConfigError, parse_recipe_args
from vlm_recipes.data import ConversationDataset, media_kinds, read_records
from vlm_recipes.ds_config import check_deepspeed_config
from vlm_recipes.masking import image_tokens_at_cap
from vlm_recipes.memory import check_host_memory
from vlm_recipes.preflight import preflight
from vlm_recipes.run_stats import RunStatsCallback
from vlm_recipes.training import (
    CheckpointCompleteCallback,
    RecipeTrainer,
    ResolvedDeepSpeedConfigCallback,
    check_quantization,
    finish_run,
    input_grads_only_where_trained,
    log_trainable_parameters,
    lora_config,
    prepare_output_dir,
    quantized_loading,
    set_requires_grad,
    training_dtype,
)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llava.yaml"


def main():
    # ---- arguments ------------------------------------------------------------------------------------------
    # TrainingArguments come first: under ZeRO-3 they switch on partitioned model construction (zero.Init).
    model_args, data_args, training_args = parse_recipe_args(DEFAULT_CONFIG)
    resume_from = prepare_output_dir(training_args)
    # Contradictions between the DeepSpeed JSON and the arguments fail here, not at train().
    check_deepspeed_config(training_args, model_args.model_name_or_path, model_args.trust_remote_code)
    check_quantization(model_args, training_args)  # --load_in_4bit's needs, before anything loads

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
    if model_type != "llava":  # MODEL-SPECIFIC: the architecture this recipe trains
        raise ConfigError(
            f"{model_args.model_name_or_path} is a {model_type!r} checkpoint; recipes/llava.py trains 'llava' "
            "(LLaVA-1.5 layout) models. LLaVA-NeXT and OneVision are not supported yet (see README)."
        )
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    # An offload config needing more host RAM than the machine has (model states and the records) fails here; the
    # image tokens per sample are the processor's own, measured at its cap.
    check_host_memory(
        training_args, model_args, data_args, image_tokens=image_tokens_at_cap(processor),
        records=(train_records, eval_records),
    )  # fmt: skip
    # ---- preflight: every record becomes a sample once, before any weights load -------------------------------
    train_dataset = preflight(
        ConversationDataset(train_records, processor, data_args.max_length),
        data_args.dataset_path,
        data_args.skip_bad_records,
        training_args.dataloader_num_workers,
        unread=unread_train,
    )
    eval_dataset = (
        preflight(
            ConversationDataset(eval_records, processor, data_args.max_length),
            data_args.eval_dataset_path,
            data_args.skip_bad_records,
            training_args.dataloader_num_workers,
            unread=unread_eval,
        )
        if eval_records is not None
        else None
    )

    model = LlavaForConditionalGeneration.from_pretrained(  # MODEL-SPECIFIC: the model class
        model_args.model_name_or_path,
        dtype=training_dtype(training_args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        # --load_in_4bit: QLoRA's 4-bit language model. MODEL-SPECIFIC: the modules kept in 16 bits.
        **quantized_loading(model_args, training_args, ["vision_tower", "multi_modal_projector", "lm_head"]),
    )

    # MODEL-SPECIFIC: which modules are the vision tower, the projector and the language model.
    set_requires_grad(model.model.vision_tower, not model_args.freeze_vision_tower)
    set_requires_grad(model.model.multi_modal_projector, not model_args.freeze_projector)
    set_requires_grad(model.model.language_model, not model_args.freeze_language_model)
    set_requires_grad(model.lm_head, not model_args.freeze_language_model)

    if model_args.use_lora:
        # LoRA (or DoRA with --use_dora true) on the named linear layers of each module.
        adapters = lora_config(
            model_args,
            # MODEL-SPECIFIC: the module paths of the language model and the vision tower.
            {
                "model.language_model": model_args.lora_target_modules,
                "model.vision_tower": model_args.lora_vision_target_modules,
            },
            # The projector is new for every fine-tune, so it is trained in full and saved with the adapter.
            modules_to_save=[] if model_args.freeze_projector else ["multi_modal_projector"],
        )
        model = get_peft_model(model, adapters)
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
    )

    # ---- trainer ------------------------------------------------------------------------------------------------
    trainer = RecipeTrainer(  # the HF Trainer; group_by_length takes the preflight's lengths
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[ResolvedDeepSpeedConfigCallback(), RunStatsCallback(), CheckpointCompleteCallback()],
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
