"""Read conversation datasets into one form, check them, and serve tokenized samples.

Accepted inputs (`--dataset_path`):
- a LLaVA conversation file, `.json` (a list) or `.jsonl` (a record a line):
  {"id": ..., "image": "a.png" | "images": [...], "conversations": [{"from": "human" | "gpt" | "system",
  "value": "<image>\\nWhat is this?"}, ...]}, image paths relative to `--image_root`;
- the chat format, from the same files or from a `datasets` folder (`save_to_disk`) or name:
  {"messages": [{"role": "user" | "assistant" | "system", "content": "text" | [{"type": "image"},
  {"type": "text", "text": ...}]}], "images": [path or image, ...]};
- CheXinstruct-style records (CheXagent): {"image_path": "a.png" | [...], "qa_pair": {"q": ..., "a": ...} | [...]}
  or {"image_path": ..., "text": ..., "target_text": ...} (docs/chexagent.md).

Every record becomes {"id", "messages" (typed content parts), "images"}; problems are collected over the
whole file and raised together, each naming the file, the record and the fix (read_records hands them to the
preflight instead, which lists them with its own). The records of a JSON/JSONL file or a `datasets` folder are
served from the records cache (vlm_recipes/records.py: parsed once, memory-mapped), not held as Python objects.
"""

import hashlib
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlm_recipes.masking import FEWER_MEDIA_TOKENS, SampleError, tokenize_conversation
from vlm_recipes.records import BATCH as RECORDS_BATCH
from vlm_recipes.records import (
    EMBEDDED,
    DatasetMedia,
    RecordTable,
    cached_parse,
    embedded_reference,
    file_fingerprint,
    fingerprint_of,
)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
CHAT_ROLES = {"user", "assistant", "system"}


class DataError(ValueError):
    """Bad input data. The message lists every problem found, with the file, the record and the fix."""


@dataclass
class RecordProblem:
    source: str
    record: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}, record {self.record}: {self.problem}"


def raise_if_problems(problems: list[RecordProblem], what: str) -> None:
    if not problems:
        return
    shown = "\n  ".join(str(p) for p in problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise DataError(f"{len(problems)} problem(s) in {what}:\n  {shown}{more}")


def split_placeholders(text: str) -> list[dict]:
    """'<image>\\nWhat?' -> [{"type": "image"}, {"type": "text", "text": "What?"}]; <video> likewise."""
    parts = []
    for piece in re.split(f"({IMAGE_PLACEHOLDER}|{VIDEO_PLACEHOLDER})", text):
        if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            parts.append({"type": piece[1:-1]})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def llava_record_to_messages(record: dict) -> tuple[list[dict], list, list]:
    images = as_list(record.get("images", record.get("image")))
    # A video is one file or a list of frames, so a single "video" is wrapped, never split.
    videos = list(record["videos"]) if "videos" in record else [record["video"]] if "video" in record else []
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError('each conversation turn needs "from" and "value"')
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f'unknown role "from": {turn["from"]!r}; use one of {sorted(LLAVA_ROLES)}')
        messages.append({"role": role, "content": split_placeholders(str(turn["value"]))})
    return messages, images, videos


def chat_record_to_messages(record: dict) -> tuple[list[dict], list, list]:
    messages = []
    for turn in record["messages"]:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError('each message needs "role" and "content"')
        if turn["role"] not in CHAT_ROLES:
            raise ValueError(f"unknown role {turn['role']!r}; use one of {sorted(CHAT_ROLES)}")
        content = turn["content"]
        if isinstance(content, str):
            content = split_placeholders(content)
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text" and part.get("text"):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "video"):
                parts.append({"type": kind})
            elif kind != "text":
                raise ValueError(f"unsupported content part type {kind!r}; use 'text', 'image' or 'video'")
        messages.append({"role": turn["role"], "content": parts})
    return messages, as_list(record.get("images")), list(record.get("videos") or [])


