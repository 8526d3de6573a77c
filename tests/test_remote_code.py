"""`trust_remote_code` is off unless asked for, in every recipe and script (docs/reliability.md, Safety): a
checkpoint whose config names its own Python code is refused before that code runs. The checkpoint here ships a
module that creates a file when it is imported, so running it would show; the same entry point given
`--trust_remote_code true` does run it, which shows the check can fail."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO, run_here

REMOTE_MODULE = """
from pathlib import Path

Path({marker!r}).touch()  # proof that this code ran

from transformers import PretrainedConfig


class RemoteConfig(PretrainedConfig):
    model_type = "remote_vlm"
"""


@pytest.fixture
def remote_checkpoint(tmp_path):
    """A checkpoint folder whose config, processor and tokenizer all point at code shipped in the folder."""
    folder, marker = tmp_path / "remote-model", tmp_path / "remote-code-ran"
    folder.mkdir()
    (folder / "remote.py").write_text(REMOTE_MODULE.format(marker=str(marker)))
    auto_map = {
        "AutoConfig": "remote.RemoteConfig", "AutoProcessor": "remote.RemoteProcessor",
        "AutoModelForImageTextToText": "remote.RemoteModel", "AutoModelForCausalLM": "remote.RemoteModel",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"model_type": "remote_vlm", "auto_map": auto_map}))
    (folder / "processor_config.json").write_text(
        json.dumps(
            {"processor_class": "RemoteProcessor", "auto_map": {"AutoProcessor": "remote.RemoteProcessor"}}
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "RemoteTokenizer",
                "auto_map": {"AutoTokenizer": ["remote.RemoteTokenizer", None]},
            }
        )
    )
    save_file({"weight": torch.zeros(1)}, folder / "model.safetensors")  # a checkpoint, as far as a look goes
    adapter = tmp_path / "adapter"  # a LoRA adapter on that checkpoint, for merge_lora.py
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": str(folder),
                "r": 8,
                "target_modules": ["q_proj"],
            }
        )
    )
    return folder, adapter, marker


def entry_points(model: Path, adapter: Path, demo_data: Path, out: Path) -> dict[str, list]:
    image = demo_data / "images" / "test_0000.png"
    data = ["--dataset_path", demo_data / "train.json", "--image_root", demo_data]
    recipe = ["--model_name_or_path", model, *data, "--output_dir", out, "--deepspeed", "none"]
    return {
        "recipes/llava.py": ["--config", "recipes/configs/llava_demo.yaml", *recipe],
        "recipes/qwen_vl.py": ["--config", "recipes/configs/qwen_vl_demo.yaml", *recipe],
        "recipes/chexagent.py": ["--config", "recipes/configs/chexagent_stage2_demo.yaml", *recipe],
        "scripts/infer.py": ["--model_name_or_path", model, "--image", image, "--prompt", "What color?"],
        "scripts/evaluate.py": ["--model_name_or_path", model, *data],
        "scripts/validate_data.py": ["--model_name_or_path", model, *data],
        "scripts/merge_lora.py": ["--adapter", adapter, "--output_dir", out / "merged"],
        "scripts/plan_memory.py": ["--model", model],
        "scripts/show_ds_config.py": ["--recipe", "llava", "--", "--model_name_or_path", model],
    }


@pytest.mark.parametrize("entry_point", list(entry_points(*[Path()] * 4)))
def test_code_shipped_with_a_checkpoint_is_not_run_unless_asked(
    entry_point, remote_checkpoint, demo_data, tmp_path, monkeypatch, capsys
):
    model, adapter, marker = remote_checkpoint
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = entry_points(model, adapter, demo_data, tmp_path / "out")[entry_point]
    outcome = run_here(entry_point, args, monkeypatch)
    said = outcome + capsys.readouterr().err
    assert not marker.exists(), f"{entry_point} ran the checkpoint's code: {said[-2000:]}"
    assert "trust_remote_code" in said, said[-2000:]  # refused, saying why; not failing on something else


def test_with_trust_remote_code_the_shipped_code_does_run(
    remote_checkpoint, demo_data, tmp_path, monkeypatch
):
    model, adapter, marker = remote_checkpoint
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies the code
    # A recipe's flag takes a value (HfArgumentParser), a script's is a switch (argparse).
    for entry_point, trust in [("recipes/llava.py", ["--trust_remote_code", "true"]),
                               ("scripts/infer.py", ["--trust_remote_code"])]:  # fmt: skip
        marker.unlink(missing_ok=True)
        # a copy per entry point: code already imported from a folder is not imported (run) again
        fresh = shutil.copytree(model, tmp_path / f"remote-model-for-{Path(entry_point).stem}")
        args = entry_points(fresh, adapter, demo_data, tmp_path / "out")[entry_point]
        run_here(entry_point, [*args, *trust], monkeypatch)
        assert marker.exists(), entry_point


def test_no_code_turns_trust_remote_code_on():
    """No call in the recipes, the scripts or the package passes trust_remote_code=True, and every
    --trust_remote_code flag defaults to off."""
    sources = [*REPO.glob("recipes/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("vlm_recipes/*.py")]
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), source
            if isinstance(node, ast.Call) and any(
                isinstance(arg, ast.Constant) and arg.value == "--trust_remote_code" for arg in node.args
            ):
                options = {k.arg: k.value for k in node.keywords}
                assert getattr(options.get("action"), "value", None) == "store_true", source
                assert "default" not in options, source
    from vlm_recipes.config import ModelArguments

    assert ModelArguments(model_name_or_path="x").trust_remote_code is False
