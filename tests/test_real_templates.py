"""Label masks on the chat templates the real checkpoints ship, compared token by token with hand-worked lists.

What users load is the Hub checkpoint's processor, not the tiny fixtures of test_masking.py, and each real template
has its own traps (../shared/real-checkpoints/README.md lists them): llava-1.5 writes no end token after an answer,
llava-onevision renders `assistant \\n` but prompts `assistant\\n`, Gemma folds the system prompt into the first
user turn and calls the assistant `model`, SmolVLM2's completion starts with a space, Llama-3.2-Vision refuses a
system message next to an image, Mistral-Small-3.1 writes today's date, Qwen3-VL Thinking drops the reasoning of
earlier turns. Every test reads the real files at test time (nothing is copied into the repository) and skips
where they are absent.

The rules checked (vlm_recipes/masking.py):
1. every answer is labelled together with the end token the template writes after it, and nothing else is
   (no image, system or user tokens, no whitespace after the end token);
2. a template that writes no special token after an answer (llava-1.5) gets the tokenizer's EOS appended and
   labelled; one that writes its own end token gets no extra EOS;
3. a template that rewrites earlier turns (Qwen3-VL Thinking) is searched for each answer inside its own turn, so
   the "yes" of "Answer yes or no." is never labelled;
4. images expand to as many image tokens as the processor says, and none of them is labelled.

Folders with a full processor go through the real processor, real images and real token strings. Template-only
folders have no tokenizer: a stand-in carries the model's real special tokens (their strings; the liger-trimmed
configs' ids are made up) and the real template. It is a byte-level BPE without merges, one token per byte, so
the decoded labels are exactly the labelled characters; InternVL3 and llava-onevision, whose tokenizer is Qwen2's,
get the real Qwen2 BPE instead.
"""

import copy
import json
import os
from datetime import datetime

import pytest
import transformers.utils.chat_template_utils
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from tests.real_checkpoints import real_folder, real_processor, requires_real
from vlm_recipes.masking import (
    IGNORE_INDEX,
    SampleError,
    assistant_char_spans,
    close_turns_with_eos,
    render,
    tokenize_conversation,
)

# --- the conversation ------------------------------------------------------------------------------------


def text(value: str) -> dict:
    return {"type": "text", "text": value}


QUESTION = "Is it red? Answer yes or no."  # holds the first answer's word: a plain text search finds it here
CONVERSATION = [
    {"role": "system", "content": [text("Be brief.")]},
    {"role": "user", "content": [{"type": "image"}, text(QUESTION)]},
    {"role": "assistant", "content": [text("yes")]},
    {"role": "user", "content": [{"type": "image"}, text("And this one?")]},
    {"role": "assistant", "content": [text("no, it is blue")]},
]
CONVERSATION_WITHOUT_SYSTEM = CONVERSATION[1:]  # Llama-3.2-Vision refuses a system message next to an image
TEXT_ONLY_CONVERSATION = [
    {"role": "user", "content": [text(QUESTION)]},
    {"role": "assistant", "content": [text("yes")]},
    {"role": "user", "content": [text("And this one?")]},
    {"role": "assistant", "content": [text("no, it is blue")]},
]


def images():
    # Two sizes, so that the Qwen processors expand the two images to different numbers of tokens.
    return [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (112, 56), "blue")]


# --- processors: the real ones, and stand-ins around the template-only folders ---------------------------

# Folders each case reads, where it is more than the folder of its own name.
NEEDS = {
    "qwen3-vl-thinking": ("qwen3-vl-8b-instruct", "qwen3-vl-thinking"),
    "internvl3-1b-hf": ("internvl3-1b-hf", "qwen2.5-vl-7b-instruct"),
    "llava-onevision-qwen2-7b-ov-hf": ("llava-onevision-qwen2-7b-ov-hf", "qwen2.5-vl-7b-instruct"),
}


def case(name: str, *values):
    return pytest.param(name, *values, id=name, marks=requires_real(*NEEDS.get(name, (name,))))


def chat_template(name: str) -> str:
    return (real_folder(name) / "chat_template.jinja").read_text()


def config_token_strings(path) -> tuple[dict, list[str]]:
    """The named special tokens (bos/eos/pad/unk) and the added tokens' strings of a tokenizer_config.json,
    special ones only. Ids are not taken: the liger-trimmed configs number their tokens 0-7."""
    config = json.loads(path.read_text())
    named = {
        key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(key)
    }
    added = [
        token["content"] for token in config.get("added_tokens_decoder", {}).values() if token["special"]
    ]
    return named, added


