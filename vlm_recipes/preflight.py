"""Preflight: turn every record into a training sample once, before any weights are loaded, and report every
record that would fail mid-run (a corrupt image, an image span cut by max_length, no assistant tokens left...).

Its result (each record's problem or its image sizes and token length) is cached in <cache>/preflight/ (see
vlm_recipes/records.py for <cache>), keyed by the records (the parsed file, every image's path, size and mtime, the
records kept), the processor (settings, chat template, tokenizer), max_length and PREFLIGHT_VERSION: a re-run or a
resume with the same inputs reads it back in seconds. While it checks, process 0 prints its progress every 30 s.

Used by every recipe and by scripts/validate_data.py. By default all problems are listed and the run stops;
with skip_bad_records the bad records are dropped, and how many and which is always printed.

Under a launcher, each process checks every world_size-th record and the results are gathered, so every record
is decoded and tokenized once in the whole run (not once per process) and every process keeps the same records.
Process 0 prints the report.

The same pass measures every decoded image against what the model's image processor does with it, and says
how many images it downscales (losing detail: small findings on an X-ray), upscales, or crops or stretches out of
shape, each with the most extreme one and its record. Only an image the processor refuses is a problem.
"""

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vlm_recipes.data import DataError, keep_records
from vlm_recipes.masking import media_tokens_for
from vlm_recipes.records import cache_home

SHOWN_PROBLEMS = 50
# Beyond 2:1 against the model's input shape, a centre crop drops more than half of an image and a stretch
# squeezes one axis to less than half the scale of the other.
EXTREME_ASPECT_RATIO = 2.0
PROGRESS_EVERY_S = 30.0  # a progress line this often while a large dataset is checked


@dataclass(frozen=True)
class PixelBudget:
    """Image processors that keep a pixel budget (transformers' `smart_resize`): the aspect ratio is kept and the
    area brought into [min_pixels, max_pixels], each edge a multiple of the patch size."""

    min_pixels: int
    max_pixels: int
    max_aspect_ratio: ClassVar[float] = 200.0  # smart_resize raises a ValueError beyond it
    larger: ClassVar[str] = "over max_pixels"
    smaller: ClassVar[str] = "under min_pixels"
    to_keep_detail: ClassVar[str] = (
        "; raise --max_pixels to keep more (more image tokens and memory per image)"
    )

    def describe(self) -> str:
        return (
            f"resizes each into {self.min_pixels:,}..{self.max_pixels:,} pixels (min_pixels..max_pixels), "
            "keeping its aspect ratio"
        )

    def scale(self, width: int, height: int) -> float:
        """The factor each edge is resized by: below 1 the image is shrunk, above 1 enlarged."""
        area = width * height
        target = min(max(area, self.min_pixels), self.max_pixels)
        return math.sqrt(target / area)

    def aspect_mismatch(self, width: int, height: int) -> float:
        return 1.0  # the aspect ratio is kept

    def refusal(self, width: int, height: int) -> str | None:
        ratio = max(width, height) / min(width, height)
        if ratio <= self.max_aspect_ratio:
            return None
        return (
            f"image {width}x{height} has an aspect ratio of {ratio:.0f}:1, and the image processor refuses more "
            f"than {self.max_aspect_ratio:.0f}:1; crop it, pad it, or cut a long strip into several images"
        )


@dataclass(frozen=True)
class FixedSize:
    """CLIP/SigLIP-style image processors: every image becomes width x height, either resized so its shortest
    edge is `shortest_edge` and centre-cropped (CLIP), or stretched to it (shortest_edge None, SigLIP)."""

    width: int
    height: int
    shortest_edge: int | None
    to_keep_detail: ClassVar[str] = ""

    @property
    def larger(self) -> str:
        return f"larger than the model's {self.width}x{self.height} input"

    @property
    def smaller(self) -> str:
        return f"smaller than the model's {self.width}x{self.height} input"

    def describe(self) -> str:
        if self.shortest_edge:
            return (
                f"resizes each so its shortest edge is {self.shortest_edge}, then keeps the centre "
                f"{self.width}x{self.height}"
            )
        return f"stretches each to {self.width}x{self.height}"

    def scale(self, width: int, height: int) -> float:
        if self.shortest_edge:
            return self.shortest_edge / min(width, height)
        return math.sqrt(self.width * self.height / (width * height))  # the mean over the two edges

    def aspect_mismatch(self, width: int, height: int) -> float:
        ratio = (width / height) / (self.width / self.height)
        return max(ratio, 1 / ratio)

    def distortion(self, width: int, height: int) -> str:
        if not self.shortest_edge:
            return f"stretched {self.aspect_mismatch(width, height):.1f}x out of shape"
        scale = self.scale(width, height)
        kept = min(self.width, width * scale) * min(self.height, height * scale) / (width * height * scale**2)
        return f"the crop keeps {kept:.1%} of it"

    def refusal(self, width: int, height: int) -> str | None:
        return None


