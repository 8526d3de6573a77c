"""Reading, checking and normalizing conversation datasets, and decoding their images."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor, LlavaProcessor

from tests.conftest import pickle_that_touches
from vlm_recipes.data import ConversationDataset, DataError, load_image, load_records
from vlm_recipes.masking import IGNORE_INDEX

# --- shared fixtures -------------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_processor():
    """The processor scripts/make_tiny_model.py builds for LLaVA: byte-level BPE, 32x32 images, 16 image tokens."""
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    make_tiny_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny_model)
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=make_tiny_model.build_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=make_tiny_model.LLAVA_CHAT_TEMPLATE,
    )


def write_png(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def llava(*turns, **fields):
    """A LLaVA record from ("human" | "gpt" | "system", value) pairs."""
    return {**fields, "conversations": [{"from": role, "value": value} for role, value in turns]}


@pytest.fixture
def image_root(tmp_path):
    root = (tmp_path / "images").resolve()  # load_records resolves image paths
    write_png(root / "a.png")
    write_png(root / "b.png", "blue")
    return root


LLAVA_RECORDS = [
    llava(("human", "<image>\nWhat color is the shape?"), ("gpt", "red"), id="q1", image="a.png"),
    llava(
        ("system", "Be brief."),
        ("human", "Compare <image> and\n<image>"),
        ("gpt", "Different colors."),
        ("human", "Which is blue?"),
        ("gpt", "The second."),
        id="q2",
        images=["a.png", "b.png"],
    ),
]
LLAVA_EXPECTED = [
    [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Different colors."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which is blue?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The second."}]},
    ],
]


def load_one_bad(tmp_path, image_root, record, **kwargs):
    """The DataError message for a .jsonl file holding one good record and then `record`."""
    path = write_jsonl(tmp_path / "data.jsonl", [LLAVA_RECORDS[0], record])
    with pytest.raises(DataError) as error:
        load_records(str(path), str(image_root), **kwargs)
    message = str(error.value)
    assert "1 problem(s)" in message and "record at line 2" in message
    return message


# --- the records cache (vlm_recipes/records.py) -----------------------------------------------------------------


def test_a_file_is_parsed_once_then_mapped_from_the_cache(tmp_path, image_root, monkeypatch):
    import vlm_recipes.data as data

    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path / "cache"))
    parses = []
    real_parse = data.parse_json_file
    monkeypatch.setattr(data, "parse_json_file", lambda path: parses.append(path) or real_parse(path))
    path = write_json(tmp_path / "data.json", LLAVA_RECORDS)
    first = load_records(str(path), str(image_root))
    again = load_records(str(path), str(image_root))
    assert parses == [path]  # the second read (another rank, a re-run) maps what the first wrote
    assert list(first) == list(again) and [r["messages"] for r in again] == LLAVA_EXPECTED
    assert again[1]["images"] == [image_root / "a.png", image_root / "b.png"]
    entries = list((tmp_path / "cache" / "records").iterdir())
    assert [e.name for e in entries if e.is_dir()] and all(
        (e / "records.arrow").is_file() for e in entries if e.is_dir()
    )
    # an edited file is parsed again
    write_json(path, LLAVA_RECORDS[:1])
    assert len(load_records(str(path), str(image_root))) == 1 and len(parses) == 2


def test_an_image_added_after_the_first_read_is_found_without_editing_the_dataset(
    tmp_path, image_root, monkeypatch
):
    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path / "cache"))
    path = write_json(
        tmp_path / "data.json", [llava(("human", "<image>\nWhat?"), ("gpt", "red"), image="late.png")]
    )
    with pytest.raises(DataError, match="late.png does not exist"):
        load_records(str(path), str(image_root))
    write_png(image_root / "late.png")  # the image checks run on every read; only the parse is cached
    assert [r["images"] for r in load_records(str(path), str(image_root))] == [[image_root / "late.png"]]


def test_records_go_to_data_loader_workers_as_a_reference_to_the_mapped_file(
    tmp_path, image_root, monkeypatch
):
    import pickle

    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path / "cache"))
    path = write_json(tmp_path / "data.json", LLAVA_RECORDS * 2000)  # about 1 MB of JSON
    records = load_records(str(path), str(image_root))
    pickled = pickle.dumps(records)
    assert len(pickled) < path.stat().st_size / 10  # the file's path and the kept indices, not the records
    assert list(pickle.loads(pickled)[:2]) == list(records[:2])


# --- accepted formats ---------------------------------------------------------------------------------------


def test_llava_json_records_normalize_to_typed_messages(tmp_path, image_root):
    path = write_json(tmp_path / "data.json", LLAVA_RECORDS)
    records = load_records(str(path), str(image_root))
    assert [r["messages"] for r in records] == LLAVA_EXPECTED
    assert [r["id"] for r in records] == ["q1", "q2"]
    assert [r["images"] for r in records] == [
        [image_root / "a.png"],
        [image_root / "a.png", image_root / "b.png"],
    ]
    assert records[1]["source"] == f"{path}, record #1 (id q2)"


def test_llava_jsonl_records_normalize_to_typed_messages(tmp_path, image_root):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(LLAVA_RECORDS[0]) + "\n\n" + json.dumps(LLAVA_RECORDS[1]) + "\n", encoding="utf-8"
    )
    records = load_records(str(path), str(image_root))
    assert [r["messages"] for r in records] == LLAVA_EXPECTED
    assert records[1]["source"] == f"{path}, record at line 3 (id q2)"


def test_chat_jsonl_accepts_string_and_typed_content(tmp_path, image_root):
    chat = [
        {
            "messages": [
                {"role": "user", "content": "<image>\nWhat color?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["a.png"],
        },
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            ],
            "images": "b.png",
        },
    ]
    records = load_records(str(write_jsonl(tmp_path / "chat.jsonl", chat)), str(image_root))
    assert [r["messages"] for r in records] == [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        ],
    ]
    assert [r["images"] for r in records] == [[image_root / "a.png"], [image_root / "b.png"]]
    assert [r["id"] for r in records] == ["at line 1", "at line 2"]


def test_datasets_folder_in_chat_format_loads(tmp_path, image_root):
    import datasets

    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "text": None}, {"type": "text", "text": "What?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": ["a.png"],
        }
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    records = load_records(str(tmp_path / "hf"), str(image_root))
    assert [r["messages"] for r in records] == [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ]
    ]
    assert records[0]["images"] == [image_root / "a.png"]


def test_a_datasets_image_column_is_decoded_only_when_a_sample_is_made(tmp_path, image_root, tiny_processor):
    import datasets

    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "images": [str(image_root / "a.png")]}]  # fmt: skip
    embedded = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    embedded.save_to_disk(str(tmp_path / "hf"))  # the images' bytes inside the dataset, as the Hub's are
    records = load_records(str(tmp_path / "hf"), str(image_root))
    (image,) = records[0]["images"]
    assert isinstance(image, dict) and image["bytes"][:4] == b"\x89PNG"  # read, not decoded
    sample = ConversationDataset(records, tiny_processor, None)[0]
    assert sample["pixel_values"].shape[-2:] == (32, 32)  # decoded for the sample


def test_a_datasets_folder_is_parsed_once_and_its_image_bytes_stay_in_the_users_table(
    tmp_path, image_root, monkeypatch, tiny_processor
):
    import pickle

    import datasets

    import vlm_recipes.data as data

    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path / "cache"))
    parses = []
    real_parse = data.parse_hf_dataset
    monkeypatch.setattr(data, "parse_hf_dataset", lambda loaded: parses.append(1) or real_parse(loaded))
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")  # about 49 KB: incompressible, as photographs are
    turn = {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What?"}]}
    rows = [{"id": f"r{k}", "messages": [turn, {"role": "assistant", "content": [{"type": "text", "text": f"n{k}"}]}],
             "images": [str(tmp_path / "noise.png")]} for k in range(40)]  # fmt: skip
    rows[7]["messages"] = rows[7]["messages"][:1]  # no answer: reported, with the rest kept
    embedded = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    embedded.save_to_disk(str(tmp_path / "hf"))
    image_bytes = 40 * (tmp_path / "noise.png").stat().st_size

    records, problems = data.read_records(str(tmp_path / "hf"), str(image_root))
    again, _ = data.read_records(str(tmp_path / "hf"), str(image_root))
    assert parses == [1]  # every later read (another rank, a re-run) maps the stored parse
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'hf'}, record #7 (id r7): the conversation has no assistant turn, so there is nothing to learn"
    ]
    assert len(records) == 39 and records[8]["id"] == "r9" and list(again[:3]) == list(records[:3])
    (stored,) = [e for e in (tmp_path / "cache" / "records").iterdir() if e.is_dir()]
    assert (
        stored / "records.arrow"
    ).stat().st_size < image_bytes / 20  # references to the images, not copies
    assert len(pickle.dumps(records)) < image_bytes / 20  # what a data-loader worker is sent
    (image,) = records[8]["images"]
    assert image["bytes"] == (tmp_path / "noise.png").read_bytes()  # row 9's own image, undecoded until used
    sample = ConversationDataset(records, tiny_processor, None)[8]
    assert sample["pixel_values"].shape[-2:] == (32, 32)


# --- refused inputs -----------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_the_file_and_the_line(tmp_path, image_root):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(LLAVA_RECORDS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON") as error:
        load_records(str(path), str(image_root))
    assert f"{path}, record at line 2" in str(error.value)


@pytest.mark.parametrize(
    "record, expected",
    [
        (llava(("human", "Hi"), ("bot", "Hello")), "unknown role \"from\": 'bot'"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "'tool'"),
    ],
)
def test_unknown_role_is_refused(tmp_path, image_root, record, expected):
    assert expected in load_one_bad(tmp_path, image_root, record)


def test_conversation_without_assistant_turn_is_refused(tmp_path, image_root):
    assert "no assistant turn" in load_one_bad(tmp_path, image_root, llava(("human", "Hi")))


def test_missing_image_names_its_path(tmp_path, image_root):
    record = llava(("human", "<image>"), ("gpt", "red"), image="missing.png")
    message = load_one_bad(tmp_path, image_root, record)
    assert f"image {image_root / 'missing.png'} does not exist" in message


@pytest.mark.parametrize(
    "value, image_field",
    [("<image> and <image>", {"image": "a.png"}), ("no placeholder", {"images": ["a.png"]})],
)
def test_image_count_must_match_placeholders(tmp_path, image_root, value, image_field):
    placeholders = value.count("<image>")
    record = llava(("human", value), ("gpt", "red"), **image_field)
    message = load_one_bad(tmp_path, image_root, record)
    assert f"{placeholders} image placeholder(s) but 1 image(s)" in message


@pytest.mark.parametrize("how", ["relative, through ..", "absolute"])
def test_image_outside_root_is_refused_unless_allowed(tmp_path, image_root, how):
    write_png(tmp_path / "outside.png")
    image = str((tmp_path / "outside.png").resolve()) if how == "absolute" else "../outside.png"
    record = llava(("human", "<image>"), ("gpt", "red"), image=image)
    assert "points outside --image_root" in load_one_bad(tmp_path, image_root, record)

    records = load_records(str(tmp_path / "data.jsonl"), str(image_root), allow_images_outside_root=True)
    assert records[1]["images"] == [(tmp_path / "outside.png").resolve()]


def test_pickle_dataset_is_refused_with_the_reason(tmp_path):
    path, ran = tmp_path / "data.pkl", tmp_path / "the pickle ran"
    path.write_bytes(pickle_that_touches(ran))
    with pytest.raises(DataError, match="pickle files are refused, since loading one runs arbitrary code"):
        load_records(str(path))
    assert not ran.exists()  # refused before loading, not after


def test_all_problems_of_a_file_are_reported_together(tmp_path, image_root):
    records = [
        llava(("human", "Hi")),  # no assistant
        LLAVA_RECORDS[0],
        llava(("human", "<image>"), ("gpt", "red"), id="x7", image="missing.png"),
        llava(("human", "Hi"), ("robot", "Hello")),
    ]
    with pytest.raises(DataError) as error:
        load_records(str(write_json(tmp_path / "data.json", records)), str(image_root))
    message = str(error.value)
    assert message.startswith(f"3 problem(s) in {tmp_path / 'data.json'}:")
    assert "record #0: the conversation has no assistant turn" in message
    assert "record #2 (id x7): image" in message
    assert "record #3: unknown role" in message
    assert "record #1" not in message


# --- images -------------------------------------------------------------------------------------------------


def test_16_bit_grayscale_is_stretched_to_the_full_8_bit_range(tmp_path):
    pixels = np.linspace(1000, 4000, 64).reshape(8, 8).astype(np.uint16)
    path = tmp_path / "xray.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"

    image = load_image(path)
    array = np.asarray(image)
    assert image.mode == "RGB"
    assert (array.min(), array.max()) == (0, 255)
    assert array[0, 0].tolist() == [0, 0, 0] and array[7, 7].tolist() == [255, 255, 255]
    assert len(np.unique(array)) == 64  # a gradient, not clipped to one value


def test_8_bit_grayscale_becomes_rgb_unchanged(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8)).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == [[0, 100], [200, 255]]
    assert np.asarray(image)[1, 0].tolist() == [200, 200, 200]


# --- ConversationDataset ------------------------------------------------------------------------------------


def test_dataset_item_is_tokenized_and_its_errors_name_the_record(tmp_path, image_root, tiny_processor):
    path = write_jsonl(tmp_path / "data.jsonl", [LLAVA_RECORDS[0]])
    records = load_records(str(path), str(image_root))

    sample = ConversationDataset(records, tiny_processor, max_length=None)[0]
    labelled = sample["input_ids"][sample["labels"] != IGNORE_INDEX]
    assert tiny_processor.tokenizer.decode(labelled) == " red</s>"
    assert tuple(sample["pixel_values"].shape) == (1, 3, 32, 32)

    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}, record at line 1 \(id q1\): .*max_length=5 would cut"
    ):
        ConversationDataset(records, tiny_processor, max_length=5)[0]


@pytest.mark.extended  # three fresh interpreters: `make test-extended`
def test_data_benchmark_measures_each_mode(tmp_path):
    from tests.conftest import run_command

    result = run_command(
        [sys.executable, "scripts/benchmark_data.py", "--records", "300", "--output_dir", tmp_path],
        timeout=300,
    )
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(row["mode"], row["records"]) for row in rows] == [("dicts", 300), ("cold", 300), ("warm", 300)]
    assert all(row["rss_mib"] >= row["baseline_rss_mib"] > 0 for row in rows)
    assert "| 300 | warm |" in result.stdout


@pytest.mark.extended  # four launches and fresh interpreters: `make test-extended`
def test_data_benchmark_measures_a_datasets_folder_the_workers_and_the_launch_to_the_first_step(tmp_path):
    from tests.conftest import run_command

    modes = ["dicts", "cold", "warm", "workers", "first-step-cold", "first-step-warm"]
    args = ["--format", "datasets", "--records", "200", "--output_dir", tmp_path, "--modes", *modes]
    run_command([sys.executable, "scripts/benchmark_data.py", *args], timeout=600)
    rows = {
        row["mode"]: row for row in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    }
    assert sorted(rows) == sorted(modes) and all(row["format"] == "datasets" for row in rows.values())
    # the image bytes held as dicts, not by the records cache
    assert rows["dicts"]["anonymous_mib"] - rows["warm"]["anonymous_mib"] > 6  # about 66 KB a row
    assert rows["workers"]["workers"] == 4 and 0 < rows["workers"]["worker_private_dirty_mib_max"] < 512
    cold, warm = rows["first-step-cold"], rows["first-step-warm"]
    assert 0 < warm["seconds_to_training"] < warm["seconds_to_first_step_end"]
    assert (
        "checked by" in " ".join(cold["preflight"]) and "the check of an earlier run" in warm["preflight"][0]
    )