def byte_level_tokenizer(named: dict, special: list[str], add_bos: bool) -> PreTrainedTokenizerFast:
    """One token per byte, plus `named` (bos_token=..., eos_token=...) and `special` as special tokens; a plain
    call prepends the BOS where the real tokenizer does (`add_bos`). `special` are added as added_tokens_decoder
    holds them, special but unnamed (not in all_special_tokens), as Gemma's real <end_of_turn> is."""
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    extra = [token for token in dict.fromkeys(special) if token not in named.values()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in extra])
    if add_bos:
        bos = named["bos_token"]
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
        )
    return tokenizer


def qwen2_bpe_folder(tmp_path_factory, tokenizer_config=None):
    """A folder with the real Qwen2 vocab.json / merges.txt (links, not copies) and optionally a config."""
    folder = tmp_path_factory.mktemp("qwen2-bpe")
    for file in ("vocab.json", "merges.txt"):
        os.symlink(real_folder("qwen2.5-vl-7b-instruct").resolve() / file, folder / file)
    if tokenizer_config is not None:
        os.symlink(tokenizer_config.resolve(), folder / "tokenizer_config.json")
    return folder


class TemplateOnlyProcessor:
    """What tokenize_conversation needs of a processor, around a tokenizer that carries the real template: it
    renders with the tokenizer and tokenizes the text as is (no image expansion: there is no image processor)."""

    def __init__(self, tokenizer, template: str, image_token: str):
        tokenizer.chat_template = template
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text, images=None, add_special_tokens=True, return_tensors="pt", **kwargs):
        return self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors)


def llava_next_mistral(tmp_path_factory):
    # The tokenizer as printed_processor_excerpt.txt prints it: LlamaTokenizerFast, <image> and <pad> added;
    # [INST] is plain text in Mistral-7B's vocabulary, not a special token.
    named = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer = byte_level_tokenizer(named, ["<image>"], add_bos=True)
    return TemplateOnlyProcessor(tokenizer, chat_template("llava-v1.6-mistral-7b-hf"), "<image>")


def llava_onevision(tmp_path_factory):
    # Qwen2's BPE with the tokens llava-hf adds, in their order (<image> 151646, <video> 151647); no BOS.
    tokenizer = Qwen2Tokenizer.from_pretrained(
        qwen2_bpe_folder(tmp_path_factory), unk_token=None, bos_token=None, eos_token=None, pad_token=None
    )
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [151646, 151647]
    return TemplateOnlyProcessor(tokenizer, chat_template("llava-onevision-qwen2-7b-ov-hf"), "<image>")


def gemma_3(tmp_path_factory):
    named, added = config_token_strings(real_folder("gemma-3-4b-it") / "tokenizer_config.liger-trimmed.json")
    # The trimmed config lacks <end_of_turn> (106 in the real one, special); a plain call prepends <bos>.
    tokenizer = byte_level_tokenizer(named, [*added, "<end_of_turn>"], add_bos=True)
    return TemplateOnlyProcessor(tokenizer, chat_template("gemma-3-4b-it"), "<image_soft_token>")


def smolvlm2(tmp_path_factory):
    named, added = config_token_strings(real_folder("smolvlm2-256m-video-instruct") / "tokenizer_config.json")
    tokenizer = byte_level_tokenizer(named, added, add_bos=False)  # GPT2Tokenizer: no BOS of its own
    return TemplateOnlyProcessor(tokenizer, chat_template("smolvlm2-256m-video-instruct"), "<image>")


def internvl3(tmp_path_factory):
    config = real_folder("internvl3-1b-hf") / "tokenizer_config.json"
    tokenizer = AutoTokenizer.from_pretrained(qwen2_bpe_folder(tmp_path_factory, config))
    return TemplateOnlyProcessor(tokenizer, chat_template("internvl3-1b-hf"), "<IMG_CONTEXT>")