def size_entry(size, key: str) -> int | None:
    """A value of an image processor's `size`/`crop_size`: a SizeDict, a plain dict, or absent."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def image_fit_of(processor) -> PixelBudget | FixedSize | None:
    """How the processor's image processor fits an image to the model, read from its settings and, for a pixel
    budget, confirmed by probe images; None when it resizes in a way the preflight does not know (the report then
    says so)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not getattr(image_processor, "do_resize", True):
        return None
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    shortest_edge = size_entry(size, "shortest_edge")
    crops = getattr(image_processor, "do_center_crop", False)
    budget = pixel_budget_of(processor, image_processor)
    if budget is not None:
        return budget
    if getattr(image_processor, "do_pad", False):
        return None  # padded to a square first (LLaVA's own processor, on request): not measured here
    if crops and shortest_edge and size_entry(crop, "height"):
        return FixedSize(size_entry(crop, "width"), size_entry(crop, "height"), shortest_edge)
    if not crops and size_entry(size, "height") and size_entry(size, "width"):
        return FixedSize(size_entry(size, "width"), size_entry(size, "height"), shortest_edge=None)
    return None


def pixel_budget_of(processor, image_processor) -> PixelBudget | None:
    """A pixel budget where the settings name one (min_pixels / max_pixels, or a size whose shortest_edge and
    longest_edge hold them, as transformers' smart_resize processors keep them) and the processor behaves as one."""
    size = getattr(image_processor, "size", None)
    low = (
        getattr(image_processor, "min_pixels", None)
        or size_entry(size, "min_pixels")
        or size_entry(size, "shortest_edge")
    )
    high = (
        getattr(image_processor, "max_pixels", None)
        or size_entry(size, "max_pixels")
        or size_entry(size, "longest_edge")
    )
    if not (low and high and low < high) or not behaves_as_a_pixel_budget(processor, high):
        return None
    return PixelBudget(min_pixels=low, max_pixels=high)


