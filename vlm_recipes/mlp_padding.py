"""`--pad_mlp_widths` (auto by default): gated MLPs whose hidden width is not a multiple of 64 widened with zero units, so that
the GPU's matrix kernels take their products whole.

A bf16 matrix whose rows are not a multiple of 8 elements (16 bytes) wide cannot use Hopper's tensor-memory loads,
and cuBLAS falls back to older (sm80) kernels for every product that touches it. Qwen2.5-VL's vision blocks have a
3,420-wide MLP; in a compiled, packed Qwen2.5-VL-3B step on an H200 those fallback kernels took 15.7% of the GPU's
time (docs/benchmarks.md, "Where the GPU's time goes at steady state"). Padding 3,420 to 3,456:

    y = down(act(gate(x)) * up(x))      gate, up: 64 more output rows, zero weights and biases
                                        down: 64 more input columns, zero

The new units compute act(0) * 0 = 0, so the output is unchanged; their gradients are zero (down's new columns
multiply a zero activation, the gradient reaching the new units is down's zero columns times the output's), so
AdamW's moments for them stay zero and the update, weight decay included, leaves them zero. Exact for any
activation, because the gate's unit is multiplied by the up projection's zero. The state dict keeps the checkpoint's
widths: saving cuts the padding off (the saved model is the checkpoint's architecture, loadable anywhere) and
loading one (resuming from a checkpoint) pads it again.

Only for weights held whole on each process and trained in full: without DeepSpeed (ZeRO-3 partitions them as they
load; ZeRO-1/2's consolidated checkpoints would keep the padded widths), not with LoRA or 4-bit weights (adapters
would be saved at the padded width). `auto`, the default, pads wherever that holds: under the config `make train`
picks for a model that fits one GPU (single_gpu), not under the shared ZeRO-3 offload config. Gated MLPs are found
by the layer names most transformers models use (gate_proj, up_proj, down_proj), not by model.
"""

import torch
from torch import nn

from vlm_recipes.config import ConfigError

GATED_MLP = ("gate_proj", "up_proj", "down_proj")


def mlp_padding_problems(model_args, training_args) -> list[str]:
    """Why the weights cannot be widened in this run (none: they can)."""
    from vlm_recipes.ds_config import ds_config_in_use

    problems = []
    if ds_config_in_use(training_args) is not None:
        problems.append(
            "DeepSpeed holds the weights (ZeRO-3 partitions them as they load; ZeRO-1/2's consolidated checkpoints "
            "would keep the padded widths): launch without it, accelerate_configs/single_gpu.yaml and --deepspeed "
            "none, the config `make train` picks where the model fits one GPU"
        )
    if model_args.use_lora or getattr(model_args, "load_in_4bit", False):
        problems.append(
            "it is for full fine-tunes: adapters would be saved at the padded width (pass --use_lora false)"
        )
    return problems


def check_mlp_padding(model_args, training_args) -> None:
    """--pad_mlp_widths: a value it does not take, or `true` where it cannot run, fails here, before anything loads."""
    asked = str(model_args.pad_mlp_widths).lower()
    if asked not in ("auto", "true", "false"):
        raise ConfigError(f"--pad_mlp_widths takes auto, true or false, not {model_args.pad_mlp_widths!r}")
    problems = mlp_padding_problems(model_args, training_args) if asked == "true" else []
    if problems:
        raise ConfigError(
            "--pad_mlp_widths true cannot run as configured (auto would leave the widths as they are):\n  "
            + "\n  ".join(problems)
        )


def mlp_padding_applies(model_args, training_args) -> bool:
    """true, or auto where the weights are whole and fully trained (checked first by check_mlp_padding)."""
    asked = str(model_args.pad_mlp_widths).lower()
    return asked == "true" or (asked == "auto" and not mlp_padding_problems(model_args, training_args))


def pad_mlp_widths(model: nn.Module, model_args, training_args) -> None:
    """What the recipes call once the model is loaded: pad its gated MLPs where --pad_mlp_widths applies, and say
    so on the first process."""
    if not mlp_padding_applies(model_args, training_args):
        return
    padded = pad_gated_mlps(model)
    if padded and training_args.process_index == 0:
        print(padded, flush=True)


def pad_gated_mlps(model: nn.Module, multiple: int = 64) -> str | None:
    """Pad every gated MLP of `model` whose hidden width is not a multiple of `multiple`; says what it did (None:
    every one already was)."""
    padded: dict[tuple[int, int], int] = {}
    for module in model.modules():
        layers = [getattr(module, name, None) for name in GATED_MLP]
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            continue
        width = layers[0].out_features
        if width % multiple == 0 or layers[1].out_features != width or layers[2].in_features != width:
            continue
        wider = -(-width // multiple) * multiple
        widen_hidden_layer(module, expand=GATED_MLP[:2], contract=GATED_MLP[2:], width=wider)
        padded[(width, wider)] = padded.get((width, wider), 0) + 1
    if not padded:
        return None
    return "--pad_mlp_widths: " + "; ".join(
        f"{count} MLPs widened from {width:,} to {wider:,} with zero units (saved at {width:,})"
        for (width, wider), count in padded.items()
    )


def widen_hidden_layer(
    module: nn.Module, expand: tuple[str, ...], contract: tuple[str, ...], width: int
) -> None:
    """The Linear children `expand` get `width` output rows and `contract` `width` input columns, the new ones zero;
    the module's state dict keeps the old width, saved and loaded (hooks)."""
    original = getattr(module, expand[0]).out_features
    for name in expand:
        layer = getattr(module, name)
        layer.weight = nn.Parameter(grown(layer.weight, 0, width), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            layer.bias = nn.Parameter(grown(layer.bias, 0, width), requires_grad=layer.bias.requires_grad)
        layer.out_features = width
    for name in contract:
        layer = getattr(module, name)
        layer.weight = nn.Parameter(grown(layer.weight, 1, width), requires_grad=layer.weight.requires_grad)
        layer.in_features = width

    def cut_to_original(module, state_dict, prefix, local_metadata):
        for name in expand:
            for tensor in ("weight", "bias"):
                key = f"{prefix}{name}.{tensor}"
                if key in state_dict:
                    state_dict[key] = state_dict[key][:original]
        for name in contract:
            key = f"{prefix}{name}.weight"
            if key in state_dict:  # a column slice is not contiguous; safetensors writes contiguous tensors
                state_dict[key] = state_dict[key][:, :original].contiguous()

    def pad_to_width(module, state_dict, prefix, *args):
        for name in expand:
            for tensor in ("weight", "bias"):
                key = f"{prefix}{name}.{tensor}"
                if key in state_dict and state_dict[key].shape[0] == original:
                    state_dict[key] = grown(state_dict[key], 0, width)
        for name in contract:
            key = f"{prefix}{name}.weight"
            if key in state_dict and state_dict[key].shape[1] == original:
                state_dict[key] = grown(state_dict[key], 1, width)

    module.register_state_dict_post_hook(cut_to_original)
    module.register_load_state_dict_pre_hook(pad_to_width)


def grown(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`tensor` with zeros appended along `dim` up to `size`."""
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    zeros = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor.detach(), zeros], dim=dim)
