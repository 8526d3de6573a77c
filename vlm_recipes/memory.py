"""How much GPU and host memory a fine-tune needs under each shipped launcher config, before running it.

    shape = model_shape(*load_model_config("qwen2.5-vl-7b"))          # parameter counts, from the config only
    setup = TrainingSetup.from_mode("lora", lora_r=64, micro_batch=2, seq_len=4096)
    estimates = estimate_all(shape, setup, Hardware(gpus_per_node=1, gpu_memory_gib=80, host_ram_gib=128))
    choice = recommend(estimates, Hardware(...))                        # the fastest config that fits, and why

`scripts/plan_memory.py` prints these as a table. The recipes do not import this module: their host-RAM check
(vlm_recipes/host_memory.py) loads it only when the run's DeepSpeed config offloads to the CPU, so that an offload
config that needs more host RAM than the machine has stops with the fix instead of being killed by the kernel
later.

What is counted, per GPU and per node's host RAM:
- model states: for the DeepSpeed configs, DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) on the trainable
  parameters, plus the frozen ones, which hold only their 16-bit weights (no gradients, no optimizer state);
  for the configs without DeepSpeed, the bytes the recipes' dtypes imply;
- DeepSpeed's working buffers, sized from the resolved JSON ("auto" bucket sizes come from the hidden size);
- activations: from micro-batch, sequence length (image tokens included), the image patches the vision tower
  sees, gradient checkpointing, and the logits (large for Qwen's 152k vocabulary);
- fixed overheads: CUDA context and allocator slack on the GPU; per process on the host, the libraries and
  data-loader workers.
Each constant below says where its value comes from. docs/configs.md ("Memory planner") lists the
measured-vs-estimated comparisons and the limits.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlm_recipes.ds_config import fp16_problem, offloads
from vlm_recipes.host_memory import meminfo_available_bytes

GIB = 1024**3
REPO = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO / "ds_configs"

# ---- constants: where each value comes from ----------------------------------------------------------------------

# Fastest first: less communication and no PCIe traffic to the host first. Measured on one H100 for the offload
# configs (docs/benchmarks.md, Qwen2.5-VL-3B, 8 x 512 tokens): zero2_offload_gpu_accum 6,025 tokens/s at 16
# accumulation steps, zero2_offload 2,875 and zero3_offload_optimizer 1,837 at 4, the seed's zero3_offload 219.
SPEED_ORDER = (
    "single_gpu",
    "multi_gpu",
    "zero2",
    "zero3",
    "fsdp2",
    "zero2_offload_gpu_accum",
    "zero2_offload",
    "zero3_offload_optimizer",
    "zero3_offload",
)
DEEPSPEED_CONFIGS = (
    "zero2",
    "zero2_offload_gpu_accum",
    "zero2_offload",
    "zero3",
    "zero3_offload",
    "zero3_offload_optimizer",
)

BYTES_16BIT = 2  # the recipes train in bf16 (fp16 on older GPUs): every GPU run keeps 16-bit weights
BYTES_FP32 = 4

# Host RSS of one training process before it holds any model state: Python, torch, transformers, accelerate,
# DeepSpeed and its CPU Adam op. Measured here: 0.95-0.96 GiB peak RSS per rank for a 2-process ZeRO-3 offload
# run of the tiny LLaVA in bf16, whose model states are a few MB (0.92 in fp32).
HOST_BASELINE_CPU_GIB = 0.95
# The same for a process that has initialised CUDA (cuBLAS, cuDNN and the kernels of torch are mapped and
# partly resident). Measured on one H100 (docs/benchmarks.md): single_gpu runs of Qwen2.5-VL-3B peak at 7.9 GiB
# RSS, 0.9 GiB above the 7.0 GiB of bf16 weights they load on the host first; 1.5 keeps a margin.
HOST_BASELINE_CUDA_GIB = 1.5
# Each data-loader worker is a forked process; what it touches of the parent's heap, plus decoded images and
# the tokenizer, stops being shared. Measured (scripts/benchmark_data.py --modes workers, docs/benchmarks.md): 43
# MiB of private memory per worker after 100 batches of 4 with llava-1.5-7b-hf's processor; 0.5 GiB leaves room
# for large images, video frames and prefetched batches.
DATALOADER_WORKER_GIB = 0.5
# What each process holds per record once the records are read (vlm_recipes/records.py maps the records themselves
# from the page cache: counted once per node, as the Arrow file's size) and checked by the preflight (the kept
# positions, each sample's length and image sizes). Measured at 665k records with scripts/benchmark_data.py
# (docs/benchmarks.md): 22 bytes a record for the records, 347 for the preflight's results; 512 leaves a margin.
RECORD_HEAP_BYTES = 512
# Memory a CUDA process holds outside torch's allocator (context, kernels): nvidia-smi shows it, torch's
# max_memory_allocated() does not. Typical for torch 2.x on an H100; to be confirmed by the benchmark.
CUDA_CONTEXT_GIB = 0.6
# torch's caching allocator reserves more than it hands out (blocks split and cached); reserved / allocated.
# An estimate, to be confirmed by the benchmark (run_stats records both).
ALLOCATOR_SLACK = 1.10
# On a CPU-only run, a process's peak RSS exceeds the bytes counted here by this factor (on everything but the
# libraries' baseline): glibc keeps freed heap memory (about half of the excess: MALLOC_MMAP_THRESHOLD_=131072
# removes it), and DeepSpeed makes transient copies (full 16-bit gradients before they are reduced, fp32 copies
# of the partitions). Measured once, on a calibration run that is not one of the test cases: 71M-parameter
# LLaVA-shaped model, ZeRO-3 offload, bf16, 2 processes, micro-batch 2: peak RSS 1.985 GiB per process.
CPU_RUN_SLACK = 1.35
# DeepSpeed's estimators multiply host memory by additional_buffer_factor (default 1.5). On a GPU machine the
# offloaded states live in pinned memory. Measured on one H100 (docs/benchmarks.md, Qwen2.5-VL-3B, every weight
# trained): with the parameters offloaded too (the seed's zero3_offload) the peak RSS is 1.47x the raw state bytes,
# so DeepSpeed's default is kept; with the optimizer alone offloaded (zero2_offload, zero3_offload_optimizer) it is
# 1.17-1.19x. On a CPU-only run nothing is pinned, and CPU_RUN_SLACK covers the rest: factor 1.
HOST_BUFFER_FACTOR_CUDA = 1.5
HOST_BUFFER_FACTOR_CUDA_OPTIMIZER_ONLY = 1.2
HOST_BUFFER_FACTOR_CPU = 1.0
# The recommendation keeps this fraction of GPU memory and of host RAM free.
DEFAULT_MARGIN = 0.10

# Activation bytes a decoder layer saves for backward, per token, in bf16 with sdpa attention:
# 13 x hidden + 6 x intermediate + 4 x (key/value width). Measured here by counting the tensors autograd saves
# (saved_tensors_hooks) for Llama layers of four shapes (fit exact to 2%); the same kinds of tensors for Qwen2 and
# Phi layers. Without gradient checkpointing every layer holds this; with it, each layer holds only its input.
ACTIVATION_BYTES_PER_HIDDEN = 13
ACTIVATION_BYTES_PER_INTERMEDIATE = 6
ACTIVATION_BYTES_PER_KV = 4
# During a layer's backward its saved activations and their gradients are alive together.
LAYER_BACKWARD_PEAK_FACTOR = 2
# Peak bytes per logit (micro_batch x seq_len x vocab) of the loss: bf16 logits, transformers' fp32 upcast,
# log-softmax and its gradient. Measured here: 12.0 (transformers' ForCausalLMLoss, forward + backward, bf16).
LOGITS_PEAK_BYTES_PER_ELEMENT = 12
# A LoRA adapter saves, per token, about this many bytes per input feature of the layer it adapts: the dropout
# mask (1 byte) and the 16-bit copy of the dropped input that lora_A's weight gradient needs, plus small change.
# Measured on one H100: LLaVA-1.5-7B, LoRA r=64 on all seven projections, dropout 0.05, bf16, 4 x 1024 tokens,
# no checkpointing: 46.2 GiB peak, 15 GiB above the same model's activations without adapters (docs/benchmarks.md).
LORA_ACTIVATION_BYTES_PER_INPUT = 3.5

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---- the model: parameter counts and dimensions, from its config only ----------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    vision_params: int
    projector_params: int
    language_params: int  # embeddings, decoder layers, final norm, lm_head (counted once when tied)
    largest_layer_params: int  # DeepSpeed's "largest layer": the module with the most parameters of its own
    # The largest unit FSDP2 gathers at once: a decoder or vision layer, or lm_head.
    largest_block_params: int
    tied_embeddings: bool
    hidden_size: int
    intermediate_size: int
    num_layers: int
    kv_width: int  # num_key_value_heads x head_dim
    vocab_size: int
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0
    vision_layers: int = 0
    patches_per_image_token: int = 1  # Qwen merges 2x2 patches into one token
    default_image_tokens: int = 0
    # For LoRA: sum of (in_features + out_features) of the language model's linear layers, by layer name.
    language_linear_widths: dict = field(default_factory=dict)
    # The same for in_features alone (what an adapter's activations scale with), summed over all layers.
    language_linear_inputs: dict = field(default_factory=dict)
    # (in_features + out_features) of the vision tower's linear layers, by layer name: its LoRA adapters.
    vision_linear_widths: dict = field(default_factory=dict)
    vision_linear_inputs: dict = field(default_factory=dict)  # in_features alone, as for the language model
    param_numels: tuple = ()  # every parameter's size (ZeRO-3 keeps the small ones gathered)

    @property
    def total_params(self) -> int:
        return self.vision_params + self.projector_params + self.language_params


class ModelNotKnownOffline(ValueError):
    pass


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """(display name, transformers config) for a short name or hub id of the recipes' default models (known
    offline), a local checkpoint folder, or any hub id when the hub is reachable."""
    from transformers import AutoConfig

    from vlm_recipes.known_models import KNOWN_MODELS, find_known_model

    known = find_known_model(name_or_path)
    if known is not None and not Path(name_or_path).is_dir():
        short, model = known
        return short, model.config()
    try:
        return name_or_path, AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelNotKnownOffline(
            f"cannot read the config of {name_or_path!r}: {error.__class__.__name__}. Offline, the planner knows "
            f"{', '.join(KNOWN_MODELS)} by name; for another model pass a local folder holding its config.json "
            "(weights are not needed), or run where the hub is reachable."
        ) from None


def parts_of(config, parts=None):
    """The ModelParts that split `config`'s model into vision tower, projector and language model: a recipe's own
    when it plans its run, else those of the recipe that trains this model type (config.recipe_for_model_type)."""
    if parts is not None:
        return parts
    from vlm_recipes.config import load_recipe, recipe_for_model_type

    return load_recipe(recipe_for_model_type(config.model_type)).PARTS


def build_on_meta(config) -> torch.nn.Module:
    """The model with no memory behind its tensors: shapes only, built in well under a second even for 8B."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(config)
        except ValueError:  # a language model alone (CheXagent stage 1 names its text model)
            return AutoModelForCausalLM.from_config(config)


