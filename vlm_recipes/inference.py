"""Load what a recipe saved (a full model or a PEFT adapter on its base) and generate answers."""

import json
import string
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.data import load_image
from vlm_recipes.masking import add_special_tokens_for, render

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_folder(path: Path) -> None:
    """A clear error, naming the folder and the fix, for a local folder that from_pretrained cannot load."""
    if (path / "adapter_config.json").is_file():
        return
    if not (path / "config.json").is_file():
        checkpoints = sorted(p.name for p in path.glob("checkpoint-*") if p.is_dir())
        hint = f" It holds {', '.join(checkpoints)}: pass one of those." if checkpoints else ""
        raise FileNotFoundError(
            f"{path} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json).{hint} "
            "Pass a recipe's output_dir or a checkpoint-* folder inside it."
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        # ZeRO-3 without stage3_gather_16bit_weights_on_model_save leaves only the sharded DeepSpeed state.
        shards = (path / "latest").is_file() or any(path.glob("global_step*"))
        fix = (
            f"it holds ZeRO shards only: python scripts/zero_to_hf.py {path} {path}-hf, then load {path}-hf"
            if shards
            else "the weights are missing; was the save interrupted?"
        )
        raise FileNotFoundError(f"{path} has a config.json but no model weights ({WEIGHT_FILES[0]}): {fix}")


def looks_like_a_path(name: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else was meant as a local folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_for_inference(
    model_name_or_path: str,
    dtype=None,
    device=None,
    trust_remote_code: bool = False,
    base_model_name_or_path: str | None = None,
):
    """(model, processor) from a recipe's output_dir, whichever it holds: full weights or a LoRA adapter.

    A LoRA adapter is put on the base model named in its adapter_config.json, or on base_model_name_or_path
    when given (the recorded name may be a path relative to where training ran).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (
        torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    )
    if Path(model_name_or_path).is_dir():
        check_model_folder(Path(model_name_or_path))
    elif looks_like_a_path(model_name_or_path):
        raise FileNotFoundError(
            f"{model_name_or_path} is not a folder; pass a recipe's output_dir, a checkpoint-* folder, or a Hub id"
        )
    adapter_config = Path(model_name_or_path, "adapter_config.json")
    if adapter_config.is_file():
        from peft import PeftModel

        base = base_model_name_or_path or json.loads(adapter_config.read_text())["base_model_name_or_path"]
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                base, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except OSError as error:
            raise FileNotFoundError(
                f"cannot load the base model {base!r} named in {adapter_config} ({error}). If it moved or was "
                "recorded as a path relative to where training ran, pass its location with "
                "--base_model_name_or_path."
            ) from error
        model = PeftModel.from_pretrained(model, model_name_or_path)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return model.to(device).eval(), processor


def user_turn(prompt: str, num_images: int) -> list[dict]:
    """A one-turn conversation: the images first, then the question, as LLaVA-style data puts them."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def answer_question(model, processor, prompt: str, images: list, max_new_tokens: int = 64) -> str:
    """The greedy answer to one question about zero or more images (paths or PIL images)."""
    return generate(model, processor, [user_turn(prompt, len(images))], [images], max_new_tokens)[0]


def split_prompt_and_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation before its last assistant turn, and that turn's text (the reference answer)."""
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    answer = "".join(part["text"] for part in messages[last]["content"] if part["type"] == "text")
    return messages[:last], answer


@torch.no_grad()
def generate(
    model, processor, prompts: list[list[dict]], images: list[list], max_new_tokens: int = 64
) -> list[str]:
    """Greedy answers for a batch of conversations (each ending with a user turn)."""
    texts = [render(processor, messages, add_generation_prompt=True) for messages in prompts]
    # One list of images per prompt, as apply_chat_template passes them: Gemma 3's processor counts images per prompt
    # and refuses a flat list; OneVision encodes a prompt's several images without their tiles.
    per_prompt = [[load_image(image) for image in sample] for sample in images]
    inputs = processor(
        text=texts,
        images=per_prompt if any(per_prompt) else None,
        padding=True,
        add_special_tokens=add_special_tokens_for(processor, texts[0]),
        return_tensors="pt",
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the usual VQA exact-match normalisation."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in {"a", "an", "the"})


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
