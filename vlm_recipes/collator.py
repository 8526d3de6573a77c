"""Batch tokenized samples: pad what is per token, concatenate what is per image."""

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlm_recipes.masking import IGNORE_INDEX, PER_TOKEN_KEYS, add_special_tokens_for, render
from vlm_recipes.packing import REAL_TOKENS, sample_positions


def blank_media(kind: str, frames: int = 2) -> dict:
    """The processor arguments for one blank image, or one blank video of `frames` frames (a list of frames)."""
    frame = Image.new("RGB", (64, 64))
    return {"images": [frame]} if kind == "image" else {"videos": [[frame] * frames]}


def blank_row(processor, kind: str, frames: int = 2) -> dict[str, torch.Tensor]:
    """One unlabelled sample holding a single blank image or video, built with the model's own template and
    processor."""
    text = render(processor, [{"role": "user", "content": [{"type": kind}]}])
    encoded = processor(
        text=[text],
        **blank_media(kind, frames),
        add_special_tokens=add_special_tokens_for(processor, text),
        return_tensors="pt",
    )
    row = {key: value[0] if key in PER_TOKEN_KEYS else value for key, value in encoded.items()}
    row["labels"] = torch.full_like(row["input_ids"], IGNORE_INDEX)
    return row


def media_keys(row: dict) -> frozenset[str]:
    """The keys that carry a row's visual input (pixel values, grids, sizes): everything that is not per token."""
    return frozenset(key for key in row if key not in PER_TOKEN_KEYS)


@dataclass
class ConversationCollator:
    processor: Any
    # 8 keeps tensor-core friendly shapes on GPUs; 1 means "pad to the longest sample only".
    pad_to_multiple_of: int = 1
    # Under ZeRO-3 every rank gathers the vision tower's weights each time it runs it, and the ranks must make the
    # same gathers in the same order. A rank whose micro-batch has no image skips them and the other ranks wait
    # forever; and models that run the tower once for images and once more for videos (Qwen-VL) make two calls on a
    # rank whose batch holds both and one on a rank whose batch holds images only ("collective mismatch" on gloo, a
    # hang on NCCL). So every micro-batch holds every kind in `media_kinds` (the kinds the dataset has): a batch
    # missing one gets an extra row with a blank image or video and no labels. Every rank then makes the same
    # vision-tower calls, and since the row has no labels and rows never attend to each other, the loss and the
    # gradients are unchanged.
    guard_text_only_batches: bool = True
    media_kinds: tuple[str, ...] = ("image",)
    # --packing true: each item is a bin of samples (packing.PackedDataset), made into one row with per-sample
    # position_ids and no attention mask (see vlm_recipes/packing.py).
    packing: bool = False
    _blank_rows: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.guard_text_only_batches:
            self.blank_rows()  # now, so that a processor that cannot build one fails before any training

    def blank_rows(self) -> dict[str, dict]:
        """kind -> its blank row, built once."""
        for kind in self.media_kinds:
            if kind not in self._blank_rows:
                self._blank_rows[kind] = blank_row(self.processor, kind)
        return self._blank_rows

    def guard_rows(self, samples: list[dict]) -> list[dict]:
        """The blank rows this micro-batch needs: one for each kind in media_kinds that none of its samples has."""
        present = set().union(*(sample.keys() for sample in samples))
        return [row for row in self.blank_rows().values() if not media_keys(row) & present]

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def padding_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            return self.packed_batch([item if isinstance(item, list) else [item] for item in samples])
        if self.guard_text_only_batches:
            samples = [*samples, *self.guard_rows(samples)]
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
                batch[key] = concatenate_padded(present)
        return batch

    def packed_batch(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        """One row per bin: its samples' tokens one after another, position_ids restarting at each sample, and the
        first token of each sample unlabelled (in a row of its own nothing predicts it); the ZeRO-3 guard's blank
        rows join the last row as samples of their own. Padding after a row's samples is a segment of its own."""
        if self.guard_text_only_batches:
            rows[-1] = [*rows[-1], *self.guard_rows([sample for row in rows for sample in row])]
        lengths = [[len(sample["input_ids"]) for sample in row] for row in rows]
        longest = max(sum(row) for row in lengths)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        samples = [sample for row in rows for sample in row]
        batch = {}
        for key in {key for sample in samples for key in sample if key in PER_TOKEN_KEYS} - {
            "attention_mask"
        }:
            template = next(sample[key] for sample in samples if key in sample)
            padded = torch.full((len(rows), length), self.padding_value(key), dtype=template.dtype)
            for r, row in enumerate(rows):
                pieces = [self.packed_piece(sample, key) for sample in row]
                tokens = torch.cat(pieces)
                padded[r, : len(tokens)] = tokens
            batch[key] = padded
        batch["position_ids"] = torch.stack(
            [sample_positions([*row, length - sum(row)] if sum(row) < length else row) for row in lengths]
        )
        for key in {key for sample in samples for key in sample if key not in PER_TOKEN_KEYS}:
            batch[key] = concatenate_padded([sample[key] for sample in samples if key in sample])
        batch[REAL_TOKENS] = torch.tensor(sum(map(sum, lengths)))
        return batch

    def packed_piece(self, sample: dict, key: str) -> torch.Tensor:
        if key not in sample:
            return torch.full_like(sample["input_ids"], self.padding_value(key))
        if key != "labels":
            return sample[key]
        labels = sample[key].clone()
        labels[0] = IGNORE_INDEX
        return labels


def concatenate_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-image tensors along their first dimension, padding every other dimension with zeros to the
    largest: what a processor itself does to the images of one call, so the batch is what it would have made of all
    the samples at once. Any-resolution tiling (LLaVA-NeXT, OneVision) gives each image its own number of tiles;
    the model reads the real ones from image_sizes and drops the padding."""
    widest = [max(sizes) for sizes in zip(*(tensor.shape[1:] for tensor in tensors), strict=True)]
    if all(list(tensor.shape[1:]) == widest for tensor in tensors):
        return torch.cat(tensors, dim=0)
    padded = []
    for tensor in tensors:
        pad = []
        for have, want in zip(reversed(tensor.shape[1:]), reversed(widest), strict=True):
            pad += [0, want - have]  # torch's pad lists the last dimension first
        padded.append(torch.nn.functional.pad(tensor, pad))
    return torch.cat(padded, dim=0)