def model_shape(name: str, config, parts=None) -> ModelShape:
    model = build_on_meta(config)
    parts = parts_of(config, parts)
    by_role = {"vision": 0, "projector": 0, "language": 0}
    for parameter_name, parameter in model.named_parameters():  # tied weights are listed once
        by_role[parts.role_of(parameter_name)] += parameter.numel()
    own_params = [sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()]
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [
        sum(p.numel() for p in module.parameters())
        for module in model.modules()
        if type(module).__name__ in block_classes
    ]
    language_linear_widths, language_linear_inputs = {}, {}
    vision_linear_widths, vision_linear_inputs = {}, {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module_name.endswith("lm_head"):
            continue
        leaf, role = module_name.rsplit(".", 1)[-1], parts.role_of(module_name)
        width = module.in_features + module.out_features
        if role == "language":
            language_linear_widths[leaf] = language_linear_widths.get(leaf, 0) + width
            language_linear_inputs[leaf] = language_linear_inputs.get(leaf, 0) + module.in_features
        elif role == "vision":
            vision_linear_widths[leaf] = vision_linear_widths.get(leaf, 0) + width
            vision_linear_inputs[leaf] = vision_linear_inputs.get(leaf, 0) + module.in_features
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    merge = getattr(vision, "spatial_merge_size", 1) or 1
    output = model.get_output_embeddings()
    return ModelShape(
        name=name,
        vision_params=by_role["vision"],
        projector_params=by_role["projector"],
        language_params=by_role["language"],
        largest_layer_params=max(own_params),
        largest_block_params=max([*blocks, output.weight.numel() if output is not None else 0]),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False) or config.tie_word_embeddings),
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        kv_width=kv_heads * head_dim,
        vocab_size=text.vocab_size,
        vision_hidden_size=getattr(vision, "hidden_size", 0) if vision else 0,
        vision_intermediate_size=getattr(vision, "intermediate_size", 0) if vision else 0,
        vision_layers=vision_depth(vision),
        patches_per_image_token=merge * merge,
        default_image_tokens=config_image_tokens(config) or image_tokens_for(vision),
        language_linear_widths=language_linear_widths,
        language_linear_inputs=language_linear_inputs,
        vision_linear_widths=vision_linear_widths,
        vision_linear_inputs=vision_linear_inputs,
        param_numels=tuple(sorted(p.numel() for p in model.parameters())),
    )


