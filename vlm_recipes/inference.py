"""Load what a recipe saved (a full model or a PEFT adapter on its base) and generate answers."""

import json
import string
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.data import load_image
from vlm_recipes.masking import add_special_tokens_for, render


def load_for_inference(model_name_or_path: str, dtype=None, device=None, trust_remote_code: bool = False):
    """(model, processor) from a recipe's output_dir, whichever it holds: full weights or a LoRA adapter."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (
        torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    )
    adapter_config = Path(model_name_or_path, "adapter_config.json")
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForImageTextToText.from_pretrained(
            base, dtype=dtype, trust_remote_code=trust_remote_code
        )
        model = PeftModel.from_pretrained(model, model_name_or_path)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return model.to(device).eval(), processor


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
    flat_images = [load_image(image) for sample in images for image in sample]
    inputs = processor(
        text=texts,
        images=flat_images or None,
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
