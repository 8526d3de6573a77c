"""Batch tokenized samples: pad what is per token, concatenate what is per image."""

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlm_recipes.masking import IGNORE_INDEX, PER_TOKEN_KEYS, add_special_tokens_for, render

VISION_INPUT_KEYS = ("pixel_values", "pixel_values_videos")


def blank_image_row(processor) -> dict[str, torch.Tensor]:
    """One unlabelled sample holding a single blank image, built with the model's own template and processor."""
    text = render(processor, [{"role": "user", "content": [{"type": "image"}]}])
    encoded = processor(
        text=[text],
        images=[Image.new("RGB", (64, 64))],
        add_special_tokens=add_special_tokens_for(processor, text),
        return_tensors="pt",
    )
    row = {key: value[0] if key in PER_TOKEN_KEYS else value for key, value in encoded.items()}
    row["labels"] = torch.full_like(row["input_ids"], IGNORE_INDEX)
    return row


@dataclass
class ConversationCollator:
    processor: Any
    # 8 keeps tensor-core friendly shapes on GPUs; 1 means "pad to the longest sample only".
    pad_to_multiple_of: int = 1
    # Under ZeRO-3 every rank gathers the vision tower's weights when it runs it. A rank whose micro-batch has
    # no image skips those collectives and the other ranks wait forever. A batch without images therefore
    # gets one extra row: a blank image and no labels. The vision tower runs on every rank, and since the row
    # has no labels and rows never attend to each other, the loss and the gradients are unchanged.
    guard_text_only_batches: bool = True
    _blank_row: dict | None = field(default=None, init=False, repr=False)

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def padding_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if self.guard_text_only_batches and not any(key in s for s in samples for key in VISION_INPUT_KEYS):
            if self._blank_row is None:
                self._blank_row = blank_image_row(self.processor)
            samples = [*samples, self._blank_row]
        longest = max(len(sample["input_ids"]) for sample in samples)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key in set().union(*(sample.keys() for sample in samples)):
            present = [sample[key] for sample in samples if key in sample]
            if key in PER_TOKEN_KEYS:
                padded = torch.full((len(samples), length), self.padding_value(key), dtype=present[0].dtype)
                for row, sample in enumerate(samples):
                    if key in sample:
                        padded[row, : len(sample[key])] = sample[key]
                batch[key] = padded
            else:
                # Pixel values, image grids and sizes are per image: the model matches them to the image
                # tokens in order, so text-only samples simply contribute none.
                batch[key] = torch.cat(present, dim=0)
        return batch