def config_image_tokens(config) -> int | None:
    """The language-model tokens of one image where the config states them: Gemma 3's mm_tokens_per_image (its tower
    sees 4,096 patches and pools them to 256). Not LlavaConfig's image_seq_length: a default of 576 that configs
    assembled around other towers (CheXagent's SigLIP) do not update."""
    tokens = getattr(config, "mm_tokens_per_image", None)
    return tokens if isinstance(tokens, int) else None


def vision_depth(vision_config) -> int:
    if vision_config is None:
        return 0
    return getattr(vision_config, "num_hidden_layers", None) or getattr(vision_config, "depth", 0)


# Towers that take any image size (a pixel budget, as Qwen's processors) have no image_size in their config: the
# planner then assumes the area the recipes' YAMLs cap images at. A run measures its own processor instead
# (masking.image_tokens_at_cap) and passes that to the host-RAM check.
DEFAULT_IMAGE_AREA = 802816


def image_tokens_for_area(vision_config, area: int) -> int:
    """Tokens of an image of `area` pixels for a tower whose processor keeps a pixel budget: one per
    (patch x merge)^2 pixels, from the config (14 x 2 for Qwen2/2.5-VL, 16 x 2 for Qwen3-VL)."""
    merge = getattr(vision_config, "spatial_merge_size", None) or 1
    return area // (vision_config.patch_size * merge) ** 2