def behaves_as_a_pixel_budget(processor, max_pixels: int) -> bool:
    """Probe images through the processor: a pixel budget gives a square image of max_pixels about four times the
    tokens of one a quarter its area, and one larger still about the same tokens (it is shrunk to the budget). An
    edge length read as an area, or a fixed input size, fails one of the two."""
    side = math.isqrt(max_pixels)
    try:
        quarter, at_cap, above = (
            media_tokens_for(processor, "image", s, s) for s in (side // 2, side, side * 3 // 2)
        )
    except Exception:  # no chat template or image token to count: a processor this check cannot probe
        return False
    return quarter > 0 and 3.0 <= at_cap / quarter <= 5.0 and abs(above - at_cap) <= 0.1 * at_cap


@dataclass
class CheckedRecord:  # small: every process receives every other's
    index: int
    problem: str | None  # None when the record becomes a training sample
    image_sizes: list[tuple[int, int]]  # (width, height) of each image, as decoded
    length: int = 0  # the sample's tokens, image tokens included
    video_frames: list[int] = field(default_factory=list)  # frames of each video given as a list of frames


class RecordCheck(Dataset):
    """Item k checks record indices[k] of `dataset`: its images are decoded once, measured, then tokenized."""

    def __init__(self, dataset, indices: list[int], fit):
        self.dataset, self.indices, self.fit = dataset, indices, fit

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> CheckedRecord:
        index = self.indices[k]
        checked = CheckedRecord(index, None, [])
        try:
            images, videos = self.dataset.decode_media(index)
            checked.image_sizes = [image.size for image in images]
            checked.video_frames = [len(frames) for frames in videos if isinstance(frames, list)]
            refusals = [self.fit.refusal(*size) for size in checked.image_sizes] if self.fit else []
            refusal = next((r for r in refusals if r), None)
            if refusal:  # checked before the processor, which would refuse it without naming the record
                checked.problem = f"{self.dataset.records[index]['source']}: {refusal}"
                return checked
            checked.length = len(self.dataset.tokenize(index, images, videos)["input_ids"])
        except DataError as error:
            checked.problem = str(error)
        return checked


def check_records(dataset, indices: list[int], fit, num_workers: int = 0, log=None) -> list[CheckedRecord]:
    """The records at `indices`, checked; with `log`, a progress line every PROGRESS_EVERY_S seconds."""
    loader = DataLoader(
        RecordCheck(dataset, indices, fit), batch_size=64, num_workers=num_workers, collate_fn=list
    )
    checked, start = [], time.monotonic()
    last = start
    for batch in loader:
        checked.extend(batch)
        now = time.monotonic()
        if log is not None and now - last >= PROGRESS_EVERY_S and len(checked) < len(indices):
            last, rate = now, len(checked) / (now - start)
            left = (len(indices) - len(checked)) / rate
            log(
                f"preflight: {len(checked):,} of {len(indices):,} records checked by this process, "
                f"{rate:,.0f} records/s, about {f'{left:.0f} s' if left < 120 else f'{left / 60:.0f} min'} left"
            )
    return checked


def process_rank_and_count() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_every_record(dataset, fit, num_workers: int = 0, log=None) -> tuple[list[CheckedRecord], list[int]]:
    """Every record checked once across the processes of the run: (results in record order, how many records
    each process checked). Every process gets the same results."""
    rank, world_size = process_rank_and_count()
    shared_out = list(range(rank, len(dataset), world_size))
    own = check_records(dataset, shared_out, fit, num_workers, log if rank == 0 else None)
    if world_size == 1:
        return own, [len(own)]
    parts = [None] * world_size
    dist.all_gather_object(parts, own)
    merged = sorted((checked for part in parts for checked in part), key=lambda checked: checked.index)
    return merged, [len(part) for part in parts]


@dataclass(frozen=True)
class MeasuredImage:
    record: int  # the index of the record it belongs to (its source is looked up only for the ones reported)
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def some(images: list, count: int) -> str:
    return f"{len(images)} of {count} images {'is' if len(images) == 1 else 'are'}"


def image_report(fit, images: list[MeasuredImage], what: str, processor, source_of) -> list[str]:
    """Lines about the images of the records that become samples: their sizes, what the image processor does
    to them, and how many it shrinks, enlarges or bends out of shape, each with its most extreme example."""
    if not images:
        return []
    count = len(images)
    smallest = min(images, key=lambda image: image.width * image.height)
    largest = max(images, key=lambda image: image.width * image.height)
    header = f"preflight: {count} images of {what}, {smallest} to {largest}; "
    if fit is None:
        name = type(getattr(processor, "image_processor", None)).__name__
        return [
            header + f"how {name} resizes them is not known to the preflight, so detail lost is not reported"
        ]
    lines = [header + f"the image processor {fit.describe()}"]

    def scale(image):
        return fit.scale(image.width, image.height)

    def mismatch(image):
        return fit.aspect_mismatch(image.width, image.height)

    if shrunk := [image for image in images if scale(image) < 1]:
        most = min(shrunk, key=scale)
        lines.append(
            f"preflight: {some(shrunk, count)} {fit.larger} and downscaled, losing detail; the "
            f"largest, {most} ({1 / scale(most):.1f}x smaller per edge), is {source_of(most.record)}{fit.to_keep_detail}"
        )
    if enlarged := [image for image in images if scale(image) > 1]:
        most = max(enlarged, key=scale)
        lines.append(
            f"preflight: {some(enlarged, count)} {fit.smaller} and upscaled; the smallest, {most} (enlarged "
            f"{scale(most):.1f}x per edge), is {source_of(most.record)}"
        )
    if bent := [image for image in images if mismatch(image) > EXTREME_ASPECT_RATIO]:
        most = max(bent, key=mismatch)
        lines.append(
            f"preflight: {some(bent, count)} more than {EXTREME_ASPECT_RATIO:.0f}:1 off the model's "
            f"shape; the most extreme, {most} ({fit.distortion(most.width, most.height)}), is {source_of(most.record)}; pad "
            "such images to the model's shape beforehand if their edges matter"
        )
    return lines


PREFLIGHT_VERSION = 2  # bump when what a check finds changes: every cached result is then checked again


def processor_fingerprint(processor) -> str:
    """What of the processor decides a record's check: its class, settings (pixel caps included), chat
    template and tokenizer."""
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        settings = processor.to_json_string()
    except (TypeError, ValueError, AttributeError):
        settings = repr(vars(getattr(processor, "image_processor", processor)))
    parts = [
        type(processor).__name__, settings, str(getattr(processor, "chat_template", "")),
        backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        repr(sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())),
    ]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def preflight_cache_file(dataset) -> Path | None:
    """Where this dataset's check is cached: keyed by the records (the parsed file, every image's path, size and
    mtime, the records kept), the processor, max_length and PREFLIGHT_VERSION. None for records not read
    through the records cache (a list of records built in code)."""
    fingerprint = getattr(dataset.records, "fingerprint", None)
    if not fingerprint:
        return None
    parts = [
        fingerprint,
        processor_fingerprint(dataset.processor),
        str(dataset.max_length),
        str(PREFLIGHT_VERSION),
    ]
    return cache_home() / "preflight" / f"{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:24]}.json"


