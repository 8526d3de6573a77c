"""Training plumbing every recipe shares: output folders, complete checkpoints and resuming, freezing, the resolved
DeepSpeed config, and saving a model that loads with `from_pretrained`."""

import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging

from vlm_recipes.config import ConfigError
from vlm_recipes.ds_config import auto_keys, describe_resolution, ds_config_in_use, text_hidden_size

logger = logging.get_logger("vlm_recipes")

# Weights, or the trainer_state.json the recipe writes at the top of output_dir only when training ends.
FINISHED_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "trainer_state.json",
)
RESOLVED_DS_CONFIG_NAME = "ds_config_resolved.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written into a checkpoint-* folder by rank 0 once every rank has finished writing its part. The Trainer's own last
# file, trainer_state.json, is rank 0's: the other ranks may still be writing their DeepSpeed shards and RNG states
# when it appears, so a run killed then leaves a folder that has it and still cannot be resumed from.
CHECKPOINT_COMPLETE = "checkpoint_complete.json"


def why_incomplete(path: Path) -> str | None:
    """None for a checkpoint marked complete whose listed files are all still there; else what is missing."""
    try:
        marker = json.loads((path / CHECKPOINT_COMPLETE).read_text())
    except (OSError, ValueError):
        return f"has no {CHECKPOINT_COMPLETE}"
    gone = [name for name in marker.get("files", []) if not (path / name).is_file()]
    return f"has lost {len(gone)} file(s) its {CHECKPOINT_COMPLETE} lists, e.g. {gone[0]}" if gone else None


def is_complete_checkpoint(path: Path) -> bool:
    """Marked complete, and every file the marker lists still there (none deleted or moved since)."""
    return why_incomplete(path) is None


class CheckpointCompleteCallback(TrainerCallback):
    """Marks each checkpoint complete (CHECKPOINT_COMPLETE, listing its files) once every rank has written it: the
    Trainer calls on_save on every rank after its own saving, so one barrier there waits for the slowest rank."""

    def on_save(self, args, state, control, **kwargs):
        from accelerate.state import PartialState

        PartialState().wait_for_everyone()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        marker = {"global_step": state.global_step, "world_size": args.world_size, "files": files}
        # written beside it, then renamed into place: a kill never leaves half a marker
        partial = folder / f"{CHECKPOINT_COMPLETE}.partial"
        partial.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(partial, folder / CHECKPOINT_COMPLETE)


class NonFiniteGradientError(RuntimeError):
    pass