def chexinstruct_record_to_messages(record: dict) -> tuple[list[dict], list, list]:
    """A CheXinstruct-style record: "image_path" (one path, or a list such as the views of one study) and either
    "qa_pair" ({"q", "a"}, or a list of them: one user/assistant turn each) or "text" (the instruction) with
    "target_text" (the answer). When both are present "qa_pair" wins: CheXinstruct's closed-ended questions
    keep their answer there and leave "target_text" empty. The images go before the first question."""
    image_path = record.get("image_path")
    images = as_list(image_path) if image_path else []  # CheXinstruct's text-only tasks leave it empty
    qa_pair = record.get("qa_pair")
    if qa_pair is not None:
        turns = []
        for k, pair in enumerate(as_list(qa_pair)):
            question, answer = (pair.get("q"), pair.get("a")) if isinstance(pair, dict) else (None, None)
            if not (
                isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()
            ):
                where = f"qa_pair[{k}]" if isinstance(qa_pair, list) else "qa_pair"
                raise ValueError(f'{where} must be {{"q": question, "a": answer}} with non-empty strings')
            turns.append((question, answer))
        if not turns:
            raise ValueError('"qa_pair" is an empty list; give at least one {"q": question, "a": answer}')
    else:
        question, answer = record.get("text"), record.get("target_text")
        if not (
            isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()
        ):
            raise ValueError(
                'a CheXinstruct record needs "qa_pair", or "text" (the instruction) and "target_text" (the '
                "answer), as non-empty strings"
            )
        turns = [(question, answer)]
    messages = []
    for k, (question, answer) in enumerate(turns):
        media = [{"type": "image"}] * len(images) if k == 0 else []
        messages.append({"role": "user", "content": [*media, {"type": "text", "text": question.strip()}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
    return messages, images, []


def normalize_record(record: dict) -> tuple[list[dict], list, list]:
    """(messages with typed content parts, images, videos) of a LLaVA, chat or CheXinstruct record."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        messages, images, videos = llava_record_to_messages(record)
    elif "messages" in record:
        messages, images, videos = chat_record_to_messages(record)
    elif any(key in record for key in ("qa_pair", "text", "target_text")):
        messages, images, videos = chexinstruct_record_to_messages(record)
    else:
        raise ValueError(
            'no "conversations" (LLaVA format), "messages" (chat format) or "qa_pair" / "text" (CheXinstruct) key'
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn, so there is nothing to learn")
    for kind, media, placeholder in (
        ("image", images, IMAGE_PLACEHOLDER),
        ("video", videos, VIDEO_PLACEHOLDER),
    ):
        n_placeholders = sum(part["type"] == kind for m in messages for part in m["content"])
        if n_placeholders != len(media):
            raise ValueError(
                f"{n_placeholders} {kind} placeholder(s) but {len(media)} {kind}(s); put one {placeholder} "
                f"in the text (or one {{'type': '{kind}'}} part) per {kind}, in order"
            )
    return messages, images, videos


PICKLE_REFUSAL = "pickle files are refused, since loading one runs arbitrary code; save the records as JSONL"


def read_text_refusing_pickle(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:1] == b"\x80" and raw[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise DataError(f"{path} is a pickle file despite its name: {PICKLE_REFUSAL}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text (byte {error.start}); save the dataset as UTF-8 JSON/JSONL"
        ) from None


def read_json_records(path: Path) -> tuple[list[tuple[str, object]], list[RecordProblem]]:
    """(label, record) pairs, where label names the record the way a person finds it in the file."""
    problems = []
    text = read_text_refusing_pickle(path)
    if path.suffix == ".jsonl":
        pairs = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                pairs.append((f"at line {line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                problems.append(
                    RecordProblem(str(path), f"at line {line_number}", f"malformed JSON ({error.msg})")
                )
        return pairs, problems
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: malformed JSON at line {error.lineno} column {error.colno} ({error.msg})"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: a .json dataset must hold a list of records; use .jsonl for one record per line"
        )
    return [(f"#{index}", record) for index, record in enumerate(data)], problems


def open_hf_dataset(dataset_path: str, split: str):
    """The user's `datasets` folder (save_to_disk) or dataset name, memory-mapped as `datasets` keeps it, with
    its image columns undecoded ({"bytes", "path"}): decoding every image while reading held them all in RAM
    (200 JPEGs of 21 MB became 239 MiB)."""
    import datasets

    if Path(dataset_path, "dataset_info.json").exists() or Path(dataset_path, "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(dataset_path)
    else:
        loaded = datasets.load_dataset(dataset_path, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[split]
    for name, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            loaded = loaded.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return loaded


def hf_dataset_fingerprint(loaded, split: str) -> str:
    """What the records cache keys a `datasets` table by: its own fingerprint, and each of its Arrow files'
    path, size and modification time (a folder saved again over the old one is parsed again)."""
    files = [Path(entry["filename"]) for entry in loaded.cache_files]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return fingerprint_of(["datasets", split, loaded._fingerprint, stats])


def parse_hf_dataset(loaded):
    """(stored rows, problems) of a `datasets` table, for the records cache, as parse_json_file does for a file; an
    image of one of the table's image columns is stored as a reference to it (records.EMBEDDED), not copied."""
    import datasets

    image_columns = [
        name
        for name, feature in loaded.features.items()
        if isinstance(feature, datasets.Image)
        or isinstance(getattr(feature, "feature", None), datasets.Image)
    ]
    problems = []

    def rows():
        for index, raw in enumerate(loaded):
            name = record_name(f"#{index}", raw)
            references = {}  # the image column values of this row, by identity: normalize_record keeps them
            for column in image_columns:
                value = raw[column]
                for position, image in [(None, value)] if isinstance(value, dict) else enumerate(value or []):
                    references[id(image)] = embedded_reference(index, column, position)
            try:
                messages, images, videos = normalize_record(raw)
                stored = [image if isinstance(image, str) else references.get(id(image)) for image in images]
                if None in stored:
                    raise ValueError("an image must be a path (a string) or a value of an image column")
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                problems.append((name, str(error)))
                continue
            yield {"id": str(raw.get("id", f"#{index}")), "label": name, "messages": json.dumps(messages),
                   "images": stored, "videos": json.dumps(videos)}  # fmt: skip

    return rows(), problems


class MediaPaths:
    """Resolves a record's media paths against --image_root and refuses those that leave it (symlinks
    followed), with each directory's real path looked up once: hundreds of thousands of images share a few
    directories, and resolving every path component of every image again took most of the reading time."""

    def __init__(self, image_root: Path | None, allow_outside_root: bool):
        self.image_root, self.allow_outside_root = image_root, allow_outside_root
        self.real_root = os.path.realpath(image_root) if image_root is not None else None
        self.real_dirs: dict[str, str] = {}
        self.digest = None  # a hashlib object: `problems` then adds every checked file's path, size and mtime

    def resolve(self, path: str, kind: str = "image") -> Path:
        return Path(self.real(path))

    def real(self, path: str) -> str:
        if self.image_root is None:
            return path
        directory, name = os.path.split(os.path.join(self.image_root, path))
        real_dir = self.real_dirs.get(directory)
        if real_dir is None:
            real_dir = self.real_dirs[directory] = os.path.realpath(directory)
        real = os.path.join(real_dir, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        inside = real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)
        if not self.allow_outside_root and not inside:
            raise ValueError(
                f"image path {path!r} points outside --image_root {self.image_root}; move the image under the root "
                "or pass --allow_images_outside_root true"
            )
        return real

    def problems(self, images: list[str], videos: list) -> list[str]:
        """What is wrong with each of a record's media files (none: an empty list), without building paths."""
        problems = []
        for media, kind in [*((image, "image") for image in images), *media_of_videos(videos)]:
            if media.startswith(EMBEDDED):  # inside the `datasets` table: its fingerprint keys the cache
                continue
            try:
                path = self.real(media)
            except ValueError as error:
                problems.append(str(error))
                continue
            try:
                stat = os.stat(path)
            except OSError:
                stat = None
            if stat is None or not S_ISREG(stat.st_mode):
                problems.append(f"{kind} {path} does not exist; check the path and --image_root")
            elif self.digest is not None:  # what the file is now, for the preflight cache's key
                self.digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return problems


def media_of_videos(videos: list) -> list[tuple[str, str]]:
    """(path, kind) of each video file and frame."""
    return [
        (item, kind)
        for video in videos
        for item, kind in (
            [(frame, "video frame") for frame in video] if isinstance(video, list) else [(video, "video")]
        )
    ]


def read_records(
    dataset_path: str,
    image_root: str | None = None,
    split: str = "train",
    allow_images_outside_root: bool = False,
) -> tuple[list[dict], list[RecordProblem]]:
    """(every record that can be read, a problem for each one that cannot). A record's problem lists all that is
    wrong with it (each missing image, not only the first). The recipes and scripts/validate_data.py hand these
    problems to the preflight, which reports them with the ones it finds itself (images that do not decode,
    answers cut by max_length...), so that one run shows every problem of the dataset."""
    path = Path(dataset_path)
    root = Path(image_root) if image_root else None
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise DataError(f"dataset file {path} does not exist; check --dataset_path")
        return read_json_file(path, str(dataset_path), root, allow_images_outside_root)
    if path.suffix in (".pkl", ".pickle"):
        raise DataError(f"{path}: {PICKLE_REFUSAL}")
    loaded = open_hf_dataset(dataset_path, split)
    table, stored = cached_parse(hf_dataset_fingerprint(loaded, split), lambda: parse_hf_dataset(loaded))
    return checked_records(
        table, stored, str(dataset_path), root, allow_images_outside_root,
        lambda paths: DatasetMedia(loaded, paths.resolve).resolve,
    )  # fmt: skip


def record_name(label: str, raw) -> str:
    """How a record is named in messages: its place in the file, and its id when it has one."""
    return f"{label} (id {raw['id']})" if isinstance(raw, dict) and "id" in raw else label


def parse_json_file(path: Path):
    """(stored rows, problems) of a JSON / JSONL file, for the records cache: each record normalized to chat
    messages; image and video paths kept as written. The problems list fills as the rows are consumed."""
    pairs, read_problems = read_json_records(path)
    problems = [(problem.record, problem.problem) for problem in read_problems]

    def rows():
        for label, raw in pairs:
            name = record_name(label, raw)
            try:
                messages, images, videos = normalize_record(raw)
                if not all(isinstance(image, str) for image in images):
                    raise ValueError("an image of a JSON record must be a path (a string)")
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                problems.append((name, str(error)))
                continue
            record_id = str(raw.get("id", label))
            yield {"id": record_id, "label": name, "messages": json.dumps(messages), "images": images,
                   "videos": json.dumps(videos)}  # fmt: skip

    return rows(), problems


def read_json_file(path: Path, dataset_path: str, root: Path | None, allow_outside_root: bool):
    """(records, problems) of a JSON / JSONL file: the records memory-mapped from the records cache
    (vlm_recipes/records.py), their media checked on disk now."""
    table, stored = cached_parse(file_fingerprint(path), lambda: parse_json_file(path))
    return checked_records(table, stored, dataset_path, root, allow_outside_root, lambda paths: paths.resolve)


def checked_records(table, stored, dataset_path: str, root, allow_outside_root: bool, resolver):
    """(records, problems) from a records-cache entry: the stored problems, and every record's media files
    checked on disk now; `resolver(paths)` makes the function that turns a stored media entry into what a sample
    reads."""
    problems = [RecordProblem(dataset_path, label, problem) for label, problem in stored]
    kept, paths, position = [], MediaPaths(root, allow_outside_root), 0
    paths.digest = hashlib.sha256(
        f"{table.cache_files[0]['filename']}\0{root}\0{allow_outside_root}".encode()
    )
    # Straight from the Arrow columns, a batch at a time: building 665k records to check their paths took 40 s.
    for batch in table.data.table.select(["label", "images", "videos"]).to_batches(
        max_chunksize=RECORDS_BATCH
    ):
        labels, images, videos = (column.to_pylist() for column in batch.columns)
        for label, record_images, record_videos in zip(labels, images, videos, strict=True):
            missing = paths.problems(
                record_images, [] if record_videos == "[]" else json.loads(record_videos)
            )
            if missing:
                problems.append(RecordProblem(dataset_path, label, "; ".join(missing)))
            else:
                kept.append(position)
            position += 1
    paths.digest.update(np.asarray(kept, dtype=np.int64).tobytes())
    records = RecordTable(table, dataset_path, resolver(paths), fingerprint=paths.digest.hexdigest())
    paths.digest = None  # not pickled with the records
    return records.select(kept), problems


def load_records(
    dataset_path: str,
    image_root: str | None = None,
    split: str = "train",
    allow_images_outside_root: bool = False,
) -> list[dict]:
    """Read and check every record (read_records); raise one DataError listing all problems found."""
    records, problems = read_records(dataset_path, image_root, split, allow_images_outside_root)
    raise_if_problems(problems, str(dataset_path))
    if not records:
        raise DataError(f"{dataset_path} holds no records")
    return records


def load_image(image) -> Image.Image:
    """An RGB image. 16-bit and float grayscale (X-rays) are stretched to 8 bits, not clipped."""
    if isinstance(image, dict):  # an undecoded `datasets` image: its bytes, or the path it was stored with
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    if not isinstance(image, Image.Image):
        try:
            opened = Image.open(image)
            opened.load()
        except OSError as error:  # truncated, not an image at all...: say which file, as well as which record
            raise OSError(f"image {image}: {error}; replace the file (or re-export it)") from error
        image = opened
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        scaled = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


class ConversationDataset(Dataset):
    """Checked records, tokenized on access so that images are decoded by the data-loader workers."""

    def __init__(
        self, records: list[dict], processor, max_length: int | None, fewer_media_tokens=FEWER_MEDIA_TOKENS
    ):
        self.records = records
        self.processor = processor
        self.max_length = max_length
        self.lengths: list[int] | None = None  # each sample's tokens, once the preflight has measured them
        self.fewer_media_tokens = fewer_media_tokens  # the advice when an image span does not fit max_length

    def __len__(self) -> int:
        return len(self.records)

    def decode_media(self, index: int) -> tuple[list[Image.Image], list]:
        """Record `index`'s images and video frames, decoded; a video file stays a path for the processor."""
        record = self.records[index]
        with problems_named_by(record):
            images = [load_image(image) for image in record["images"]]
            videos = [[load_image(f) for f in v] if isinstance(v, list) else str(v) for v in record["videos"]]
            for number, frames in enumerate(videos, start=1):
                sizes = sorted({frame.size for frame in frames} if isinstance(frames, list) else ())
                if len(sizes) > 1:
                    raise SampleError(
                        f"the frames of video {number} have {len(sizes)} sizes "
                        f"({', '.join(f'{w}x{h}' for w, h in sizes[:3])}): a video's frames must share one size"
                    )
        return images, videos

    def tokenize(self, index: int, images: list[Image.Image], videos: list) -> dict:
        record = self.records[index]
        with problems_named_by(record):
            return tokenize_conversation(
                self.processor, record["messages"], images, self.max_length, videos, self.fewer_media_tokens
            )

    def __getitem__(self, index: int) -> dict:
        return self.tokenize(index, *self.decode_media(index))


def media_kinds(*datasets) -> tuple[str, ...]:
    """The kinds of visual input ("image", "video") the datasets' records hold (None is skipped), for the
    collator's ZeRO-3 guard. Every process has the same records after the preflight, so the same kinds."""
    present = [dataset.records for dataset in datasets if dataset is not None]
    return tuple(
        kind
        for kind, key in (("image", "images"), ("video", "videos"))
        if any(has_media(records, key) for records in present)
    )


def has_media(records, key: str) -> bool:
    # A RecordTable answers from its stored column, without building every record.
    return records.has_media(key) if isinstance(records, RecordTable) else any(r[key] for r in records)


def keep_records(records, positions: list[int]):
    """The records at `positions`, in order (a RecordTable stays one, without copying its table)."""
    return records.select(positions) if isinstance(records, RecordTable) else [records[k] for k in positions]


@contextmanager
def problems_named_by(record: dict):
    """Re-raise a record's decoding or tokenizing failure as a DataError that names the record."""
    try:
        yield
    except Image.DecompressionBombError as error:
        raise DataError(
            f"{record['source']}: {error} Downscale the image beforehand (the model never sees more pixels than "
            "its image processor's size), or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from error
    # ValueError: a SampleError, an image processor refusing an image (a size it cannot resize), PyAV failing on
    # a video; ImportError: no video decoder installed; RuntimeError: torchcodec or decord failing on a video.
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        raise DataError(f"{record['source']}: {error}") from error
