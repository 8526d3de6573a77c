"""The preflight finds, before any weights load, every record that would fail mid-run, names it, and either
stops the run or (on request) drops exactly those records."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from tests.conftest import run_command
from vlm_recipes.data import ConversationDataset, DataError, load_records, read_records
from vlm_recipes.preflight import FixedSize, MeasuredImage, PixelBudget, image_fit_of, image_report, preflight


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
    assert "id corrupt" in lines[1] and "id no-answer-left" in lines[2]
    assert lines[3].startswith(f"preflight: 2 images of {faulty_dataset}, 32x32 to 32x32")  # the kept ones
    assert len(lines) == 4


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


def test_validate_data_script(tiny_llava, faulty_dataset, run_in_process):
    outcome, _, report = run_in_process(
        "scripts/validate_data.py", "--model_name_or_path", tiny_llava, "--dataset_path", faulty_dataset,
        "--image_root", faulty_dataset.parent, "--max_length", "128",
    )  # fmt: skip
    assert outcome == "SystemExit: 1"
    assert f"2 of 4 records of {faulty_dataset} cannot become training samples" in report
    assert "record #1 (id corrupt)" in report and "record #2 (id no-answer-left)" in report  # every bad one
    assert "good-1" not in report and "good-2" not in report  # and only those


def test_validate_data_finds_every_problem_of_a_mixed_bad_dataset_in_one_run(
    tiny_llava, tmp_path, run_in_process
):
    """Problems found when reading a record (malformed line, missing images, placeholder count) and when decoding
    and tokenizing it (truncated PNG, a text file named .png, no answer left) are listed together: one run, one
    list, every bad record with all that is wrong with it."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "good.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "whole.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    (tmp_path / "notes.png").write_text("these are my notes, not an image")
    two_images = {**record("two-missing", "gone-1.png"), "image": ["gone-1.png", "gone-2.png"]}
    two_images["conversations"][0]["value"] = "<image>\n<image>\nWhat color are they?"
    lines = [
        json.dumps(record("good-1", "good.png")),
        '{"id": "broken", "image": "good.png", "conversations": [',
        json.dumps(record("missing", "gone.png")),
        json.dumps(two_images),
        json.dumps(record("truncated", "truncated.png")),
        json.dumps(record("text", "notes.png")),
        json.dumps(record("no-answer-left", "good.png", question=" ".join(["color"] * 200))),
        json.dumps(record("placeholders", "good.png", question="<image>\nand again <image>")),
        json.dumps(record("good-2", "good.png")),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    outcome, _, report = run_in_process(
        "scripts/validate_data.py", "--model_name_or_path", tiny_llava, "--dataset_path", tmp_path / "train.jsonl",
        "--image_root", tmp_path, "--max_length", "128",
    )  # fmt: skip
    assert outcome == "SystemExit: 1"
    assert f"7 of 9 records of {tmp_path / 'train.jsonl'} cannot become training samples" in report, report
    listed = {line.strip() for line in report.splitlines() if ", record " in line}
    expected = {  # the record's label, and what the line must say
        "at line 2": "malformed JSON", "(id missing)": "gone.png does not exist",
        "(id truncated)": "truncated.png", "(id text)": "notes.png", "(id no-answer-left)": "no assistant tokens",
        "(id placeholders)": "placeholder",
    }  # fmt: skip
    for label, says in expected.items():
        assert any(label in line and says in line for line in listed), (label, says, report)
    both = [line for line in listed if "(id two-missing)" in line]
    assert len(both) == 1 and "gone-1.png" in both[0] and "gone-2.png" in both[0], report  # both, in one line
    assert not any("good-" in line for line in listed)
    assert len(listed) == 7, report


# ---- the preflight cache ------------------------------------------------------------------------------------------


def test_a_second_preflight_of_the_same_records_reads_the_first_ones_check(
    tiny_llava, faulty_dataset, monkeypatch
):
    import vlm_recipes.preflight as preflight_module

    processor = AutoProcessor.from_pretrained(tiny_llava)

    def checked_twice(max_length=128):
        lines = []
        dataset = ConversationDataset(read_kept(faulty_dataset), processor, max_length)
        kept = preflight(dataset, str(faulty_dataset), skip_bad_records=True, log=lines.append)
        return [r["id"] for r in kept.records], lines

    first_ids, first_lines = checked_twice()
    real_check = preflight_module.check_every_record
    monkeypatch.setattr(preflight_module, "check_every_record", lambda *a, **k: pytest.fail("checked again"))
    again_ids, again_lines = checked_twice()
    assert again_ids == first_ids == ["good-1", "good-2"]
    assert "(the check of an earlier run with the same records and processor, from " in again_lines[0]
    assert again_lines[1:] == first_lines[1:]  # the same problems listed, the same image report
    # what the check depends on, changed: checked again
    monkeypatch.setattr(preflight_module, "check_every_record", real_check)
    calls = []
    monkeypatch.setattr(
        preflight_module, "check_every_record", lambda *a, **k: calls.append(1) or real_check(*a, **k)
    )
    checked_twice(max_length=120)  # another max_length
    Image.new("RGB", (48, 48), "red").save(faulty_dataset.parent / "good.png")  # an image replaced in place
    checked_twice()
    assert len(calls) == 2


def read_kept(path):
    records, _ = read_records(str(path), str(path.parent))
    return records


def test_a_long_preflight_reports_its_progress(tiny_llava, faulty_dataset, monkeypatch):
    import vlm_recipes.preflight as preflight_module

    monkeypatch.setattr(preflight_module, "PROGRESS_EVERY_S", 0.0)
    records = json.loads(faulty_dataset.read_text())
    many = faulty_dataset.with_name("many.json")
    many.write_text(json.dumps([records[0]] * 200))  # more than one batch of 64
    dataset = ConversationDataset(read_kept(many), AutoProcessor.from_pretrained(tiny_llava), 128)
    lines = []
    preflight(dataset, str(many), log=lines.append)
    progress = [line for line in lines if "records checked by this process" in line]
    assert progress and progress[0].startswith("preflight: 64 of 200 records checked by this process, ")
    assert "records/s, about " in progress[0] and progress[0].endswith(" left")


def test_group_by_length_takes_the_preflights_lengths_without_tokenizing_again(
    tiny_llava, faulty_dataset, tmp_path, monkeypatch
):
    from transformers import LlavaForConditionalGeneration, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from vlm_recipes.training import RecipeTrainer

    processor = AutoProcessor.from_pretrained(tiny_llava)
    dataset = preflight(ConversationDataset(read_kept(faulty_dataset), processor, 128), "d", skip_bad_records=True,
                        log=lambda line: None)  # fmt: skip
    tokenized = [len(dataset[k]["input_ids"]) for k in range(len(dataset))]
    assert dataset.lengths == tokenized  # the kept samples' real lengths, in order
    args = TrainingArguments(output_dir=str(tmp_path), train_sampling_strategy="group_by_length",
                             per_device_train_batch_size=2, use_cpu=True, report_to=[])  # fmt: skip
    trainer = RecipeTrainer(model=LlavaForConditionalGeneration.from_pretrained(tiny_llava), args=args,
                            train_dataset=dataset, eval_dataset=dataset)  # fmt: skip
    monkeypatch.setattr(ConversationDataset, "__getitem__", lambda *args: pytest.fail("tokenized again"))
    for sampler in (trainer._get_train_sampler(), trainer._get_eval_sampler(dataset)):
        assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == tokenized
        assert sorted(sampler) == list(range(len(dataset)))
    # Every process draws the same order (accelerate gives each its share of the batches), whatever its global
    # random state: the processes' preflights differ. A new epoch draws a new order; a resumed run, the same again.
    many = SimpleNamespace(lengths=[100 + k % 7 for k in range(500)])  # enough samples for orders to differ
    orders = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        sampler = trainer._get_train_sampler(many)
        orders.append(list(sampler))
        sampler.set_epoch(1)
        orders.append(list(sampler))
    assert orders[0] == orders[2] and orders[1] == orders[3] and orders[0] != orders[1]


# ---- images against what the image processor does with them ---------------------------------------------------


def dataset_of_images(tmp_path, sizes: dict[str, tuple[int, int]], processor) -> ConversationDataset:
    """One record per image, named by its id, each image of the given (width, height)."""
    for name, size in sizes.items():
        Image.new("RGB", size, "red").save(tmp_path / f"{name}.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record(name, f"{name}.png") for name in sizes]))
    return ConversationDataset(load_records(str(path), str(tmp_path)), processor, None)


def test_images_beyond_the_qwen_pixel_caps_are_counted_with_the_most_extreme(tiny_model, tmp_path):
    # The tiny Qwen2.5-VL processor's caps: min_pixels 784 (28x28), max_pixels 3136 (56x56).
    path = tiny_model("qwen2.5-vl")
    sizes = {"within": (40, 40), "big": (400, 300), "wide": (200, 100), "small": (10, 10)}
    lines = []
    kept = preflight(
        dataset_of_images(tmp_path, sizes, AutoProcessor.from_pretrained(path)), "d", log=lines.append
    )
    assert len(kept) == 4  # a note, not a failure: nothing is dropped
    source = f"{tmp_path / 'train.json'}, record"
    assert lines == [
        "preflight: all 4 records of d become training samples",
        "preflight: 4 images of d, 10x10 to 400x300; the image processor resizes each into 784..3,136 pixels "
        "(min_pixels..max_pixels), keeping its aspect ratio",
        "preflight: 2 of 4 images are over max_pixels and downscaled, losing detail; the largest, 400x300 (6.2x "
        f"smaller per edge), is {source} #1 (id big); raise --max_pixels to keep more (more image tokens and "
        "memory per image)",
        f"preflight: 1 of 4 images is under min_pixels and upscaled; the smallest, 10x10 (enlarged 2.8x per edge), "
        f"is {source} #3 (id small)",
    ]
    # The caps are read from the processor, so the run's --min_pixels/--max_pixels are what is measured against.
    roomy = AutoProcessor.from_pretrained(path, size={"shortest_edge": 64, "longest_edge": 200_000})
    lines = []
    preflight(dataset_of_images(tmp_path, sizes, roomy), "d", log=lines.append)
    assert len(lines) == 2 and "64..200,000 pixels" in lines[1]


def test_a_pixel_budget_is_taken_from_how_the_processor_behaves_not_from_its_family(tiny_model, tiny_llava):
    # The same size keys on a processor that crops every image to 32x32 (the tiny LLaVA's CLIP) are edge lengths,
    # not a budget: probe images of different areas all give the same tokens, so it is read as the fixed size it is.
    edges = AutoProcessor.from_pretrained(tiny_llava, size={"shortest_edge": 32, "longest_edge": 3136})
    edges.image_processor.merge_size = (
        2  # a patch-merging tower's habit, which once was taken to mean a budget
    )
    assert image_fit_of(edges) == FixedSize(32, 32, shortest_edge=32)
    budget = AutoProcessor.from_pretrained(
        tiny_model("qwen3-vl"), size={"shortest_edge": 1024, "longest_edge": 16384}
    )
    assert image_fit_of(budget) == PixelBudget(min_pixels=1024, max_pixels=16384)


def test_an_aspect_ratio_the_qwen_processor_refuses_is_a_named_problem(tiny_model, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_model("qwen2.5-vl"))
    dataset = dataset_of_images(tmp_path, {"ok": (40, 40), "strip": (3000, 10)}, processor)
    with pytest.raises(DataError) as error:
        preflight(dataset, "d")
    assert (
        f"{tmp_path / 'train.json'}, record #1 (id strip): image 3000x10 has an aspect ratio of 300:1, and the "
        "image processor refuses more than 200:1; crop it, pad it, or cut a long strip" in str(error.value)
    )
    kept = preflight(dataset, "d", skip_bad_records=True, log=lambda line: None)
    assert [r["id"] for r in kept.records] == ["ok"]


def test_fixed_size_processors_report_what_the_crop_or_the_stretch_loses(tiny_llava, tmp_path):
    # LLaVA's CLIP processor: shortest edge to 32, then the centre 32x32; a 4:1 image keeps a quarter.
    processor = AutoProcessor.from_pretrained(tiny_llava)
    lines = []
    preflight(
        dataset_of_images(tmp_path, {"square": (32, 32), "wide": (120, 30)}, processor), "d", log=lines.append
    )
    assert lines[1].endswith(
        "the image processor resizes each so its shortest edge is 32, then keeps the centre 32x32"
    )
    assert lines[-1] == (
        "preflight: 1 of 2 images is more than 2:1 off the model's shape; the most extreme, 120x30 (the crop keeps "
        f"25.0% of it), is {tmp_path / 'train.json'}, record #1 (id wide); pad such images to the model's shape "
        "beforehand if their edges matter"
    )
    # SigLIP's processor (CheXagent) stretches every image to its size instead.
    images = [MeasuredImage(0, 32, 32), MeasuredImage(1, 120, 30)]
    source_of = "a, record #{}".format
    stretched = image_report(FixedSize(32, 32, shortest_edge=None), images, "a", processor, source_of)
    assert (
        "stretches each to 32x32" in stretched[0] and "120x30 (stretched 4.0x out of shape)" in stretched[-1]
    )
    unknown = image_report(None, images, "a", processor, source_of)
    assert unknown == [
        "preflight: 2 images of a, 32x32 to 120x30; how CLIPImageProcessor resizes them is not known to the "
        "preflight, so detail lost is not reported"
    ]


def test_an_image_beyond_pillows_decompression_limit_is_a_named_problem(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses beyond twice this: 2,000 pixels
    dataset = dataset_of_images(
        tmp_path, {"ok": (30, 30), "huge": (64, 64)}, AutoProcessor.from_pretrained(tiny_llava)
    )
    with pytest.raises(DataError) as error:
        preflight(dataset, "d")
    message = str(error.value)
    assert "record #1 (id huge): Image size (4096 pixels) exceeds limit of 2000 pixels" in message
    assert "Downscale the image beforehand" in message and "id ok" not in message


def dataset_of_videos(tmp_path, frame_counts: dict[str, list[int]], processor) -> ConversationDataset:
    """One LLaVA-format record per id, holding videos (lists of frame files) of the given frame counts."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "frame.png")
    records = []
    for name, counts in frame_counts.items():
        question = "".join("<video>\n" for _ in counts) + "What color is the shape?"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]
        videos = [["frame.png"] * count for count in counts]
        records.append({"id": name, "videos": videos, "conversations": turns})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return ConversationDataset(load_records(str(path), str(tmp_path)), processor, None)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_videos_of_different_lengths_are_named_where_the_processor_stacks_frames(
    tiny_model, tmp_path, batch_size
):
    # LLaVA-OneVision's processor stacks each video's frames (videos x frames x pixels): a batch of a 4-frame and a
    # 6-frame video would hold 2 frames of zeros the model reads as frames. Qwen-VL's keeps a grid per video.
    frame_counts = {"four": [4], "four-again": [4], "six": [6], "mixed": [4, 6]}
    stacking = AutoProcessor.from_pretrained(tiny_model("llava-onevision"))
    with pytest.raises(DataError) as refused:
        preflight(
            dataset_of_videos(tmp_path, frame_counts, stacking),
            "d",
            log=lambda line: None,
            batch_size=batch_size,
        )
    message = str(refused.value)
    named = {name for name in frame_counts if f"(id {name})" in message}
    assert named == ({"six", "mixed"} if batch_size > 1 else {"mixed"}), message
    assert "give every video 4 frames (the most common count here)" in message
    assert ("--per_device_train_batch_size 1" in message) == (batch_size > 1)
    kept = preflight(
        dataset_of_videos(tmp_path, frame_counts, stacking), "d", skip_bad_records=True, log=lambda line: None,
        batch_size=batch_size,
    )  # fmt: skip
    assert len(kept) == 4 - len(named)
    gridded = AutoProcessor.from_pretrained(tiny_model("qwen2.5-vl"))
    assert (
        len(
            preflight(
                dataset_of_videos(tmp_path, frame_counts, gridded), "d", log=lambda line: None, batch_size=2
            )
        )
        == 4
    )