class StopOnNonFiniteGradientCallback(TrainerCallback):
    """Stops a bf16 or fp32 run at the first logged gradient norm that is NaN or infinite (as Megatron-LM does by
    default), before that step's checkpoint is written (the Trainer logs, then saves), so it cannot rotate a good one
    away under save_total_limit.

    Without it such a run goes on to the end: without DeepSpeed on NaN weights, with its log reading `loss: 0` (the
    Trainer's logging_nan_inf_filter leaves NaN losses out of the logged mean); under DeepSpeed, whose ZeRO
    optimizers skip a step whose gradients overflow, on steps that may all be skipped. The norm is the global one,
    the same on every rank, so every rank stops at the same step. fp16 is left alone: its loss scaler skips
    overflowing steps on purpose, and their norm is logged as inf. Checked at each log (every logging_steps): the
    norm the Trainer logs is its last step's. The message names the weights the step made non-finite, which says
    where the NaN began (non_finite_weights).
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        grad_norm = (logs or {}).get("grad_norm")
        if grad_norm is None or args.fp16 or math.isfinite(float(grad_norm)):
            return
        last = last_complete_checkpoint(Path(args.output_dir))
        raise NonFiniteGradientError(
            f"step {state.global_step}: the gradient norm is {grad_norm}. Without DeepSpeed the update from it puts "
            "NaN in the weights; DeepSpeed skips such a step, and a run where that repeats trains nothing. "
            + (non_finite_weights(model) if model is not None else "")
            + "Training stopped before saving anything more. "
            + (
                f"{last} is the last complete checkpoint, saved before it. "
                if last
                else "No checkpoint was saved. "
            )
            + "What usually causes it: a learning rate too high for the model (try a tenth), a record whose "
            "labels or images are broken (run scripts/validate_data.py on the dataset), or a kernel path to rule "
            "out: run the same command with --torch_compile false, with --packing false, or in fp32 on a few "
            "steps, and compare the first steps' grad_norm."
        )


def non_finite_weights(model) -> str:
    """Which weights are NaN or infinite now, named in the model's own (forward) order. Backward runs from the loss
    down, so a NaN that starts in some layer's backward reaches that layer's weights and every one before it (the
    vision tower, the embeddings), not the layers after it: the last one named is where it began. Weights that ZeRO-3
    partitions are empty here and not checked."""
    checked, bad = 0, []
    for name, parameter in model.named_parameters():
        if parameter.numel() and parameter.is_floating_point():
            checked += 1
            if not torch.isfinite(parameter.detach()).all():
                bad.append(name)
    if not checked:
        return ""
    if not bad:
        return f"None of the {checked:,} weight tensors on this rank is NaN or infinite (yet). "
    return (
        f"{len(bad):,} of {checked:,} weight tensors are now NaN or infinite, from {bad[0]} to {bad[-1]} in the "
        f"model's order; the NaN began at or just after {bad[-1]} (backward reaches only the weights before the "
        "layer it starts in). "
    )


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    if not output_dir.is_dir():
        return None
    checkpoints = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    complete = [p for p in checkpoints if is_complete_checkpoint(p)]
    for skipped in sorted(set(checkpoints) - set(complete)):
        logger.warning(
            f"ignoring {skipped}: its writing did not finish on every rank, or it was changed since "
            f"(it {why_incomplete(skipped)}); "
            f"--resume_from_checkpoint {skipped} resumes from it anyway"
        )
    return max(complete, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)), default=None)


def prepare_output_dir(training_args) -> str | None:
    """The checkpoint to resume from, if any. Refuses to train over a finished model unless asked to.

    Re-running the same command after a crash resumes from the last complete checkpoint in output_dir.
    """
    output_dir = Path(training_args.output_dir)
    finished = [name for name in FINISHED_MODEL_FILES if (output_dir / name).is_file()]
    if finished and not training_args.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {output_dir} already holds a finished model ({finished[0]}). Choose another "
            "--output_dir, or pass --overwrite_output_dir true to train again and replace it."
        )
    if training_args.resume_from_checkpoint:
        asked = Path(training_args.resume_from_checkpoint)
        if not (asked / "trainer_state.json").is_file():
            raise ConfigError(
                f"--resume_from_checkpoint {asked} is not a complete checkpoint (no trainer_state.json); pick "
                "another checkpoint-* folder"
            )
        if reason := why_incomplete(asked):  # another program's checkpoint, or one cut off: the user's call
            logger.warning(
                f"{asked} {reason} (written by another program, cut off before every rank had written its "
                "part, or changed since); resuming from it as asked"
            )
        return training_args.resume_from_checkpoint
    if training_args.overwrite_output_dir:
        return None
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is not None:
        logger.warning(f"resuming from {checkpoint} (pass --overwrite_output_dir true to start over)")
    return str(checkpoint) if checkpoint else None


def set_requires_grad(module: torch.nn.Module, requires_grad: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(requires_grad)


def is_checkpointed_layer(module: torch.nn.Module) -> bool:
    """A layer gradient checkpointing wraps: transformers' GradientCheckpointingLayer (decoder and vision blocks), or,
    in older-style code, a container with its own `gradient_checkpointing` switch."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer) or (
        hasattr(module, "gradient_checkpointing") and not isinstance(module, PreTrainedModel)
    )


def trains_inside_checkpointed_layers(module: torch.nn.Module) -> bool:
    return any(
        parameter.requires_grad
        for layer in module.modules()
        if is_checkpointed_layer(layer)
        for parameter in layer.parameters()
    )


