"""The records of a JSON / JSONL dataset file or a `datasets` folder, stored once the way `datasets` stores a dataset: an Arrow file,
memory-mapped. Every process of a run (and every data-loader worker) reads the same pages through the page cache
instead of holding its own copy as Python objects, which for LLaVA-1.5's 665k-record mix would be gigabytes per
process.

The file is parsed once (records normalized to chat messages, each record's problems noted) into
<cache>/records/<fingerprint>/, where the fingerprint covers the file's resolved path, size and modification time
and this module's format version: an edited file is parsed again, an unchanged one is reused by every later run
and every process. The cache is $VLM_RECIPES_CACHE, or ~/.cache/vlm_recipes; each entry is about the size of the
JSON file; delete the folder to clear it. Image paths are stored as written: whether each file exists (and stays
under --image_root) is checked on every run, since images can be added or moved without the dataset file changing.
A `datasets` table is keyed by its own fingerprint and Arrow files (fingerprint_of); its embedded images are stored
as references into it (EMBEDDED), not copied.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1  # bump when what is stored changes: every cached entry is then parsed again
BATCH = 10_000


def cache_home() -> Path:
    """$VLM_RECIPES_CACHE, or ~/.cache/vlm_recipes: records/ (this module) and preflight/ (vlm_recipes/preflight.py)."""
    return Path(os.environ.get("VLM_RECIPES_CACHE") or Path.home() / ".cache" / "vlm_recipes")


def cache_root() -> Path:
    return cache_home() / "records"


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return fingerprint_of([str(path.resolve()), stat.st_size, stat.st_mtime_ns])


def fingerprint_of(what: list) -> str:
    """The records cache's key for a source described by `what` (JSON-serializable), at this FORMAT_VERSION."""
    return hashlib.sha256(json.dumps([*what, FORMAT_VERSION]).encode()).hexdigest()[:20]


def schema():
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("label", pa.string()), ("messages", pa.string()),
         ("images", pa.list_(pa.string())), ("videos", pa.string())]
    )  # fmt: skip


def write_entry(folder: Path, parsed: Iterable[dict], problems: list[tuple[str, str]]) -> None:
    """records.arrow (Arrow stream format, as `datasets` writes it) and problems.json, written into a temporary
    folder and renamed into place last, so that a reader never sees half an entry."""
    import pyarrow as pa

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    with pa.OSFile(str(staging / "records.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema()) as writer:
        batch = []
        for row in parsed:
            batch.append(row)
            if len(batch) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema()))
                batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema()))
    (staging / "problems.json").write_text(json.dumps(problems))
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished the same entry first: theirs is as good
        for file in staging.iterdir():
            file.unlink()
        staging.rmdir()


def cached_parse(fingerprint: str, parse: Callable[[], tuple[Iterable[dict], list[tuple[str, str]]]]):
    """(the memory-mapped records table, [(record label, problem)]) of a dataset, parsed by `parse` only when no
    entry for its fingerprint (file_fingerprint, fingerprint_of) exists. One process parses while the others wait
    (a file lock), then all map the same file."""
    import datasets
    from filelock import FileLock

    folder = cache_root() / fingerprint
    if not (folder / "problems.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not (folder / "problems.json").is_file():
                write_entry(folder, *parse())
    problems = [tuple(problem) for problem in json.loads((folder / "problems.json").read_text())]
    return datasets.Dataset.from_file(str(folder / "records.arrow")), problems


# An image stored inside a row of the user's `datasets` table, "<EMBEDDED><row>/<column>/<position or ->", read
# (undecoded) from that table only when a sample needs it instead of being copied into the records cache.
EMBEDDED = "\0datasets-row:"


def embedded_reference(row: int, column: str, position: int | None) -> str:
    return f"{EMBEDDED}{row}/{column}/{'-' if position is None else position}"


class DatasetMedia:
    """Resolves the stored media of records parsed from a `datasets` table: an EMBEDDED reference to the table's
    own (undecoded) image, {"bytes", "path"}, and any other path as `resolve_path` does."""

    def __init__(self, dataset, resolve_path: Callable):
        self.dataset, self.resolve_path = dataset, resolve_path

    def resolve(self, media: str, kind: str = "image"):
        if not media.startswith(EMBEDDED):
            return self.resolve_path(media, kind)
        row, column, position = media[len(EMBEDDED) :].rsplit("/", 2)
        value = self.dataset[int(row)][column]
        return value if position == "-" else value[int(position)]


class RecordTable:
    """Records backed by the memory-mapped table: a sequence of record dicts (id, source, messages, images,
    videos), each built when it is asked for. `select` keeps a subset without copying the table."""

    def __init__(
        self,
        table,
        dataset_path: str,
        resolve: Callable,
        indices: np.ndarray | None = None,
        fingerprint: str = "",
    ):
        self.table, self.dataset_path, self.resolve = table, dataset_path, resolve
        self.indices = np.arange(len(table), dtype=np.int64) if indices is None else indices
        # What these records are: the parsed file, every media file's path, size and mtime when they were read,
        # and the records kept. The preflight's cache is keyed by it (with the processor and max_length).
        self.fingerprint = hashlib.sha256(f"{fingerprint}\0".encode() + self.indices.tobytes()).hexdigest()
        self.base_fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.select(range(len(self))[k])
        row = self.table[int(self.indices[k])]
        videos = json.loads(row["videos"])
        return {
            "id": row["id"],
            "source": f"{self.dataset_path}, record {row['label']}",
            "messages": json.loads(row["messages"]),
            "images": [self.resolve(image, "image") for image in row["images"]],
            "videos": [
                [self.resolve(frame, "video frame") for frame in video]
                if isinstance(video, list)
                else self.resolve(video, "video")
                for video in videos
            ],
        }

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def select(self, positions) -> "RecordTable":
        chosen = self.indices[np.asarray(list(positions), dtype=np.int64)]
        return RecordTable(self.table, self.dataset_path, self.resolve, chosen, self.base_fingerprint)

    def has_media(self, key: str) -> bool:
        """Whether any selected record has images ("images") or videos ("videos")."""
        import pyarrow.compute as pc

        column = self.table.data.table.column(key).take(self.indices)
        if key == "images":
            return len(self) > 0 and (pc.max(pc.list_value_length(column)).as_py() or 0) > 0
        return bool(pc.any(pc.not_equal(column, "[]")).as_py())
