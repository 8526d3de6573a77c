"""Where a recipe's model keeps its parts (vision tower, projector, language model), and what each part does in a
run: what --freeze_* freezes, where LoRA adapters go, what is saved next to an adapter, what QLoRA keeps in 16 bits,
and how the memory planner counts parameters. A recipe names the paths once, in its MODEL-SPECIFIC block; nothing
here knows a model family.

    PARTS = ModelParts(vision_tower="model.vision_tower", projector=("model.multi_modal_projector",),
                       language_model="model.language_model")
    freeze_parts(model, PARTS, model_args)
    model = get_peft_model(model, adapters_for(model, PARTS, model_args))
"""

from dataclasses import dataclass

import torch


def as_paths(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class ModelParts:
    """Dotted paths from the loaded model, as `named_modules()` / `named_parameters()` print them. Each part may be
    given as several paths: those the checkpoint has are used, the others skipped. So one recipe serves sibling
    architectures (Qwen2-VL has no deepstack mergers; LLaVA-1.5 has no image_newline) and the generic recipe names
    the usual alternatives (model.vision_tower or model.vision_model). A projector path inside the vision tower
    (Qwen's merger) is set after it."""

    vision_tower: str | tuple[str, ...]
    projector: tuple[str, ...]  # modules or single parameters; trained in full unless --freeze_projector
    language_model: str | tuple[str, ...]
    output_head: str = "lm_head"
    vision_lora_scope: str | None = None  # where vision LoRA adapters go; default: the whole vision tower

    def role_of(self, parameter_name: str) -> str:
        """ "projector", "vision" or "language" for a parameter name of the model (the planner's split)."""
        if any(within(parameter_name, path) for path in self.projector):
            return "projector"
        return "vision" if any(within(parameter_name, p) for p in as_paths(self.vision_tower)) else "language"

    def kept_in_16_bit(self) -> list[str]:
        """The modules QLoRA must not quantize: the vision tower, the projector and the output head, so the projector
        trains in full and the adapter merges into 16 bits. Full paths: transformers 5 matches these from the start
        of a module's name (or as its end), so a bare "multi_modal_projector" would not keep
        "model.multi_modal_projector.linear_1" (as measured on an H200: the projector was saved in 4 bits)."""
        return [*as_paths(self.vision_tower), *self.projector, self.output_head]


def within(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def find_part(model: torch.nn.Module, path: str) -> torch.nn.Module | torch.nn.Parameter | None:
    """The module or parameter at `path` (a PEFT-wrapped model is looked into), or None if this model has none."""
    for candidate in (path, f"base_model.model.{path}"):
        for getter in (model.get_submodule, model.get_parameter):
            try:
                return getter(candidate)
            except AttributeError:
                continue
    return None


def present(model, paths) -> list[str]:
    """The paths of `paths` this model has."""
    return [path for path in as_paths(paths) if find_part(model, path) is not None]


def set_trainable(part, requires_grad: bool) -> None:
    parameters = [part] if isinstance(part, torch.nn.Parameter) else part.parameters()
    for parameter in parameters:
        parameter.requires_grad_(requires_grad)


def require_parts(model, parts: ModelParts) -> None:
    """Refuse a model whose vision tower, language model or output head is not where the recipe's block says: a
    copied recipe whose paths were not updated would otherwise train the wrong parameters."""
    from vlm_recipes.config import ConfigError

    wanted = {
        "vision tower": parts.vision_tower,
        "language model": parts.language_model,
        "output head": parts.output_head,
    }
    missing = [
        f"{what} ({' or '.join(as_paths(paths))})"
        for what, paths in wanted.items()
        if not present(model, paths)
    ]
    if missing:
        tops = ", ".join(f"{name}.{child}" for name, module in model.named_children()
                         for child, _ in module.named_children())  # fmt: skip
        raise ConfigError(
            f"{type(model).__name__} has no {'; no '.join(missing)}: the MODEL-SPECIFIC block's PARTS name paths this "
            f"model does not have (its modules two levels down: {tops}; print(model) shows the rest). Copy the recipe "
            "and write this model's paths into PARTS."
        )


def freeze_parts(model, parts: ModelParts, model_args) -> None:
    """--freeze_vision_tower / --freeze_projector / --freeze_language_model, the tower before the projector inside
    it (Qwen's merger)."""
    require_parts(model, parts)
    for path in present(model, parts.vision_tower):
        set_trainable(find_part(model, path), not model_args.freeze_vision_tower)
    for path in present(model, parts.projector):
        set_trainable(find_part(model, path), not model_args.freeze_projector)
    for path in present(model, (*as_paths(parts.language_model), parts.output_head)):
        set_trainable(find_part(model, path), not model_args.freeze_language_model)


def adapters_for(model, parts: ModelParts, model_args):
    """The PEFT config of --use_lora (--use_dora): adapters on --lora_target_modules inside the language model and
    on --lora_vision_target_modules inside the vision tower's LoRA scope; the projector's modules, unless frozen,
    are trained in full and saved with the adapter (a projector held as a bare parameter, LLaVA-NeXT's
    image_newline, keeps its loaded value: PEFT saves modules only)."""
    from vlm_recipes.training import lora_config

    to_save = [
        leaf(path)
        for path in present(model, parts.projector)
        if isinstance(find_part(model, path), torch.nn.Module) and not model_args.freeze_projector
    ]
    targets = {path: model_args.lora_target_modules for path in present(model, parts.language_model)}
    for path in present(model, parts.vision_lora_scope or parts.vision_tower):
        targets[path] = model_args.lora_vision_target_modules
    return lora_config(model_args, targets, modules_to_save=to_save)
