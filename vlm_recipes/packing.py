"""Sequence packing (`--packing true`): several samples in one row of at most --max_length tokens, so that a batch of
samples of mixed lengths spends almost nothing on padding.

    train_dataset = PackedDataset(train_dataset, data_args.max_length)   # bins from the preflight's lengths
    collator = ConversationCollator(processor, packing=True, ...)       # one row per bin

Each row carries `position_ids` that restart at 0 for every sample and no attention mask: transformers then builds
a block-diagonal causal mask from the positions (sdpa, eager) or hands the boundaries to a varlen kernel (flash
attention), so no token attends across a sample boundary. A sample's first token gets no label, as in a row of its
own, where nothing predicts it. Images keep their order, so the model matches them to their tokens as before. Models
whose rotary positions are not 1-D (Qwen-VL's temporal/height/width positions) compute them for the packed row in the
recipe's MODEL-SPECIFIC block (`packed_position_ids`), called by RecipeTrainer.
"""

import torch
from torch.utils.data import Dataset

# In a packed batch: how many of its tokens are samples' (not padding), for the run's padding figures; taken out
# (model_inputs) before the model sees the batch.
REAL_TOKENS = "real_tokens"


def pack_indices(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices in bins of at most `capacity` tokens (first-fit decreasing: longest first, each into the first
    bin it fits, so bins come out nearly full); a sample longer than `capacity` gets a bin of its own. Deterministic,
    so every process builds the same bins from the same preflight."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = lengths[index]
        target = next((k for k, free in enumerate(room) if free >= length), None)
        if target is None:
            bins.append([index])
            room.append(capacity - length)
        else:
            bins[target].append(index)
            room[target] -= length
    return [sorted(members) for members in bins]


class PackedDataset(Dataset):
    """A ConversationDataset seen as bins of samples: item k is the list of bin k's samples (the collator makes one
    row of them). `lengths` are the bins' tokens, so --train_sampling_strategy group_by_length still works."""

    def __init__(self, dataset, capacity: int):
        lengths = getattr(dataset, "lengths", None)
        if lengths is None or len(lengths) != len(dataset):
            raise ValueError("packing needs each sample's length from the preflight (vlm_recipes.preflight)")
        self.dataset, self.capacity = dataset, capacity
        self.bins = pack_indices(list(lengths), capacity)
        self.lengths = [sum(lengths[index] for index in members) for members in self.bins]
        self.processor = dataset.processor

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, k: int) -> list[dict]:
        return [self.dataset[index] for index in self.bins[k]]

    def describe(self) -> str:
        samples, tokens = sum(len(members) for members in self.bins), sum(self.lengths)
        return (
            f"packing: {samples:,} samples into {len(self.bins):,} rows of at most {self.capacity:,} tokens "
            f"({tokens / (len(self.bins) * self.capacity):.1%} full on average)"
        )


def model_inputs(batch: dict, model, packed_position_ids=None) -> dict:
    """What the model is called with for a packed batch: without REAL_TOKENS, with use_cache off (a model that makes
    itself a KV cache skips transformers' packed-sequence masking, and the samples would see each other), and with
    the recipe's positions where its model's are not 1-D. `model`: the bare model (not a DeepSpeed or PEFT wrapper)."""
    batch = {key: value for key, value in batch.items() if key != REAL_TOKENS}
    batch["use_cache"] = False
    if packed_position_ids is not None:
        with torch.no_grad():
            batch["position_ids"] = packed_position_ids(model, batch)
    return batch


def sample_positions(lengths: list[int]) -> torch.Tensor:
    """Each sample's positions 0..n-1, one after another."""
    return torch.cat([torch.arange(length) for length in lengths])
