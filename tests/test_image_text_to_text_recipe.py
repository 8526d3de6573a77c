"""recipes/image_text_to_text.py, the recipe for any AutoModelForImageTextToText model, on tiny Gemma 3, Idefics3
(SmolVLM), InternVL and Mistral 3 models that carry their real checkpoints' chat templates
(../shared/real-checkpoints): labels hold exactly the answers and their end tokens although each processor wraps
images in tokens of its own; end to end under the shared ZeRO-3 offload config on 2 processes (the loss falls, the
saved model equals the trained weights); and the recipes' shared structure: each differs from the others only in
its docstring and its MODEL-SPECIFIC block."""

import re

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.conftest import (
    REPO,
    assert_planner_counts_what_the_run_trained,
    assert_saved_equals_trained,
    assistant,
    labelled_spans,
    launch_recipe,
    logged_losses,
    user,
)
from tests.real_checkpoints import requires_real
from vlm_recipes.collator import ConversationCollator
from vlm_recipes.masking import image_tokens_at_cap, tokenize_conversation

# family -> (the real folder its chat template comes from, the end of an answer in that template)
ARCHITECTURES = {
    "gemma3": ("gemma-3-4b-it", "<end_of_turn>"),
    "idefics3": ("smolvlm2-256m-video-instruct", "<end_of_utterance>"),
    "internvl": ("internvl3-1b-hf", "<|im_end|>"),
    "mistral3": ("mistral-small-3.1-24b-instruct-2503", "</s>"),
}
# Gemma 3 (wrapper tokens around each image) and Idefics3 (other module names, tiles) run in `make test`; InternVL and
# Mistral 3 repeat those situations and run in `make test-extended`.
E2E_MARKS = {"internvl": (pytest.mark.extended,), "mistral3": (pytest.mark.extended,)}


def recipe_body(path) -> str:
    """The recipe without its docstring and its MODEL-SPECIFIC block."""
    text = path.read_text()
    text = text[text.index('"""', 3) + 3 :]
    start = text.index("# ==== MODEL-SPECIFIC")
    end = text.index("\n", text.index("# ==== end of MODEL-SPECIFIC")) + 1
    return text[:start] + text[end:]


def test_the_recipes_differ_only_in_their_docstring_and_model_specific_block():
    """A new model is a copy of a recipe with another docstring and block: what lies outside them is the same text in
    every recipe built that way (CheXagent's, which assembles its model from two checkpoints, is not)."""
    recipes = ["llava.py", "qwen_vl.py", "image_text_to_text.py"]
    bodies = {name: recipe_body(REPO / "recipes" / name) for name in recipes}
    assert len(set(bodies.values())) == 1, [name for name in recipes if bodies[name] != bodies["llava.py"]]
    assert "MODEL_TYPES" in bodies["llava.py"] and "PARTS" in bodies["llava.py"]  # main() reads the block


def with_template(family, *marks):
    """The family as a test parameter, skipped where its real chat template is absent."""
    return pytest.param(family, marks=[requires_real(ARCHITECTURES[family][0]), *marks])


@pytest.mark.parametrize("family", [with_template(family) for family in ARCHITECTURES])
def test_labels_hold_the_answers_although_the_processor_wraps_each_image_in_its_own_tokens(
    tiny_model, family
):
    end = ARCHITECTURES[family][1]
    processor = AutoProcessor.from_pretrained(tiny_model(family))
    messages = [
        user("What color is the shape?", images=2),
        assistant("red"),
        user("And the side?"),
        assistant("left"),
    ]
    sample = tokenize_conversation(
        processor, messages, [Image.new("RGB", (64, 64)), Image.new("RGB", (60, 40))]
    )
    assert [text.strip() for text in labelled_spans(processor, sample)] == [f"red{end}", f"left{end}"]
    text = processor.tokenizer.decode(sample["input_ids"])
    image_tokens = (sample["input_ids"] == processor.image_token_id).sum()
    assert image_tokens >= 2 and image_tokens_at_cap(processor) >= 1, text
    batch = ConversationCollator(processor)(
        [sample, tokenize_conversation(processor, [user("Hi"), assistant("yes")], [])]
    )
    loss = AutoModelForImageTextToText.from_pretrained(tiny_model(family))(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.distributed
@pytest.mark.parametrize("family", [with_template(f, *E2E_MARKS.get(f, ())) for f in ARCHITECTURES])
def test_each_architecture_trains_under_zero3_on_two_processes_and_reloads(
    tiny_model, demo_data, tmp_path, family
):
    # max_length 640: Mistral-Small-3.1's template writes a default system prompt of some 400 of our tokens
    model_dir, output_dir = tiny_model(family), tmp_path / family
    args = [
        "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", model_dir,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
        "--max_steps", "24", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--logging_steps", "4", "--save_strategy", "steps", "--save_steps", "24", "--max_length", "640",
    ]  # fmt: skip
    launch_recipe("image_text_to_text.py", args)
    losses = logged_losses(output_dir)
    assert losses[24] < 0.6 * losses[4], losses
    changed = assert_saved_equals_trained(AutoModelForImageTextToText, output_dir, "checkpoint-24", model_dir)
    assert any(re.match(r"model\.(multi_modal_projector|connector)\.", name) for name in changed)
    assert any(re.match(r"model\.(language_model|text_model)\.", name) for name in changed)
    assert not any(re.match(r"model\.(vision_tower|vision_model)\.", name) for name in changed)  # frozen
    assert_planner_counts_what_the_run_trained("image_text_to_text", args)


def test_a_model_whose_parts_are_not_where_the_block_says_is_refused_naming_its_modules(tiny_model):
    from vlm_recipes.config import ConfigError
    from vlm_recipes.parts import ModelParts, require_parts

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("llava"))
    wrong = ModelParts(
        vision_tower="model.visual", projector=("model.merger",), language_model="model.language_model"
    )
    with pytest.raises(ConfigError, match=r"no vision tower \(model\.visual\).*model\.vision_tower"):
        require_parts(model, wrong)