def input_grads_only_where_trained(model: torch.nn.Module) -> None:
    """Make the model's `enable_input_require_grads` (called by the Trainer when it turns gradient checkpointing on,
    and by PEFT) hook only the input embeddings of sub-models with trainable parameters inside checkpointed layers.

    Reentrant checkpointing computes a checkpointed layer's gradients only if one of its inputs requires grad, so
    transformers hooks the input embeddings of every sub-model (the language model's token embeddings, and the
    vision tower's patch embedding too). A frozen vision tower then runs backward through every one of its blocks on
    every step, for gradients nobody uses: compute, memory and, under ZeRO-3, parameter gathers. The hook is needed
    only where a checkpointed layer (a decoder or vision block) has something to train, LoRA included. A sub-model
    whose blocks are all frozen needs none: what trains after them (Qwen's merger, inside its vision tower) gets its
    gradients from its own parameters; if something before a frozen sub-model trains (a projector before a frozen
    language model), the sub-model's input requires grad already and backward passes through it as it must; if
    nothing does (a vision tower reads only pixels), no backward is needed, and its checkpointed blocks run once under
    no_grad (torch warns once that none of their inputs requires grad). Call it after the freezing and LoRA set-up,
    before the Trainer is built."""
    from transformers import PreTrainedModel

    def make_output_require_grad(module, inputs, output):
        output.requires_grad_(True)

    def enable_input_require_grads(self):
        hooks, seen = [], set()
        for module in self.modules():
            if not (isinstance(module, PreTrainedModel) and trains_inside_checkpointed_layers(module)):
                continue
            try:
                embeddings = module.get_input_embeddings()
            except (NotImplementedError, AttributeError):
                continue
            if (
                embeddings is None
                or id(embeddings) in seen
                or not hasattr(embeddings, "register_forward_hook")
            ):
                continue
            seen.add(id(embeddings))
            hooks.append(embeddings.register_forward_hook(make_output_require_grad))
        self._require_grads_hooks = hooks
        if hooks:
            self._require_grads_hook = hooks[
                0
            ]  # the name transformers' disable_input_require_grads reads too

    hooked = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if getattr(module, "_require_grads_hooks", None):  # hooked already (PEFT does so at wrapping)
                module.disable_input_require_grads()
                hooked.append(module)
            module.enable_input_require_grads = enable_input_require_grads.__get__(module)
    for module in hooked:
        module.enable_input_require_grads()


def parameter_count(parameter: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a parameter's local tensor is an empty shard; ds_numel is its full size.
    return getattr(parameter, "ds_numel", parameter.numel())


def log_trainable_parameters(model: torch.nn.Module) -> str:
    total = trainable = 0
    for parameter in model.parameters():
        count = parameter_count(parameter)
        total += count
        trainable += count if parameter.requires_grad else 0
    line = f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    quantized = sum(type(module).__name__ == "Linear4bit" for module in model.modules())
    if quantized:  # --load_in_4bit: the base layers bitsandbytes holds in 4 bits
        line += f"; {quantized} linear layers hold 4-bit weights (QLoRA)"
    logger.warning(line)
    return line


def quantized_loading(model_args, training_args, keep_in_16_bit: list[str]) -> dict:
    """from_pretrained's arguments for --load_in_4bit true (QLoRA; none otherwise): the language model's linear
    layers in NF4 with double quantization, computing in the training dtype; the modules at the full paths in
    `keep_in_16_bit` (vision tower, projector, output head: ModelParts.kept_in_16_bit) stay as they are, so that the projector trains in full and the adapter
    merges into the 16-bit base. Each process quantizes the whole model onto its own GPU."""
    if not getattr(model_args, "load_in_4bit", False):
        return {}
    from transformers import BitsAndBytesConfig

    dtype = training_dtype(training_args)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype, llm_int8_skip_modules=keep_in_16_bit,
    )  # fmt: skip
    return {"quantization_config": config, "device_map": {"": training_args.local_process_index}}


