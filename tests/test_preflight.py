"""The preflight finds, before any weights load, every record that would fail mid-run, names it, and either
stops the run or (on request) drops exactly those records."""

import json
import sys

import pytest
from PIL import Image
from transformers import AutoProcessor

from tests.conftest import run_command
from vlm_recipes.data import ConversationDataset, DataError, load_records
from vlm_recipes.preflight import preflight


def record(record_id, image, question="What color is the shape?", answer="red"):
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "conversations": turns}


@pytest.fixture
def faulty_dataset(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    long_question = " ".join(["color"] * 200)  # pushes the answer past max_length
    records = [
        record("good-1", "good.png"),
        record("corrupt", "corrupt.png"),
        record("no-answer-left", "good.png", question=long_question),
        record("good-2", "good.png"),
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_preflight_lists_every_bad_record_then_stops(tiny_llava, faulty_dataset):
    processor = AutoProcessor.from_pretrained(tiny_llava)
    dataset = ConversationDataset(
        load_records(str(faulty_dataset), str(faulty_dataset.parent)), processor, 128
    )
    with pytest.raises(DataError) as error:
        preflight(dataset, str(faulty_dataset))
    message = str(error.value)
    assert message.startswith(f"2 of 4 records of {faulty_dataset} cannot become training samples")
    assert "record #1 (id corrupt)" in message and "record #2 (id no-answer-left)" in message
    assert "no assistant tokens are left" in message and "--skip_bad_records true" in message
    assert "good-1" not in message and "good-2" not in message


def test_preflight_can_skip_the_bad_records_and_says_which(tiny_llava, faulty_dataset):
    processor = AutoProcessor.from_pretrained(tiny_llava)
    dataset = ConversationDataset(
        load_records(str(faulty_dataset), str(faulty_dataset.parent)), processor, 128
    )
    lines = []
    kept = preflight(dataset, str(faulty_dataset), skip_bad_records=True, log=lines.append)
    assert [r["id"] for r in kept.records] == ["good-1", "good-2"]
    assert lines[0] == f"preflight: skipping 2 of 4 records of {faulty_dataset}:"
    assert len(lines) == 3 and "id corrupt" in lines[1] and "id no-answer-left" in lines[2]


def test_recipe_stops_on_bad_records_before_loading_weights(tiny_llava, faulty_dataset, tmp_path):
    result = run_command(
        [sys.executable, "recipes/llava.py", "--config", "recipes/configs/llava_demo.yaml",
         "--model_name_or_path", tiny_llava, "--dataset_path", faulty_dataset,
         "--image_root", faulty_dataset.parent, "--output_dir", tmp_path / "out"],
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "2 of 4 records" in result.stderr and "before loading the model" in result.stderr
    assert "Loading weights" not in result.stderr  # stopped before any weights were read
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_validate_data_script(tiny_llava, faulty_dataset):
    command = [sys.executable, "scripts/validate_data.py", "--model_name_or_path", tiny_llava,
               "--dataset_path", faulty_dataset, "--image_root", faulty_dataset.parent, "--max_length", "128"]  # fmt: skip
    result = run_command(command, check=False)
    assert result.returncode == 1 and "id corrupt" in result.stderr