def read_cached_checks(path: Path | None, count: int) -> list[CheckedRecord] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError, AttributeError):
        return None
    if len(stored) != count:
        return None
    return [CheckedRecord(k, problem, [tuple(size) for size in sizes], length)
            for k, (problem, sizes, length) in enumerate(stored)]  # fmt: skip


def write_cached_checks(path: Path, checked: list[CheckedRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps([[c.problem, c.image_sizes, c.length] for c in checked]))
    os.replace(partial, path)  # whole or not at all


def same_on_every_process(value):
    """Process 0's value, on every process (so that all take the same branch around collective calls)."""
    if process_rank_and_count()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def frames_are_a_dimension(processor) -> bool:
    """Whether the processor keeps a video's frames as a tensor dimension (LLaVA-OneVision: videos x frames x pixels),
    so that videos of different lengths cannot share a batch (zero frames added to fit would be read as frames), rather
    than as a flat run of patches with a per-video grid (Qwen-VL). Probed with blank videos of 2 and 3 frames."""
    from vlm_recipes.collator import blank_row, media_keys

    try:
        rows = [blank_row(processor, "video", frames) for frames in (2, 3)]
    except Exception:  # a processor without videos: nothing to keep apart
        return False
    shapes = [{key: tuple(row[key].shape[1:]) for key in media_keys(row)} for row in rows]
    return shapes[0] != shapes[1]


def frame_count_problems(checked: list[CheckedRecord], dataset, batch_size: int) -> dict[int, str]:
    """record index -> why its videos cannot be batched, where the processor stacks frames: a sample's videos of
    different lengths, and (with more than one sample per micro-batch) videos whose frame count is not the dataset's
    most common."""
    counts = Counter(n for c in checked if c.problem is None for n in c.video_frames)
    mixed = [
        c for c in checked if len(set(c.video_frames)) > 1
    ]  # the processor refuses these, in its own words
    if (len(counts) < 2 and not mixed) or not frames_are_a_dimension(dataset.processor):
        return {}
    usual = (counts or Counter(n for c in mixed for n in c.video_frames)).most_common(1)[0][0]
    fix = (
        f"{type(dataset.processor).__name__} stacks a video's frames, so the videos of one micro-batch must have "
        f"as many frames each: give every video {usual} frames (the most common count here)"
    )
    problems = {}
    for c in mixed:
        source = dataset.records[c.index]["source"]
        problems[c.index] = f"{source}: its videos have {sorted(c.video_frames)} frames; {fix}"
    for c in checked:
        if c.problem is not None or not c.video_frames:
            continue
        source = dataset.records[c.index]["source"]
        if batch_size > 1 and c.video_frames[0] != usual:
            problems[c.index] = (
                f"{source}: its video has {c.video_frames[0]} frames; {fix}, or train with "
                "--per_device_train_batch_size 1"
            )
    return problems


def preflight(
    dataset,
    what: str,
    skip_bad_records: bool = False,
    num_workers: int = 0,
    log=print,
    unread=(),
    batch_size=1,
):
    """The dataset, checked: raises a DataError listing every bad record, or drops them when asked to.
    `unread`: the problems of the records that could not even be read (data.read_records), listed with the rest.
    `batch_size`: samples per micro-batch, for what must agree among the samples of one (videos' frame counts).

    Under a launcher every process must call it (the results are gathered); each then keeps the same records,
    and only process 0 logs the report."""
    rank, _ = process_rank_and_count()
    fit = image_fit_of(dataset.processor)
    cache_file = preflight_cache_file(dataset)
    checked = read_cached_checks(cache_file, len(dataset))
    if same_on_every_process(checked is not None):  # a re-run or resume with the same inputs: read back
        if checked is None:
            raise DataError(
                f"process {rank} cannot read the preflight cache {cache_file}; delete it and run again"
            )
        per_process = None
    else:
        checked, per_process = check_every_record(dataset, fit, num_workers, log)
        if rank == 0 and cache_file is not None:
            write_cached_checks(cache_file, checked)
    for index, problem in frame_count_problems(checked, dataset, batch_size).items():
        checked[index].problem = problem  # after the cache is written: it depends on this run's batch size
    count = len(checked) + len(unread)
    if count == 0:
        raise DataError(f"{what} holds no records")
    problems = [str(problem) for problem in unread] + [c.problem for c in checked if c.problem is not None]
    if problems and not skip_bad_records:
        summary = f"{len(problems)} of {count} records of {what} cannot become training samples"
        if rank != 0:  # the same outcome on every process; process 0 gives the list
            raise DataError(f"{summary}; process 0 lists them")
        listing = "\n  ".join(shown_problems(problems))
        raise DataError(
            f"{summary} (found before loading the model):\n  {listing}\n"
            "Fix them, or pass --skip_bad_records true to train without them."
        )
    measured = [MeasuredImage(c.index, *size) for c in checked if c.problem is None for size in c.image_sizes]
    records = dataset.records
    bad = {c.index for c in checked if c.problem is not None}
    if bad:
        dataset.records = keep_records(records, [k for k in range(len(records)) if k not in bad])
    # each kept sample's tokens, for --train_sampling_strategy group_by_length (training.RecipeTrainer)
    dataset.lengths = [c.length for c in checked if c.problem is None]
    if rank == 0:
        for line in preflight_report(count, problems, per_process, what, cache_file):
            log(line)
        for line in image_report(
            fit, measured, what, dataset.processor, lambda index: records[index]["source"]
        ):
            log(line)
    if not len(dataset.records):
        raise DataError(f"preflight: every record of {what} is bad; nothing left to train on")
    return dataset


def shown_problems(problems: list[str]) -> list[str]:
    shown = problems[:SHOWN_PROBLEMS]
    return shown + (
        [f"... and {len(problems) - SHOWN_PROBLEMS} more"] if len(problems) > SHOWN_PROBLEMS else []
    )


def preflight_report(
    count: int, problems: list[str], per_process: list[int] | None, what: str, cache_file: Path | None = None
) -> list[str]:
    checked_by = ""
    if per_process is None:
        checked_by = f" (the check of an earlier run with the same records and processor, from {cache_file})"
    # evidence that the records were shared out, not checked again by every process
    elif len(per_process) > 1:
        checked_by = (
            f" (checked by {len(per_process)} processes: {' + '.join(map(str, per_process))} records)"
        )
    if not problems:
        return [f"preflight: all {count} records of {what} become training samples{checked_by}"]
    return [
        f"preflight: skipping {len(problems)} of {count} records of {what}{checked_by}:",
        *(f"  {line}" for line in shown_problems(problems)),
    ]
