"""Batch tokenized samples: pad what is per token, concatenate what is per image."""

from dataclasses import dataclass

import torch

from vlm_recipes.masking import IGNORE_INDEX, PER_TOKEN_KEYS


@dataclass
class ConversationCollator:
    pad_token_id: int
    # 8 keeps tensor-core friendly shapes on GPUs; 1 means "pad to the longest sample only".
    pad_to_multiple_of: int = 1

    def padding_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
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