def check_quantization(model_args, training_args) -> None:
    """What --load_in_4bit true needs, every missing piece in one error, before anything loads."""
    if not getattr(model_args, "load_in_4bit", False):
        return
    import importlib.util

    problems = []
    if not model_args.use_lora:
        problems.append("4-bit weights do not train: pass --use_lora true (QLoRA trains adapters on them)")
    if training_args.use_cpu or not torch.cuda.is_available():
        problems.append("bitsandbytes' 4-bit weights need a CUDA GPU; on this machine train LoRA without it")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed: pip install bitsandbytes")
    ds_path = ds_config_in_use(training_args)
    if ds_path is not None:
        # Measured on one H200 (DeepSpeed 0.19.8, bitsandbytes 0.50.2, the tiny LLaVA): under zero3.json and under
        # zero2_offload.json the run failed inside DeepSpeed (AttributeError: 'NoneType' object has no attribute
        # 'record_stream' / 'numel'); without DeepSpeed it trained.
        problems.append(
            f"QLoRA runs without DeepSpeed in these recipes ({ds_path} is in use): under ZeRO-3 and ZeRO-2 the 4-bit "
            "run failed inside DeepSpeed 0.19.8. Launch with accelerate_configs/single_gpu.yaml (or "
            "multi_gpu.yaml) and --deepspeed none: the 4-bit weights are small enough to need no sharding"
        )
    if problems:
        raise ConfigError("--load_in_4bit true (QLoRA) cannot run as configured:\n  " + "\n  ".join(problems))


def lora_config(model_args, linear_names_by_module: dict[str, list[str]], modules_to_save: list[str]):
    """The PEFT config of --use_lora (and --use_dora): adapters on the named linear layers inside each listed
    module (by path prefix); `modules_to_save` are trained in full and saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        use_dora=model_args.use_dora,
        target_modules=lora_target_pattern(linear_names_by_module),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )


def lora_target_pattern(linear_names_by_module: dict[str, list[str]]) -> str:
    """A PEFT `target_modules` regex: the named linear layers inside each listed module (by path prefix)."""
    return "|".join(
        rf"{re.escape(prefix)}\..*\.({'|'.join(names)})"
        for prefix, names in linear_names_by_module.items()
        if names
    )


def training_dtype(training_args) -> torch.dtype:
    """The dtype the model is loaded in: that of the precision, except fp16 without DeepSpeed. DeepSpeed's fp16
    keeps fp32 master weights and scales the loss itself; without it the Trainer's fp16 is torch's autocast,
    whose GradScaler needs fp32 weights ("Attempting to unscale FP16 gradients" otherwise)."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        under_deepspeed = getattr(training_args, "deepspeed_plugin", None) is not None
        return torch.float16 if under_deepspeed else torch.float32
    return torch.float32