def image_tokens_for(vision_config, image_size: int | None = None) -> int:
    """Language-model tokens one square image of side `image_size` becomes, from the config's patch and merge
    sizes (the tower's own image size by default; DEFAULT_IMAGE_AREA for towers without one)."""
    if vision_config is None:
        return 0
    image_size = image_size or getattr(vision_config, "image_size", None)
    if not image_size:
        return image_tokens_for_area(vision_config, DEFAULT_IMAGE_AREA)
    merge = getattr(vision_config, "spatial_merge_size", None) or 1
    # (height, width) pairs where a config gives them (InternVL's image_size and patch_size are lists)
    height, width = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patch = vision_config.patch_size
    patch_height, patch_width = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    return (height // patch_height) * (width // patch_width) // (merge * merge)


# ---- what trains, with what batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSetup:
    train_vision_tower: bool = False
    train_projector: bool = True
    train_language_model: bool = True
    lora_r: int = 0  # > 0: LoRA adapters on the language model's `lora_targets` (its base weights frozen)
    lora_targets: tuple = DEFAULT_LORA_TARGETS
    lora_vision_targets: tuple = ()  # with lora_r: adapters on these linear layers of the vision tower too
    use_dora: bool = False  # with lora_r: DoRA, a trained magnitude per output feature of each adapted layer
    micro_batch: int = 4
    seq_len: int = 2048  # tokens per sample, image tokens included
    image_tokens: int | None = None  # per sample; None: one image at the model's default size
    gradient_checkpointing: bool = True
    dataloader_workers: int = 4
    records: int = 0  # training + evaluation records each process reads
    records_table_bytes: int = 0  # their memory-mapped Arrow file(s): one copy in the page cache per node
    # --compensated_bf16_updates: without DeepSpeed, a bf16 compensation per weight trained in full (optim.py)
    compensated_updates: bool = False
    # --fp16 true: a config the recipes refuse in fp16 (ds_config.fp16_problem) is never picked
    fp16: bool = False

    @classmethod
    def from_mode(
        cls, mode: str, train_vision_tower: bool = False, lora_r: int = 64, **batch
    ) -> "TrainingSetup":
        """full: language model + projector (the recipes' default, vision tower frozen unless asked);
        lora: adapters on the language model, projector in full; projector: the projector only."""
        if mode == "full":
            return cls(train_vision_tower=train_vision_tower, **batch)
        if mode == "lora":
            return cls(train_vision_tower=False, train_language_model=False, lora_r=lora_r, **batch)
        if mode == "projector":
            return cls(train_vision_tower=False, train_language_model=False, **batch)
        raise ValueError(f"mode {mode!r}: one of full, lora, projector")

    @property
    def mode(self) -> str:
        if self.lora_r:
            return f"{'dora' if self.use_dora else 'lora'} r={self.lora_r}"
        if self.train_language_model:
            return "full, vision tower trained" if self.train_vision_tower else "full (vision tower frozen)"
        return "projector only" if self.train_projector else "nothing trained"


def lora_params(shape: ModelShape, setup: TrainingSetup) -> int:
    # PEFT's LoRA adds A (r x in) and B (out x r) to each targeted linear layer; DoRA also a magnitude (out).
    targeted = [(shape.language_linear_widths, shape.language_linear_inputs, setup.lora_targets),
                (shape.vision_linear_widths, shape.vision_linear_inputs, setup.lora_vision_targets)]  # fmt: skip
    widths = sum(width_of.get(name, 0) for width_of, _, names in targeted for name in names)
    inputs = sum(inputs_of.get(name, 0) for _, inputs_of, names in targeted for name in names)
    return setup.lora_r * widths + (widths - inputs if setup.use_dora and setup.lora_r else 0)


def parameter_split(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, as the recipes set requires_grad (and PEFT wraps the model)."""
    parts = {
        "vision": (shape.vision_params, setup.train_vision_tower),
        "projector": (shape.projector_params, setup.train_projector),
        "language": (shape.language_params, setup.train_language_model and not setup.lora_r),
    }
    trainable = sum(count for count, trains in parts.values() if trains)
    frozen = shape.total_params - trainable
    if setup.lora_r:
        trainable += lora_params(shape, setup)
        if setup.train_projector:
            # PEFT's modules_to_save trains a copy of the projector and keeps the original, frozen.
            frozen += shape.projector_params
    return trainable, frozen


# ---- the machine --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_memory_gib: float = 80.0
    host_ram_gib: float = 128.0
    # "cpu": a run without GPUs (the tests, the demo), where every "GPU" byte is host memory of the same process.
    device: str = "cuda"

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def host_buffer_factor(self, params_offloaded: bool = True) -> float:
        if self.device == "cpu":
            return HOST_BUFFER_FACTOR_CPU
        return HOST_BUFFER_FACTOR_CUDA if params_offloaded else HOST_BUFFER_FACTOR_CUDA_OPTIMIZER_ONLY

    @property
    def process_baseline_bytes(self) -> float:
        return (HOST_BASELINE_CPU_GIB if self.device == "cpu" else HOST_BASELINE_CUDA_GIB) * GIB


# ---- activations ---------------------------------------------------------------------------------------------------


def layer_activation_bytes(tokens: int, hidden: int, intermediate: int, kv_width: int) -> float:
    per_token = (
        ACTIVATION_BYTES_PER_HIDDEN * hidden
        + ACTIVATION_BYTES_PER_INTERMEDIATE * intermediate
        + ACTIVATION_BYTES_PER_KV * kv_width
    )
    return tokens * per_token


def stack_activation_bytes(tokens, layers, hidden, intermediate, kv_width, checkpointed: bool) -> float:
    """Peak activation memory of a stack of layers that backpropagates."""
    one_layer = layer_activation_bytes(tokens, hidden, intermediate, kv_width)
    if not checkpointed:
        return layers * one_layer + (LAYER_BACKWARD_PEAK_FACTOR - 1) * one_layer
    # Each layer's input is kept; one layer at a time is recomputed and backpropagated.
    return layers * tokens * hidden * BYTES_16BIT + LAYER_BACKWARD_PEAK_FACTOR * one_layer


def activation_bytes(shape: ModelShape, setup: TrainingSetup) -> dict[str, float]:
    """Per GPU (per process): the language model's and the vision tower's activations, and the loss's logits."""
    tokens = setup.micro_batch * setup.seq_len
    image_tokens = shape.default_image_tokens if setup.image_tokens is None else setup.image_tokens
    # A sample whose image does not fit in seq_len is refused by the preflight, so no more image tokens than that.
    patches = setup.micro_batch * min(image_tokens, setup.seq_len) * shape.patches_per_image_token
    language = stack_activation_bytes(
        tokens, shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.kv_width,
        setup.gradient_checkpointing,
    )  # fmt: skip
    vision_dims = (shape.vision_hidden_size, shape.vision_intermediate_size, shape.vision_hidden_size)
    if setup.train_vision_tower:
        vision = stack_activation_bytes(
            patches, shape.vision_layers, *vision_dims, setup.gradient_checkpointing
        )
    else:
        # A frozen tower saves nothing for backward: one layer's forward temporaries, plus every layer's output
        # (LLaVA selects a hidden layer from output_hidden_states).
        vision = layer_activation_bytes(patches, *vision_dims) + (
            shape.vision_layers * patches * shape.vision_hidden_size * BYTES_16BIT
        )
    if setup.lora_r:
        adapted_inputs = sum(shape.language_linear_inputs.get(name, 0) for name in setup.lora_targets)
        adapters = tokens * adapted_inputs * LORA_ACTIVATION_BYTES_PER_INPUT  # every layer's, together
        if setup.gradient_checkpointing:  # only the layer being recomputed holds its adapters' activations
            adapters = LAYER_BACKWARD_PEAK_FACTOR * adapters / max(shape.num_layers, 1)
        language += adapters
    logits = tokens * shape.vocab_size * LOGITS_PEAK_BYTES_PER_ELEMENT
    # The loss's peak comes at the start of backward, before any layer is recomputed: the logits and the layer
    # stack's peaks do not add, except for the checkpointed inputs, alive throughout.
    kept = (
        shape.num_layers * tokens * shape.hidden_size * BYTES_16BIT
        if setup.gradient_checkpointing
        else language
    )
    return {
        "language model activations": language,
        "logits and loss": max(logits + kept, language) - language,
        "vision tower activations": vision,
    }


# ---- model states under each config --------------------------------------------------------------------------------


def read_ds_config(config_name: str) -> dict:
    return json.loads((DS_CONFIG_DIR / f"{config_name}.json").read_text())


def offload_ratio(ds_config: dict) -> float:
    """The share of the optimizer states offloaded: ZeRO-3's offload_optimizer.ratio (1.0 unless set)."""
    zero = ds_config.get("zero_optimization", {})
    return float((zero.get("offload_optimizer") or {}).get("ratio", 1.0))


def accumulates_fp32_on_gpu(ds_config: dict) -> bool:
    """ZeRO-1/2 with the optimizer offloaded and data_types.grad_accum_dtype fp32: DeepSpeed (0.19) accumulates the
    gradients of this GPU's partition in an fp32 buffer on the GPU and copies them to the host once per optimizer
    step, instead of round-tripping them through host memory after every micro-batch."""
    stage = ds_config.get("zero_optimization", {}).get("stage")
    wanted = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    return stage in (1, 2) and offloads(ds_config)["optimizer"] and wanted in ("fp32", "float32")


def number(value, auto: float) -> float:
    # "auto" bucket sizes are filled from the hidden size at train() (transformers' trainer_config_finalize).
    return auto if value == "auto" else float(value)


def deepspeed_buffer_bytes(shape: ModelShape, zero: dict) -> dict[str, float]:
    """DeepSpeed's working buffers on each GPU, from the config's (resolved) sizes."""
    h = shape.hidden_size
    reduce_bucket = number(zero.get("reduce_bucket_size", 5e8), h * h)
    if zero.get("stage") == 3:
        prefetch = number(zero.get("stage3_prefetch_bucket_size", 5e7), 0.9 * h * h)
        threshold = number(zero.get("stage3_param_persistence_threshold", 1e5), 10 * h)
        persistent = sum(n for n in shape.param_numels if n < threshold)
        # Parameters below the persistence threshold stay gathered; a prefetch bucket of the next ones is
        # fetched ahead; gradients are reduced through a 16-bit bucket and copied out in fp32.
        return {
            "DeepSpeed buffers": (persistent + prefetch) * BYTES_16BIT
            + reduce_bucket * (BYTES_16BIT + BYTES_FP32)
        }
    # ZeRO-2 with overlap_comm double-buffers the gradient bucket. (Its allgather_bucket_size only chunks an
    # all-gather into the parameters' own flat buffer: no memory of its own.)
    return {"DeepSpeed buffers": 2 * reduce_bucket * BYTES_16BIT}


def deepspeed_model_states(ds_config: dict, trainable: int, shape: ModelShape, hardware: Hardware) -> tuple:
    """(bytes per GPU, bytes per node of host RAM) of the trainable parameters' states, by DeepSpeed's own
    estimators (16-bit weights and gradients, fp32 master weights and Adam moments)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    offload = offloads(ds_config)
    factor = hardware.host_buffer_factor(params_offloaded=offload["param"])
    if ds_config["zero_optimization"]["stage"] == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=trainable,
            largest_layer_params=shape.largest_layer_params,
            num_gpus_per_node=hardware.gpus_per_node,
            num_nodes=hardware.nodes,
            cpu_offload=offload["optimizer"],
            cpu_offload_params=offload["param"],
            zero_init=True,  # the recipes build the model after TrainingArguments: zero.Init partitions it
            additional_buffer_factor=factor,
        )
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=trainable,
            num_gpus_per_node=hardware.gpus_per_node,
            num_nodes=hardware.nodes,
            cpu_offload=offload["optimizer"],
            additional_buffer_factor=factor,
        )
    return gpu, cpu


@dataclass
class ConfigEstimate:
    config: str
    gpu: dict  # bytes per GPU, by what holds them
    host: dict  # bytes of host RAM per node, by what holds them
    note: str = ""  # what else to know before choosing it
    refused: str | None = None  # why the recipes refuse this config for the run, whatever the memory

    @property
    def gpu_bytes(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host.values())

    @property
    def gpu_allocated_bytes(self) -> float:
        """What torch's allocator hands out (compare with torch.cuda.max_memory_allocated())."""
        return sum(v for k, v in self.gpu.items() if k not in ("CUDA context", "allocator slack"))

    def process_bytes(self, hardware: Hardware) -> float:
        """One process's memory on a CPU-only run (compare with its peak RSS): its "GPU" share is host memory."""
        return self.gpu_bytes + self.host_bytes / hardware.gpus_per_node

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "gpu_gib": self.gpu_bytes / GIB,
            "gpu_allocated_gib": self.gpu_allocated_bytes / GIB,
            "host_gib_per_node": self.host_bytes / GIB,
            "gpu_breakdown_gib": {k: v / GIB for k, v in self.gpu.items()},
            "host_breakdown_gib": {k: v / GIB for k, v in self.host.items()},
            "note": self.note,
        }


def states_without_deepspeed(shape, setup, hardware, trainable, frozen) -> tuple[dict, dict]:
    # The recipes load the model in bf16 and torch's AdamW keeps its moments in the parameters' dtype: 16-bit
    # weights, gradients and two moments per trainable parameter. PEFT upcasts LoRA adapters to fp32
    # (autocast_adapter_dtype).
    adapters = lora_params(shape, setup)
    gpu = {"trainable weights, gradients, Adam (bf16)": (trainable - adapters) * 4 * BYTES_16BIT}
    if setup.compensated_updates:  # what rounding dropped from each weight's updates (vlm_recipes/optim.py)
        gpu["compensation of the bf16 updates"] = (trainable - adapters) * BYTES_16BIT
    if adapters:
        gpu["LoRA adapters, gradients, Adam (fp32)"] = adapters * 4 * BYTES_FP32
    gpu["frozen weights"] = frozen * BYTES_16BIT
    # from_pretrained builds the model on the host before the Trainer moves it to the GPU.
    host = {"weights loaded on the host first": (trainable + frozen) * BYTES_16BIT * hardware.gpus_per_node}
    return gpu, host


def states_fsdp2(shape, hardware, trainable, frozen) -> tuple[dict, dict]:
    # accelerate upcasts trainable parameters to fp32 under mixed precision (fsdp2_prepare_model): fp32
    # weights, gradients and Adam moments, sharded; frozen ones stay 16-bit, sharded too.
    world = hardware.world_size
    gpu = {
        "trainable weights, gradients, Adam (fp32, sharded)": trainable * 4 * BYTES_FP32 / world,
        "frozen weights (sharded)": frozen * BYTES_16BIT / world,
        # The unit being computed and the one prefetched, gathered in bf16, and the current unit's gradients.
        "gathered layers": shape.largest_block_params * 3 * BYTES_16BIT,
    }
    # cpu_ram_efficient_loading: rank 0 alone loads the model (upcast as above), then broadcasts the shards.
    host = {"rank 0 loads the whole model": trainable * BYTES_FP32 + frozen * BYTES_16BIT}
    return gpu, host


def states_deepspeed(ds_config: dict, shape, hardware, trainable, frozen) -> tuple[dict, dict]:
    zero, offload = ds_config["zero_optimization"], offloads(ds_config)
    ds_gpu, ds_host = deepspeed_model_states(ds_config, trainable, shape, hardware)
    gpu, host = {"trainable states (DeepSpeed's estimate)": ds_gpu}, {}
    world = hardware.world_size
    if any(offload.values()):
        host["trainable states (DeepSpeed's estimate)"] = ds_host
    else:  # what DeepSpeed counts on the host without offload is the model as loaded, before partitioning
        host["weights loaded on the host first (DeepSpeed's estimate)"] = ds_host
    if offload["optimizer"] and not offload["param"]:
        # DeepSpeed's estimators count only the 16-bit weights on the GPU here. Measured on one H100
        # (docs/benchmarks.md): zero2_offload and zero3_offload_optimizer peaks exceed everything else counted by
        # the 16-bit gradients of every trainable parameter (their partition, under ZeRO-3).
        gpu["16-bit gradients"] = trainable * BYTES_16BIT / (world if zero["stage"] == 3 else 1)
    if accumulates_fp32_on_gpu(ds_config):
        gpu["fp32 gradient accumulation (this GPU's partition)"] = trainable * BYTES_FP32 / world
    kept = 1.0 - offload_ratio(ds_config)
    if offload["optimizer"] and kept > 0:
        # ZeRO-3's partial offload: this share of the fp32 master weights and Adam moments (12 bytes per parameter)
        # stays on the GPU, and leaves the host. Measured (LLaVA-1.5-7B, ratio 0.7): 16% under this estimate.
        gpu["optimizer states kept on the GPU (1 - offload ratio)"] = (
            kept * trainable * 3 * BYTES_FP32 / world
        )
        host["trainable states (DeepSpeed's estimate)"] *= 1.0 - kept
    frozen_bytes = frozen * BYTES_16BIT
    if zero["stage"] == 3 and offload["param"]:
        host["frozen weights (partitioned, offloaded)"] = (
            frozen_bytes / hardware.nodes * hardware.host_buffer_factor()
        )
    elif zero["stage"] == 3:
        gpu["frozen weights (partitioned)"] = frozen_bytes / world
    else:
        gpu["frozen weights"] = frozen_bytes
        # Without zero.Init every process loads the whole model on the host before DeepSpeed moves it.
        host["frozen weights loaded on the host first"] = (
            frozen_bytes * hardware.gpus_per_node * hardware.host_buffer_factor(params_offloaded=False)
        )
    gpu.update(deepspeed_buffer_bytes(shape, zero))
    if zero["stage"] == 3:
        # stage3_max_live_parameters lets gathered parameters stay on the GPU until that many are alive;
        # DeepSpeed's estimate counts only the largest layer (4 bytes per parameter: weight + gradient).
        live = min(number(zero.get("stage3_max_live_parameters", 1e9), 1e9), trainable + frozen)
        gpu["gathered parameters (up to stage3_max_live_parameters)"] = max(
            0.0, live * BYTES_16BIT - 4 * shape.largest_layer_params
        )
    return gpu, host


def model_states(config_name, shape, setup, hardware, ds_config: dict | None = None) -> tuple:
    """(GPU items, host items per node) of weights, gradients, optimizer state and buffers."""
    trainable, frozen = parameter_split(shape, setup)
    if config_name in ("single_gpu", "multi_gpu"):
        return states_without_deepspeed(shape, setup, hardware, trainable, frozen)
    if config_name == "fsdp2":
        return states_fsdp2(shape, hardware, trainable, frozen)
    ds_config = ds_config if ds_config is not None else read_ds_config(config_name)
    return states_deepspeed(ds_config, shape, hardware, trainable, frozen)


LIBRARIES, WORKERS = "libraries, per process", "data-loader workers"
RECORDS, RECORDS_TABLE = (
    "records and their checks, per process",
    "records table (memory-mapped, once per node)",
)
PROCESS_OVERHEADS = (LIBRARIES, WORKERS, RECORDS, RECORDS_TABLE)


def estimate(
    config_name: str,
    shape: ModelShape,
    setup: TrainingSetup,
    hardware: Hardware,
    ds_config: dict | None = None,
) -> ConfigEstimate:
    """`ds_config`: a DeepSpeed JSON of one's own (resolved or with "auto"), estimated instead of the shipped file
    `config_name`."""
    gpu, host = model_states(config_name, shape, setup, hardware, ds_config)
    refused = None
    if setup.fp16 and config_name in DEEPSPEED_CONFIGS:
        if fp16_problem(ds_config if ds_config is not None else read_ds_config(config_name)):
            refused = "refused in fp16"
    gpu.update(activation_bytes(shape, setup))
    processes = hardware.gpus_per_node
    host[LIBRARIES] = processes * hardware.process_baseline_bytes
    host[WORKERS] = processes * setup.dataloader_workers * DATALOADER_WORKER_GIB * GIB
    if setup.records:
        host[RECORDS] = processes * setup.records * RECORD_HEAP_BYTES
    if setup.records_table_bytes:
        host[RECORDS_TABLE] = setup.records_table_bytes
    if hardware.device == "cpu":
        # The weights a CPU run loads are the ones it trains: no separate host copy before "moving" them.
        host = {k: v for k, v in host.items() if "loaded on the host first" not in k}
        counted = (
            sum(gpu.values()) + sum(v for k, v in host.items() if k not in PROCESS_OVERHEADS) / processes
        )
        gpu["allocator slack"] = counted * (CPU_RUN_SLACK - 1)
    else:
        gpu["allocator slack"] = sum(gpu.values()) * (ALLOCATOR_SLACK - 1)
        gpu["CUDA context"] = CUDA_CONTEXT_GIB * GIB
    return ConfigEstimate(config_name, gpu, host, caveat(config_name, shape, setup), refused)


def caveat(config_name: str, shape: ModelShape, setup: TrainingSetup) -> str:
    trainable, _ = parameter_split(shape, setup)
    trained_in_full = trainable - lora_params(shape, setup)  # PEFT keeps adapters in fp32; these stay bf16
    if config_name in ("single_gpu", "multi_gpu") and trained_in_full and not setup.compensated_updates:
        return (
            f"without DeepSpeed or FSDP2 the {trained_in_full / 1e9:.2f}B parameters trained in full are bf16, "
            "updated by bf16 Adam moments with no fp32 master copy, so updates below about 0.2% of a weight are "
            "rounded away (--compensated_bf16_updates true keeps them, 2 bytes more per parameter); the DeepSpeed "
            "and FSDP2 configs keep fp32 master weights"
        )
    return ""


def applicable_configs(hardware: Hardware) -> list[str]:
    # single_gpu.yaml is one process; multi_gpu.yaml (DDP) needs more than one.
    skip = "multi_gpu" if hardware.world_size == 1 else "single_gpu"
    return [name for name in SPEED_ORDER if name != skip]


def estimate_all(shape: ModelShape, setup: TrainingSetup, hardware: Hardware) -> list[ConfigEstimate]:
    """One estimate per shipped config that applies to this hardware, fastest first."""
    return [estimate(name, shape, setup, hardware) for name in applicable_configs(hardware)]


# ---- the recommendation --------------------------------------------------------------------------------------------


@dataclass
class Recommendation:
    config: str | None
    reason: str
    fits: dict = field(default_factory=dict)  # config -> None if it fits, else what it exceeds


def limits(hardware: Hardware, margin: float) -> tuple[float, float]:
    return hardware.gpu_memory_gib * GIB * (1 - margin), hardware.host_ram_gib * GIB * (1 - margin)


def what_exceeds(estimate_: ConfigEstimate, hardware: Hardware, margin: float) -> str | None:
    gpu_limit, host_limit = limits(hardware, margin)
    problems = []
    if estimate_.gpu_bytes > gpu_limit:
        problems.append(f"GPU {estimate_.gpu_bytes / GIB:.1f} > {gpu_limit / GIB:.1f} GiB")
    if estimate_.host_bytes > host_limit:
        problems.append(f"host {estimate_.host_bytes / GIB:.1f} > {host_limit / GIB:.1f} GiB")
    return ", ".join(problems) or None


def recommend(
    estimates: list[ConfigEstimate],
    hardware: Hardware,
    margin: float = DEFAULT_MARGIN,
    fp32_master_weights=False,
) -> Recommendation:
    """The fastest config whose GPU and host estimates both stay under (1 - margin) of what the machine has
    (with `fp32_master_weights`, only among configs that keep an fp32 copy of what trains in full)."""
    fits = {e.config: e.refused or what_exceeds(e, hardware, margin) for e in estimates}
    if fp32_master_weights:
        fits |= {e.config: "no fp32 master weights" for e in estimates if e.note and fits[e.config] is None}
    skipped = [f"{name} ({problem})" for name, problem in fits.items() if problem]
    for e in estimates:
        if fits[e.config] is None:
            faster = skipped[: [x.config for x in estimates].index(e.config)]
            why = f"; faster configs do not fit: {'; '.join(faster)}" if faster else ""
            note = f". Note: {e.note}" if e.note else ""
            return Recommendation(
                e.config,
                f"{e.config}: the fastest that fits with {margin:.0%} to spare (GPU {e.gpu_bytes / GIB:.1f} GiB, "
                f"host {e.host_bytes / GIB:.1f} GiB per node){why}{note}",
                fits,
            )
    return Recommendation(
        None,
        "nothing fits: "
        + "; ".join(skipped)
        + ". Use LoRA or a smaller micro-batch / sequence length, more GPUs "
        "or nodes (ZeRO-3 divides the states among them), or a machine with more host RAM.",
        fits,
    )


# ---- a recipe's run, as the planner sees it (vlm_recipes/host_memory.py asks) -------------------------------------


def setup_from_arguments(
    model_args, data_args, training_args, image_tokens: int | None = None
) -> TrainingSetup:
    return TrainingSetup(
        image_tokens=image_tokens,
        train_vision_tower=not model_args.freeze_vision_tower and not model_args.use_lora,
        train_projector=not model_args.freeze_projector,
        train_language_model=not model_args.freeze_language_model,
        lora_r=model_args.lora_r if model_args.use_lora else 0,
        lora_targets=tuple(model_args.lora_target_modules),
        lora_vision_targets=tuple(model_args.lora_vision_target_modules) if model_args.use_lora else (),
        use_dora=model_args.use_lora and getattr(model_args, "use_dora", False),
        micro_batch=training_args.per_device_train_batch_size,
        seq_len=data_args.max_length or 2048,
        gradient_checkpointing=training_args.gradient_checkpointing,
        dataloader_workers=training_args.dataloader_num_workers,
        compensated_updates=getattr(training_args, "compensated_bf16_updates", False),
        fp16=bool(getattr(training_args, "fp16", False)),
    )


def hardware_from_environment(training_args) -> Hardware:
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by accelerate launch / torchrun
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    measured = {}
    if cuda:  # this machine's GPU memory and free host RAM, for the planner's choice of a faster config
        measured["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
        measured["host_ram_gib"] = (meminfo_available_bytes() or 128 * GIB) / GIB
    return Hardware(
        gpus_per_node=processes_per_node,
        nodes=max(training_args.world_size // processes_per_node, 1),
        device="cuda" if cuda else "cpu",
        **measured,
    )


def host_estimate_for_run(ds_path: Path, shape, setup, hardware) -> ConfigEstimate:
    """The planner's estimate for the DeepSpeed JSON this run uses: a shipped one, a copy, or one's own."""
    return estimate(ds_path.stem, shape, setup, hardware, ds_config=json.loads(ds_path.read_text()))


def planned_run(
    model_args,
    data_args,
    training_args,
    image_tokens: int | None = None,
    model_config: tuple | None = None,
    parts=None,
) -> tuple[ModelShape, TrainingSetup]:
    """The model's shape and what the run trains, as the planner sees a recipe's run: from --model_name_or_path's
    config, or `model_config` ((display name, transformers config)) for a model the recipe builds itself, split
    into parts by the recipe's `parts` (ModelParts), and the freezing and LoRA arguments."""
    name, config = model_config or load_model_config(
        model_args.model_name_or_path, model_args.trust_remote_code
    )
    shape = model_shape(name, config, parts)
    return shape, setup_from_arguments(model_args, data_args, training_args, image_tokens)


def faster_config_line(ds_path: Path, shape, setup, hardware: Hardware) -> str | None:
    """On a GPU machine, one line naming the planner's fastest config that fits when it is faster than the run's
    (the plain launch's zero3_offload is the slowest), with the command; None otherwise."""
    current = ds_path.stem
    if hardware.device != "cuda" or current not in SPEED_ORDER:
        return None
    choice = recommend(estimate_all(shape, setup, hardware), hardware)
    if choice.config is None or SPEED_ORDER.index(choice.config) >= SPEED_ORDER.index(current):
        return None
    no_deepspeed = "" if choice.config in (*DEEPSPEED_CONFIGS, "fsdp2") else " --deepspeed none"
    return (
        f"memory planner: {choice.config} fits this machine too and is faster than {current}: accelerate launch "
        f"--config_file accelerate_configs/{choice.config}.yaml recipes/<recipe>.py{no_deepspeed} (make train picks "
        f"it by itself). {choice.reason}"
    )


def as_json(shape: ModelShape, setup: TrainingSetup, hardware: Hardware, estimates, choice) -> dict:
    trainable, frozen = parameter_split(shape, setup)
    shape_dict = {
        k: v
        for k, v in asdict(shape).items()
        if k
        not in ("param_numels", "language_linear_widths", "language_linear_inputs", "vision_linear_inputs")
    }
    return {
        "model": {**shape_dict, "total_params": shape.total_params},
        "setup": {
            **asdict(setup),
            "mode": setup.mode,
            "trainable_params": trainable,
            "frozen_params": frozen,
        },
        "hardware": asdict(hardware),
        "configs": [
            e.as_dict() | {"fits": choice.fits[e.config] is None, "exceeds": choice.fits[e.config]}
            for e in estimates
        ],
        "recommendation": {"config": choice.config, "reason": choice.reason},
    }