def llama_3_2_vision(tmp_path_factory):
    folder = real_folder("llama-3.2-11b-vision-instruct")
    named, _ = config_token_strings(
        folder / "tokenizer_config.liger-trimmed.json"
    )  # its added tokens are made up
    special = ["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]
    tokenizer = byte_level_tokenizer(named, special, add_bos=True)
    return TemplateOnlyProcessor(tokenizer, chat_template("llama-3.2-11b-vision-instruct"), "<|image|>")


def mistral_small_3_1(tmp_path_factory):
    # No tokenizer files: the control tokens of Mistral's tekken tokenizer that the template writes.
    named = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    special = [
        "[INST]",
        "[/INST]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
    ]
    tokenizer = byte_level_tokenizer(named, special, add_bos=True)
    return TemplateOnlyProcessor(tokenizer, chat_template("mistral-small-3.1-24b-instruct-2503"), "[IMG]")


STAND_INS = {
    "llava-v1.6-mistral-7b-hf": llava_next_mistral,
    "llava-onevision-qwen2-7b-ov-hf": llava_onevision,
    "gemma-3-4b-it": gemma_3,
    "smolvlm2-256m-video-instruct": smolvlm2,
    "internvl3-1b-hf": internvl3,
    "llama-3.2-11b-vision-instruct": llama_3_2_vision,
    "mistral-small-3.1-24b-instruct-2503": mistral_small_3_1,
}


@pytest.fixture(scope="module")
def processor_for(tmp_path_factory):
    """processor_for(name) -> that folder's processor (or stand-in), built once per module."""
    built = {}

    def get(name: str):
        if name not in built:
            if name == "qwen3-vl-thinking":  # the Instruct processor with the Thinking template in its place
                built[name] = copy.copy(get("qwen3-vl-8b-instruct"))
                built[name].chat_template = chat_template("qwen3-vl-thinking")
            elif name in STAND_INS:
                built[name] = STAND_INS[name](tmp_path_factory)
            else:
                built[name] = real_processor(name)
        return built[name]

    return get


# --- what a sample's labels hold -------------------------------------------------------------------------


def labelled_runs(sample) -> list[list[int]]:
    """The labelled token ids, one list per contiguous run of labelled positions."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # a labelled position is labelled with its own token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


def labelled_tokens(processor, sample) -> list[list[str]]:
    return [processor.tokenizer.convert_ids_to_tokens(run) for run in labelled_runs(sample)]


def labelled_text(processor, sample) -> list[str]:
    return [processor.tokenizer.decode(run) for run in labelled_runs(sample)]


def tokenize(processor, messages):
    """tokenize_conversation on real images for a real processor; a stand-in gets none (it cannot expand them)."""
    real_images = not isinstance(processor, TemplateOnlyProcessor)
    media = images() if real_images else None
    return tokenize_conversation(processor, messages, media)


def assert_no_media_labelled(processor, sample):
    labels = sample["labels"][sample["input_ids"] == processor.image_token_id]
    assert (labels == IGNORE_INDEX).all()


def assert_one_bos(processor, sample):
    """A template that writes the BOS itself is tokenized without a second one."""
    if processor.tokenizer.bos_token is not None:
        assert sample["input_ids"].tolist().count(processor.tokenizer.bos_token_id) == 1


# --- 1. exactly the answers and their end tokens are labelled -------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        # "ASSISTANT: yes USER: ...": no end token, so </s> is appended after each answer (rule 2).
        case("llava-1.5-7b-hf", [["▁yes", "</s>"], ["▁no", ",", "▁it", "▁is", "▁blue", "</s>"]]),
        case(
            "qwen2-vl-7b-instruct", [["yes", "<|im_end|>"], ["no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]]
        ),
        case(
            "qwen2.5-vl-7b-instruct",
            [["yes", "<|im_end|>"], ["no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]],
        ),
        case(
            "qwen3-vl-8b-instruct", [["yes", "<|im_end|>"], ["no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]]
        ),
        # The last turn is written "<think>\n\n</think>\n\nno, it is blue": the generation prompt ends "<think>\n",
        # the completion is "\n</think>\n\n..." and the "\n\n" token straddling the two is labelled (it overlaps).
        case(
            "qwen3-vl-thinking",
            [["yes", "<|im_end|>"], ["ĊĊ", "</think>", "ĊĊ", "no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]],
        ),
    ],
)
def test_real_processor_labels_answers_and_end_tokens(processor_for, name, expected):
    processor = processor_for(name)
    sample = tokenize(processor, CONVERSATION)
    assert labelled_tokens(processor, sample) == expected
    assert_no_media_labelled(processor, sample)
    assert_one_bos(processor, sample)


@pytest.mark.parametrize(
    "name, messages, expected_text, expected_tokens",
    [
        # "[/INST] yes</s> [INST]": the space before the answer is the completion's, the one after </s> is not.
        case("llava-v1.6-mistral-7b-hf", CONVERSATION, [" yes</s>", " no, it is blue</s>"], None),
        # Rendered "<|im_start|>assistant \nyes<|im_end|>", prompted "<|im_start|>assistant\n": not a prefix, so
        # the answers are found inside their turns; " \n" is one token before "yes", unlabelled.
        case(
            "llava-onevision-qwen2-7b-ov-hf",
            CONVERSATION,
            ["yes<|im_end|>", "no, it is blue<|im_end|>"],
            [["yes", "<|im_end|>"], ["no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]],
        ),
        # "Be brief.\n\n" folded into the first user turn; the assistant is "model"; "\n" after <end_of_turn>.
        case("gemma-3-4b-it", CONVERSATION, ["yes<end_of_turn>", "no, it is blue<end_of_turn>"], None),
        # "Assistant: yes<end_of_utterance>\n" while the prompt is "Assistant:": the space is the completion's.
        case(
            "smolvlm2-256m-video-instruct",
            CONVERSATION,
            [" yes<end_of_utterance>", " no, it is blue<end_of_utterance>"],
            None,
        ),
        case(
            "internvl3-1b-hf",
            CONVERSATION,
            ["yes<|im_end|>", "no, it is blue<|im_end|>"],
            [["yes", "<|im_end|>"], ["no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]],
        ),
        # Refuses the system message next to an image (test_llama_vision_refuses_system_with_images).
        case(
            "llama-3.2-11b-vision-instruct",
            CONVERSATION_WITHOUT_SYSTEM,
            ["yes<|eot_id|>", "no, it is blue<|eot_id|>"],
            None,
        ),
        # "[/INST]yes</s>[INST]": the template glues eos_token to the answer. With a system message the default
        # system prompt (the one with today's date) is not written.
        case("mistral-small-3.1-24b-instruct-2503", CONVERSATION, ["yes</s>", "no, it is blue</s>"], None),
    ],
)
def test_template_only_labels_answers_and_end_tokens(
    processor_for, name, messages, expected_text, expected_tokens
):
    processor = processor_for(name)
    sample = tokenize(processor, messages)
    assert labelled_text(processor, sample) == expected_text
    if expected_tokens is not None:  # the real Qwen2 vocabulary
        assert labelled_tokens(processor, sample) == expected_tokens
    # The same text as character spans, before tokenization.
    rendered = render(processor, messages)
    closed, spans = close_turns_with_eos(
        processor, rendered, assistant_char_spans(processor, messages, rendered)
    )
    assert closed == rendered  # every one of these templates writes its own end token
    assert [closed[span.start : span.end] for span in spans] == expected_text
    assert_no_media_labelled(processor, sample)
    assert_one_bos(processor, sample)


@requires_real("llama-3.2-11b-vision-instruct")
def test_llama_vision_refuses_system_with_images(processor_for):
    processor = processor_for("llama-3.2-11b-vision-instruct")
    with pytest.raises(SampleError, match="chat template refuses this conversation") as refused:
        tokenize(processor, CONVERSATION)
    assert "Prompting with images is incompatible with system messages" in str(refused.value)


# --- dates: templates that write today's date do not make the labels depend on the day ------------------


@pytest.fixture
def set_today(monkeypatch):
    """set_today(2024, 7, 26): the day `strftime_now` gives the chat templates from then on."""

    def set_day(*day):
        class Frozen(datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(*day, tzinfo=tz)

        monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", Frozen)

    return set_day


@pytest.mark.parametrize(
    "name, messages, dates, expected",
    [
        # No image: a system block "Today Date: 26 Jul 2024". No system message: Mistral's default one, dated.
        case(
            "llama-3.2-11b-vision-instruct",
            TEXT_ONLY_CONVERSATION,
            ("Today Date: 26 Jul 2024\n", "Today Date: 01 Jan 2031\n"),
            ["yes<|eot_id|>", "no, it is blue<|eot_id|>"],
        ),
        case(
            "mistral-small-3.1-24b-instruct-2503",
            CONVERSATION_WITHOUT_SYSTEM,
            ("The current date is 2024-07-26.", "The current date is 2031-01-01."),
            ["yes</s>", "no, it is blue</s>"],
        ),
    ],
)
def test_dated_templates_label_the_same_on_any_day(processor_for, set_today, name, messages, dates, expected):
    processor = processor_for(name)
    for day, date in zip([(2024, 7, 26), (2031, 1, 1)], dates, strict=True):
        set_today(*day)
        assert date in render(processor, messages)
        assert labelled_text(processor, tokenize(processor, messages)) == expected


# --- 2. the end-of-turn rule -----------------------------------------------------------------------------


@requires_real("llava-1.5-7b-hf")
def test_llava_1_5_answers_end_with_appended_eos(processor_for):
    processor = processor_for("llava-1.5-7b-hf")
    assert "</s>" not in render(processor, CONVERSATION)  # "ASSISTANT: yes USER: ..."
    sample = tokenize(processor, CONVERSATION)
    assert processor.tokenizer.eos_token_id == 2
    assert [run[-1] for run in labelled_runs(sample)] == [2, 2]
    assert sample["input_ids"].tolist().count(2) == 2  # the appended ones, nothing else


@pytest.mark.parametrize(
    "name, messages, end_token, eos_token, eos_count",
    [
        # eos written by us: once per answer, and nowhere else
        case("llava-1.5-7b-hf", CONVERSATION, "</s>", "</s>", 2),
        # eos written by the template after each answer only
        case("llava-v1.6-mistral-7b-hf", CONVERSATION, "</s>", "</s>", 2),
        case("mistral-small-3.1-24b-instruct-2503", CONVERSATION, "</s>", "</s>", 2),
        # the end token is the eos and ends every turn: 5 messages, 5 of them, one per answer labelled
        case("qwen2-vl-7b-instruct", CONVERSATION, "<|im_end|>", "<|im_end|>", 5),
        case("qwen2.5-vl-7b-instruct", CONVERSATION, "<|im_end|>", "<|im_end|>", 5),
        case("qwen3-vl-8b-instruct", CONVERSATION, "<|im_end|>", "<|im_end|>", 5),
        case("qwen3-vl-thinking", CONVERSATION, "<|im_end|>", "<|im_end|>", 5),
        case("llava-onevision-qwen2-7b-ov-hf", CONVERSATION, "<|im_end|>", "<|im_end|>", 5),
        case("internvl3-1b-hf", CONVERSATION, "<|im_end|>", "<|im_end|>", 5),
        case("smolvlm2-256m-video-instruct", CONVERSATION, "<end_of_utterance>", "<end_of_utterance>", 5),
        case("llama-3.2-11b-vision-instruct", CONVERSATION_WITHOUT_SYSTEM, "<|eot_id|>", "<|eot_id|>", 4),
        # <end_of_turn> ends the turns; the tokenizer's eos <eos> is never written, and never added
        case("gemma-3-4b-it", CONVERSATION, "<end_of_turn>", "<eos>", 0),
    ],
)
def test_each_answer_ends_with_one_end_token(processor_for, name, messages, end_token, eos_token, eos_count):
    processor = processor_for(name)
    assert processor.tokenizer.eos_token == eos_token
    sample = tokenize(processor, messages)
    runs = labelled_tokens(processor, sample)
    assert len(runs) == 2
    for run in runs:
        assert run[-1] == end_token
        assert run.count(end_token) == 1
    assert sample["input_ids"].tolist().count(processor.tokenizer.eos_token_id) == eos_count


# --- 3. the fallback for templates that rewrite earlier turns --------------------------------------------


def thinking_conversation(first: dict, last: dict) -> list[dict]:
    """CONVERSATION with other assistant turns (reasoning_content=..., content=...)."""
    system, question, _, follow_up, _ = CONVERSATION
    return [system, question, {"role": "assistant", **first}, follow_up, {"role": "assistant", **last}]


# The last turn with reasoning, "<think>\nThe car is blue.\n</think>\n\nno, it is blue<|im_end|>": what follows the
# generation prompt "<|im_start|>assistant\n<think>\n" is labelled.
REASONED_LAST_TURN = [
    "The", "Ġcar", "Ġis", "Ġblue", ".Ċ", "</think>", "ĊĊ", "no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"
]  # fmt: skip


@pytest.mark.parametrize(
    "messages, expected_last_text, expected",
    [
        pytest.param(
            CONVERSATION,
            "\n</think>\n\nno, it is blue<|im_end|>",
            [["yes", "<|im_end|>"], ["ĊĊ", "</think>", "ĊĊ", "no", ",", "Ġit", "Ġis", "Ġblue", "<|im_end|>"]],
            id="no-reasoning",
        ),
        # The first turn's reasoning is dropped (it comes before the last question); the last turn's is kept.
        pytest.param(
            thinking_conversation(
                {"reasoning_content": "The car is red.", "content": [text("yes")]},
                {"reasoning_content": "The car is blue.", "content": [text("no, it is blue")]},
            ),
            "The car is blue.\n</think>\n\nno, it is blue<|im_end|>",
            [["yes", "<|im_end|>"], REASONED_LAST_TURN],
            id="reasoning_content",
        ),
    ],
)
@requires_real("qwen3-vl-8b-instruct", "qwen3-vl-thinking")
def test_thinking_template_labels_the_answer_not_the_question(
    processor_for, messages, expected_last_text, expected
):
    processor = processor_for("qwen3-vl-thinking")
    rendered = render(processor, messages)
    # The first answer is not where the prefixes say (prompt "...<think>\n", turn "assistant\nyes"), so it is
    # searched for; "yes" is in the question too.
    assert not rendered.startswith(render(processor, messages[:2], add_generation_prompt=True))
    assert "The car is red." not in rendered
    spans = assistant_char_spans(processor, messages, rendered)
    assert [rendered[span.start : span.end] for span in spans] == ["yes<|im_end|>", expected_last_text]
    question_start = rendered.index(QUESTION)
    question_end = question_start + len(QUESTION)
    assert question_start < rendered.index("yes") < question_end  # the first "yes" is the question's ...
    assert spans[0].start > question_end  # ... and the one labelled comes after the question
    sample = tokenize(processor, messages)
    assert labelled_tokens(processor, sample) == expected
    assert_no_media_labelled(processor, sample)


@pytest.mark.xfail(
    strict=True,
    raises=SampleError,
    reason="vlm_recipes.masking searches an earlier turn for its content as given; reasoning written inline "
    "(<think>...</think> in the content) is dropped by the template, which renders only the text after </think>, "
    "so the answer is not found and the sample is refused. The render is the same as with reasoning_content.",
)
@requires_real("qwen3-vl-8b-instruct", "qwen3-vl-thinking")
def test_thinking_template_inline_reasoning_of_earlier_turn(processor_for):
    processor = processor_for("qwen3-vl-thinking")
    messages = thinking_conversation(
        {"content": [text("<think>\nThe car is red.\n</think>\n\nyes")]},
        {"content": [text("<think>\nThe car is blue.\n</think>\n\nno, it is blue")]},
    )
    sample = tokenize(processor, messages)
    assert labelled_tokens(processor, sample) == [["yes", "<|im_end|>"], REASONED_LAST_TURN]


# --- 4. image tokens: as many as the processor expands to, none labelled ---------------------------------


def image_token_runs(processor, sample) -> list[int]:
    """Lengths of the runs of image tokens in input_ids, one run per image."""
    runs, previous = [], False
    for token in sample["input_ids"].tolist():
        current = token == processor.image_token_id
        if current and not previous:
            runs.append(0)
        if current:
            runs[-1] += 1
        previous = current
    return runs


@pytest.mark.parametrize(
    "name, expected_runs",
    [
        # CLIP-L/14 at 336x336 (any input is resized and cropped to it): 24 * 24 = 576, the CLS feature dropped
        case("llava-1.5-7b-hf", [576, 576]),
        # 28x28 pixels a token; min_pixels 3136: 64x64 -> 56x56 -> 2x2, 112x56 -> 112x56 -> 4x2
        case("qwen2-vl-7b-instruct", [4, 8]),
        case("qwen2.5-vl-7b-instruct", [4, 8]),
        # 32x32 pixels a token; at least 65536 pixels: 64x64 -> 256x256 -> 8x8, 112x56 -> 384x192 -> 12x6
        case("qwen3-vl-8b-instruct", [64, 72]),
        case("qwen3-vl-thinking", [64, 72]),
    ],
)
def test_image_tokens_as_expanded_and_never_labelled(processor_for, name, expected_runs):
    processor = processor_for(name)
    sample = tokenize(processor, CONVERSATION)
    assert image_token_runs(processor, sample) == expected_runs
    # what the processor itself says each image becomes
    if "image_grid_thw" in sample:
        merge = processor.image_processor.merge_size
        assert (sample["image_grid_thw"].prod(-1) // merge**2).tolist() == expected_runs
    else:
        side = processor.image_processor.crop_size["height"] // processor.patch_size
        assert list(sample["pixel_values"].shape) == [2, 3, 336, 336]
        assert [side * side] * 2 == expected_runs
    assert_no_media_labelled(processor, sample)