class ResolvedDeepSpeedConfigCallback(TrainerCallback):
    """Print the DeepSpeed config exactly as DeepSpeed received it (every "auto" replaced, each with where
    its value came from) and write it to output_dir/ds_config_resolved.json."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState().deepspeed_plugin
        if plugin is None or not state.is_world_process_zero:
            return
        config = plugin.deepspeed_config
        text = json.dumps(config, indent=2, sort_keys=True)
        unresolved = auto_keys(config)
        if unresolved:
            logger.warning(f"DeepSpeed config still has 'auto' values: {unresolved}")
        os.makedirs(args.output_dir, exist_ok=True)
        Path(args.output_dir, RESOLVED_DS_CONFIG_NAME).write_text(text + "\n")
        print(
            f"DeepSpeed config as resolved for this run (world size {args.world_size}):\n{text}", flush=True
        )
        original_path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # set by accelerate launch
        if original_path and Path(original_path).is_file():
            original = json.loads(Path(original_path).read_text())
            hidden_size = text_hidden_size(model.config) if model is not None else None
            print(f'Where each "auto" of {original_path} came from:', flush=True)
            print(describe_resolution(original, config, hidden_size), flush=True)


def finish_run(trainer) -> None:
    """End the process once every rank is done writing, and skip the interpreter's teardown.

    A rank that leaves early can be torn down by the launcher while rank 0 is still writing the model, and
    at interpreter exit a library thread sometimes aborts the process ("terminate called without an active
    exception", seen on CPU over gloo about once in ten 2-process runs) after everything was saved, which
    turns a finished run into a failed launch. So: wait for all ranks, close the trackers and the process
    group, flush, and exit 0 without running C++ static destructors.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """LengthGroupedSampler whose shuffle is drawn from (seed, epoch) alone: every process draws the same order, of
    which accelerate hands each process its share of the batches, whatever each process's global random state went
    through before (each checked its own share of the records in the preflight), and a resumed run draws its
    epoch's order again. The Trainer calls set_epoch at every epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def load_saved_weights(model: PreTrainedModel, checkpoint: Path) -> None:
    """Load the weights `save_pretrained` wrote to `checkpoint` into `model`, every one (strict), through
    from_pretrained's own renaming: a copy of the model is read on the CPU, in the saved dtype, and copied in (the
    model's load-time hooks apply, e.g. --pad_mlp_widths' padding). Host RAM: one copy of the weights, briefly."""
    logger.warning(f"loading the model's weights from {checkpoint}")
    saved = type(model).from_pretrained(checkpoint, device_map="cpu")
    try:
        model.load_state_dict(saved.state_dict(), strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"{checkpoint} does not hold this model's weights ({error}); resume from another checkpoint "
            "(--resume_from_checkpoint), or start over with --overwrite_output_dir true"
        ) from None
    finally:
        del saved


class RecipeTrainer(Trainer):
    """The HF Trainer, with `--train_sampling_strategy group_by_length` taking each sample's length from the
    preflight (ConversationDataset.lengths, measured when every record was tokenized before training) instead of
    the Trainer tokenizing every record again in the main process to find it (hours at 665k records).

    It also counts each training micro-batch's sample tokens and its slots (rows x length), for the padding figures
    of run_stats, and for a packed batch (--packing true) hands the model the positions the recipe's
    `packed_position_ids(model, batch)` computes, where the model's rotary positions are not 1-D (Qwen-VL)."""

    def __init__(self, *args, packed_position_ids=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_position_ids = packed_position_ids
        self.token_counts = {"real": 0, "slots": 0}
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "token_counts"):  # RunStatsCallback reports them
                callback.token_counts = self.token_counts

    def model_inputs(self, model, inputs: dict) -> dict:
        from vlm_recipes.packing import REAL_TOKENS, model_inputs

        real = inputs.get(REAL_TOKENS)
        if model.training:
            mask = inputs.get("attention_mask")
            self.token_counts["real"] += int(
                real if real is not None else mask.sum() if mask is not None else 0
            )
            self.token_counts["slots"] += inputs["input_ids"].numel()
        if real is None:
            return inputs
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # a PEFT model's own
        return model_inputs(inputs, base, self.packed_position_ids)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resuming a full model without DeepSpeed or FSDP (single_gpu, multi_gpu): its weights loaded as
        from_pretrained loads them. transformers 5 saves a model whose layout it converts on loading (LLaVA,
        Qwen-VL) under the checkpoint format's names, and the Trainer's own resume loads them back with
        load_state_dict(strict=False) under the model's: for Qwen2.5-VL no key matched and the run went on from its
        initial weights with the checkpoint's optimizer state, after a warning (huggingface/transformers#43701).
        DeepSpeed and FSDP load their own shards, a PEFT model its adapter: the Trainer's path."""
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_saved_weights(model, Path(resume_from_checkpoint))

    def create_optimizer(self, model=None):
        """--compensated_bf16_updates true: vlm_recipes.optim.CompensatedAdamW, with the Trainer's weight-decay
        groups and AdamW settings; otherwise the Trainer's own."""
        if not getattr(self.args, "compensated_bf16_updates", False) or self.optimizer is not None:
            return super().create_optimizer(model)
        from vlm_recipes.optim import CompensatedAdamW

        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for name, p in trained if name in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for name, p in trained if name not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = CompensatedAdamW(
            [group for group in groups if group["params"]], lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
        )  # fmt: skip
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(
            model, self.model_inputs(model, inputs), return_outputs, num_items_in_batch
        )

    def sampler_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_train_sampler(train_dataset)
        # Groups of similar length the size of a global batch (every process's micro-batches of one optimizer
        # step): the order is then the same for any number of processes, as the default shuffle's is.
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochSeededLengthGroupedSampler(batch, lengths, self.sampler_seed())

    def _get_eval_sampler(self, eval_dataset):
        lengths = getattr(eval_dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_eval_sampler(eval_dataset)
        batch = self.args.eval_batch_size * self.args.world_size
        return EpochSeededLengthGroupedSampler(batch, lengths, self.sampler_seed())
