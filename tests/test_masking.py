"""Label masks compared token by token with hand-worked expectations.

Each expectation lists the sample's tokens, the labelled ones in brackets: "[red]" means the label of that
position is the token's own id, a bare token means its label is -100.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from vlm_recipes.collator import ConversationCollator
from vlm_recipes.masking import (
    IGNORE_INDEX,
    CharSpan,
    SampleError,
    assistant_char_spans,
    expand_mask,
    render,
    token_mask_from_spans,
    tokenize_conversation,
)

# --- shared fixtures -------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]

VOCAB = {
    "<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "<|im_start|>": 5, "<|im_end|>": 6,
    "USER": 7, ":": 8, "ASSISTANT": 9, "system": 10, "user": 11, "assistant": 12,
    "You": 13, "are": 14, "a": 15, "helpful": 16, ".": 17, "What": 18, "color": 19, "?": 20, "red": 21,
    "circle": 22, "Which": 23, "side": 24, "left": 25, "Same": 26, "shape": 27, "yes": 28, "Be": 29,
    "brief": 30, "hi": 31,
}  # fmt: skip

# Vicuna style, no generation markers: the end token closes each assistant turn.
VICUNA_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{% for p in m['content'] %}{{ p['text'] }} {% endfor %}{{ '\\n' }}"
    "{%- elif m['role'] == 'user' -%}USER: "
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} {% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{%- else -%}ASSISTANT: {% for p in m['content'] %}{{ p['text'] }} {% endfor %}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# ChatML layout with a default system turn and generation markers around the assistant's content.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "<|im_start|>system{{ '\\n' }}You are a helpful assistant .<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{% generation %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}<|im_end|>{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)

TEMPLATES = {"vicuna": VICUNA_TEMPLATE, "chatml": CHATML_TEMPLATE}
I = "<image>"  # noqa: E741


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    model = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    # Like LLaMA: a plain tokenizer call prepends <s>.
    model.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def build_processor(tokenizer, template: str, image_size: int = 16) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def processors_by_name(word_tokenizer):
    return {name: build_processor(word_tokenizer, template) for name, template in TEMPLATES.items()}


IMG = object()  # marks an image part in user()


def user(*parts):
    return {
        "role": "user",
        "content": [{"type": "image"} if p is IMG else {"type": "text", "text": p} for p in parts],
    }


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def system(text):
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def images(n):
    return [Image.new("RGB", (20, 20), "red") for _ in range(n)]


def marked(processor, sample) -> list[str]:
    """The sample's tokens, labelled ones in brackets; a label is either -100 or the token's own id."""
    out = []
    for token_id, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist(), strict=True):
        token = processor.tokenizer.convert_ids_to_tokens(token_id)
        assert label in (IGNORE_INDEX, token_id), f"label {label} on token {token!r}"
        out.append(token if label == IGNORE_INDEX else f"[{token}]")
    return out


SINGLE = [user(IMG, "What color ?"), assistant("a red circle .")]
MULTI_TURN = [user(IMG, "What color ?"), assistant("red"), user("Which side ?"), assistant("left")]

VICUNA_SINGLE = ["<s>", "USER", ":", I, I, I, I, "What", "color", "?", "ASSISTANT", ":",
                 "[a]", "[red]", "[circle]", "[.]", "[</s>]"]  # fmt: skip
CHATML_HEAD = ["<s>", "<|im_start|>", "system", "You", "are", "a", "helpful", "assistant", ".", "<|im_end|>"]
CHATML_SINGLE = CHATML_HEAD + ["<|im_start|>", "user", I, I, I, I, "What", "color", "?", "<|im_end|>",
                               "<|im_start|>", "assistant", "[a]", "[red]", "[circle]", "[.]", "[<|im_end|>]"]  # fmt: skip

# --- rendering ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected_text",
    [
        ("vicuna", "Be brief . \nUSER: <image> What color ? \nASSISTANT: red </s>\nUSER: Which side ? \n"
                   "ASSISTANT: left </s>\n"),
        ("chatml", "<|im_start|>system\nBe brief .<|im_end|>\n<|im_start|>user\n<image>\nWhat color ?<|im_end|>\n"
                   "<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nWhich side ?<|im_end|>\n"
                   "<|im_start|>assistant\nleft<|im_end|>\n"),
    ],
)  # fmt: skip
def test_templates_render_the_expected_text(processors_by_name, name, expected_text):
    assert render(processors_by_name[name], [system("Be brief ."), *MULTI_TURN]) == expected_text


@pytest.mark.parametrize(
    "name, expected",
    [("vicuna", [" red </s>", " left </s>"]), ("chatml", ["red<|im_end|>", "left<|im_end|>"])],
)
def test_assistant_char_spans_cover_each_answer_and_its_end_token(processors_by_name, name, expected):
    processor = processors_by_name[name]
    text = render(processor, MULTI_TURN)
    spans = assistant_char_spans(processor, MULTI_TURN, text)
    assert [text[span.start : span.end] for span in spans] == expected


def test_token_mask_from_spans_marks_tokens_overlapping_a_span():
    # "<s>" (no characters), "USER", ":", " red", "</s>" with one span over " red</s>".
    offsets = [(0, 0), (0, 4), (4, 5), (5, 9), (9, 13)]
    assert token_mask_from_spans(offsets, [CharSpan(5, 13)]) == [False, False, False, True, True]
    assert token_mask_from_spans(offsets, []) == [False] * 5


# --- expand_mask --------------------------------------------------------------------------------------------


def test_expand_mask_repeats_adjacent_image_placeholders_unlabelled():
    plain_ids, plain_mask = [7, 4, 4, 21], [False, False, False, True]
    expanded = [7, 4, 4, 4, 4, 4, 4, 4, 4, 21]
    assert expand_mask(plain_ids, plain_mask, expanded, {4}) == [False] * 9 + [True]


def test_expand_mask_never_labels_image_tokens_even_if_the_plain_mask_does():
    assert expand_mask([7, 4, 21], [True, True, True], [7, 4, 4, 4, 21], {4}) == [
        True,
        False,
        False,
        False,
        True,
    ]


def test_carry_mask_lines_up_tokens_a_processor_writes_around_each_image():
    """Gemma 3 expands <start_of_image> (4) into "\n\n" (9) <start_of_image> soft tokens (5) <end_of_image> (6)
    "\n\n": the tokens it adds stay unlabelled, the answer keeps its labels; a processor that changes a labelled token
    is refused."""
    from vlm_recipes.masking import carry_mask

    plain, plain_mask = [7, 4, 20, 21, 22], [False, False, False, True, True]
    expanded = [7, 9, 4, 5, 5, 5, 6, 9, 20, 21, 22]
    assert carry_mask(plain, plain_mask, expanded, {4, 5}) == [False] * 9 + [True, True]
    with pytest.raises(SampleError, match="changed labelled tokens"):
        carry_mask(plain, plain_mask, [7, 9, 4, 5, 6, 9, 20, 23, 22], {4, 5})


def test_expand_mask_raises_when_the_processor_changes_text_tokens():
    with pytest.raises(SampleError, match=r"position 2"):
        expand_mask([7, 4, 21], [False, False, True], [7, 4, 22], {4})


# --- tokenize_conversation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected, expected_labels",
    [
        ("vicuna", VICUNA_SINGLE, [-100] * 12 + [15, 21, 22, 17, 2]),
        ("chatml", CHATML_SINGLE, [-100] * 22 + [15, 21, 22, 17, 6]),
    ],
)
def test_single_turn_labels_only_the_answer_and_its_end_token(
    processors_by_name, name, expected, expected_labels
):
    processor = processors_by_name[name]
    sample = tokenize_conversation(processor, SINGLE, images(1))
    assert marked(processor, sample) == expected
    assert sample["labels"].tolist() == expected_labels
    assert sample["attention_mask"].tolist() == [1] * len(expected)
    assert tuple(sample["pixel_values"].shape) == (1, 3, 16, 16)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna", ["<s>", "USER", ":", I, I, I, I, "What", "color", "?", "ASSISTANT", ":", "[red]", "[</s>]",
                    "USER", ":", "Which", "side", "?", "ASSISTANT", ":", "[left]", "[</s>]"]),
        ("chatml", CHATML_HEAD + ["<|im_start|>", "user", I, I, I, I, "What", "color", "?", "<|im_end|>",
                                  "<|im_start|>", "assistant", "[red]", "[<|im_end|>]",
                                  "<|im_start|>", "user", "Which", "side", "?", "<|im_end|>",
                                  "<|im_start|>", "assistant", "[left]", "[<|im_end|>]"]),
    ],
)  # fmt: skip
def test_multi_turn_labels_both_answers_and_nothing_else(processors_by_name, name, expected):
    processor = processors_by_name[name]
    assert marked(processor, tokenize_conversation(processor, MULTI_TURN, images(1))) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna", ["<s>", "USER", ":", I, I, I, I, I, I, I, I, "Same", "shape", "?", "ASSISTANT", ":",
                    "[yes]", "[</s>]"]),
        ("chatml", CHATML_HEAD + ["<|im_start|>", "user", I, I, I, I, I, I, I, I, "Same", "shape", "?",
                                  "<|im_end|>", "<|im_start|>", "assistant", "[yes]", "[<|im_end|>]"]),
    ],
)  # fmt: skip
def test_two_images_in_one_turn_give_eight_unlabelled_image_tokens(processors_by_name, name, expected):
    processor = processors_by_name[name]
    sample = tokenize_conversation(processor, [user(IMG, IMG, "Same shape ?"), assistant("yes")], images(2))
    assert marked(processor, sample) == expected
    assert sample["pixel_values"].shape[0] == 2


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna", ["<s>", "USER", ":", I, I, I, I, "What", "color", "?", "ASSISTANT", ":", "[red]", "[</s>]",
                    "USER", ":", I, I, I, I, "Same", "shape", "?", "ASSISTANT", ":", "[yes]", "[</s>]"]),
        ("chatml", CHATML_HEAD + ["<|im_start|>", "user", I, I, I, I, "What", "color", "?", "<|im_end|>",
                                  "<|im_start|>", "assistant", "[red]", "[<|im_end|>]",
                                  "<|im_start|>", "user", I, I, I, I, "Same", "shape", "?", "<|im_end|>",
                                  "<|im_start|>", "assistant", "[yes]", "[<|im_end|>]"]),
    ],
)  # fmt: skip
def test_images_in_two_turns_are_unlabelled(processors_by_name, name, expected):
    processor = processors_by_name[name]
    messages = [user(IMG, "What color ?"), assistant("red"), user(IMG, "Same shape ?"), assistant("yes")]
    sample = tokenize_conversation(processor, messages, images(2))
    assert marked(processor, sample) == expected
    assert sample["pixel_values"].shape[0] == 2


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna", ["<s>", "Be", "brief", ".", "USER", ":", I, I, I, I, "What", "color", "?", "ASSISTANT", ":",
                    "[red]", "[</s>]"]),
        ("chatml", ["<s>", "<|im_start|>", "system", "Be", "brief", ".", "<|im_end|>",
                    "<|im_start|>", "user", I, I, I, I, "What", "color", "?", "<|im_end|>",
                    "<|im_start|>", "assistant", "[red]", "[<|im_end|>]"]),
    ],
)  # fmt: skip
def test_system_turn_is_never_labelled(processors_by_name, name, expected):
    processor = processors_by_name[name]
    messages = [system("Be brief ."), user(IMG, "What color ?"), assistant("red")]
    assert marked(processor, tokenize_conversation(processor, messages, images(1))) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna", ["<s>", "USER", ":", "What", "color", "?", "ASSISTANT", ":", "[red]", "[</s>]"]),
        ("chatml", CHATML_HEAD + ["<|im_start|>", "user", "What", "color", "?", "<|im_end|>",
                                  "<|im_start|>", "assistant", "[red]", "[<|im_end|>]"]),
    ],
)  # fmt: skip
def test_text_only_conversation_has_no_image_tokens_or_pixels(processors_by_name, name, expected):
    processor = processors_by_name[name]
    sample = tokenize_conversation(processor, [user("What color ?"), assistant("red")], [])
    assert marked(processor, sample) == expected
    assert "pixel_values" not in sample


def test_template_that_writes_bos_gets_a_single_bos(word_tokenizer):
    processor = build_processor(word_tokenizer, "{{ bos_token }}" + VICUNA_TEMPLATE)
    sample = tokenize_conversation(processor, [user("What color ?"), assistant("red")], [])
    assert marked(processor, sample) == [
        "<s>",
        "USER",
        ":",
        "What",
        "color",
        "?",
        "ASSISTANT",
        ":",
        "[red]",
        "[</s>]",
    ]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna", ["<s>", "ASSISTANT", ":", "[hi]", "[</s>]", "USER", ":", "What", "color", "?",
                    "ASSISTANT", ":", "[red]", "[</s>]"]),
        ("chatml", CHATML_HEAD + ["<|im_start|>", "assistant", "[hi]", "[<|im_end|>]",
                                  "<|im_start|>", "user", "What", "color", "?", "<|im_end|>",
                                  "<|im_start|>", "assistant", "[red]", "[<|im_end|>]"]),
    ],
)  # fmt: skip
def test_conversation_opened_by_the_assistant_labels_only_answers(processors_by_name, name, expected):
    processor = processors_by_name[name]
    messages = [assistant("hi"), user("What color ?"), assistant("red")]
    assert marked(processor, tokenize_conversation(processor, messages, [])) == expected


# --- padding ------------------------------------------------------------------------------------------------


def test_collator_pads_labels_with_ignore_index_and_input_ids_with_pad(processors_by_name):
    processor = processors_by_name["vicuna"]
    with_image = tokenize_conversation(processor, SINGLE, images(1))  # 17 tokens
    text_only = tokenize_conversation(processor, [user("What color ?"), assistant("red")], [])  # 10 tokens
    batch = ConversationCollator(processor)([with_image, text_only])

    assert batch["input_ids"][1].tolist() == [1, 7, 8, 18, 19, 20, 9, 8, 21, 2] + [3] * 7
    assert batch["labels"][1].tolist() == [-100] * 8 + [21, 2] + [-100] * 7
    assert batch["attention_mask"].tolist() == [[1] * 17, [1] * 10 + [0] * 7]
    assert torch.equal(batch["labels"][0], with_image["labels"])
    assert tuple(batch["pixel_values"].shape) == (1, 3, 16, 16)


def test_per_image_tensors_of_different_tile_counts_are_padded_with_zeros_like_the_processor_does():
    """Any-resolution tiling (LLaVA-NeXT, OneVision) gives each image its own number of tiles: rows are concatenated
    and the tile dimension padded with zeros (the model reads the real count from image_sizes); equal shapes are
    concatenated as they are."""
    from vlm_recipes.collator import concatenate_padded

    five_tiles, two_images_of_three = torch.ones(1, 5, 3, 2, 2), torch.full((2, 3, 3, 2, 2), 2.0)
    batch = concatenate_padded([five_tiles, two_images_of_three])
    assert tuple(batch.shape) == (3, 5, 3, 2, 2)
    assert torch.equal(batch[0], five_tiles[0]) and torch.equal(batch[1, :3], two_images_of_three[0])
    assert batch[1:, 3:].abs().sum() == 0
    masks = concatenate_padded([torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)])
    assert masks.tolist() == [[True] * 4, [True, True, False, False]]
    same = [torch.randn(4, 6), torch.randn(2, 6)]
    assert torch.equal(concatenate_padded(same), torch.cat(same))


# --- truncation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, max_length, expected",
    [
        ("vicuna", 14, VICUNA_SINGLE[:12] + ["[a]", "[red]"]),
        ("chatml", 24, CHATML_SINGLE[:22] + ["[a]", "[red]"]),
    ],
)
def test_truncation_inside_the_answer_cuts_labels_and_keeps_the_image(
    processors_by_name, name, max_length, expected
):
    processor = processors_by_name[name]
    sample = tokenize_conversation(processor, SINGLE, images(1), max_length=max_length)
    assert marked(processor, sample) == expected
    assert sample["attention_mask"].tolist() == [1] * max_length
    assert sample["pixel_values"].shape[0] == 1


@pytest.mark.parametrize(
    "name, max_length", [("vicuna", 5), ("chatml", 14)]
)  # both cut after 2 of 4 image tokens
def test_truncation_through_an_image_span_is_refused(processors_by_name, name, max_length):
    with pytest.raises(SampleError, match=rf"max_length={max_length} would cut through an image span"):
        tokenize_conversation(processors_by_name[name], SINGLE, images(1), max_length=max_length)


@pytest.mark.parametrize("name, max_length", [("vicuna", 7), ("chatml", 16)])  # ends right after the image
def test_truncation_leaving_no_answer_tokens_is_refused(processors_by_name, name, max_length):
    with pytest.raises(SampleError, match=rf"no assistant tokens .*max_length={max_length}"):
        tokenize_conversation(processors_by_name[name], SINGLE, images(1), max_length=max_length)


# --- the byte-level BPE tokenizer of scripts/make_tiny_model.py ---------------------------------------------


def test_bpe_tokenizer_labels_exactly_the_two_answers_with_their_end_token():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    make_tiny_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny_model)
    tokenizer = make_tiny_model.build_tokenizer()
    processor = build_processor(tokenizer, make_tiny_model.LLAVA_CHAT_TEMPLATE, image_size=32)
    messages = [
        user(IMG, "What color is the shape?"),
        assistant("red"),
        user("Which side of the picture is the shape on?"),
        assistant("left"),
    ]
    assert render(processor, messages) == (
        "USER: <image>\nWhat color is the shape?\nASSISTANT: red</s>\n"
        "USER: Which side of the picture is the shape on?\nASSISTANT: left</s>\n"
    )
    sample = tokenize_conversation(processor, messages, images(1))

    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    runs, run = [], []
    for token_id, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token_id
            run.append(token_id)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [tokenizer.decode(run) for run in runs] == [" red</s>", " left</s>"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 16  # (32 / 8) ** 2 patches
