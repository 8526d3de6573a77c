"""Turn one conversation into model inputs whose labels cover only the assistant's words.

The approach works with any chat template, with or without `{% generation %}` markers:

1. Render the conversation as text with the processor's own template.
2. Find each assistant turn's characters by rendering the conversation up to that turn with the generation
   prompt (where the answer starts) and up to the end of the turn (where it ends). The turn's end token
   (`</s>`, `<|im_end|>`, `<end_of_turn>`, ...) is part of the span; whitespace the template writes after it is
   not. Templates that rewrite earlier turns (thinking templates drop earlier reasoning) break that prefix
   property; their answers are then searched for inside their own turn only.
3. A template that writes no special token after an assistant turn (llava-1.5-7b-hf's ends a turn with a space)
   gets the tokenizer's end-of-sequence token appended to the answer, labelled, as LLaVA's own training did:
   otherwise nothing ever teaches the model to stop, and a fine-tuned model repeats its answer until
   max_new_tokens.
4. Tokenize the plain text once to map characters to tokens, run the processor on the same text (it expands
   each image placeholder into the model's image tokens), and carry the mask across the expansion; where the
   processor also writes tokens of its own around each image (Gemma 3, InternVL, Idefics3, Pixtral), the two token
   lists are aligned and what the processor added stays unlabelled.

Image, video and padding tokens never carry labels. Truncation never cuts through an image span.
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# Per-token outputs of a processor: padded and truncated along the sequence. Everything else a processor
# returns (pixel values, image grids, image sizes) is per image and is concatenated by the collator.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


class SampleError(ValueError):
    """A conversation that cannot be turned into a training sample; the message says why and what to do."""


@dataclass(frozen=True)
class CharSpan:
    start: int
    end: int


def render(processor, messages, add_generation_prompt=False) -> str:
    from jinja2 import TemplateError

    try:
        return processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:  # templates refuse some conversations (Llama-3.2-Vision: system + image)
        raise SampleError(f"the model's chat template refuses this conversation: {error}") from None


def message_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


def special_token_strings(tokenizer) -> list[str]:
    """Every token the tokenizer never splits and treats as special (named ones such as EOS, and added special
    tokens such as `<|im_end|>` or `<end_of_turn>`), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = set(tokenizer.all_special_tokens) | {
        t.content for t in added.values() if getattr(t, "special", False)
    }
    return sorted((t for t in tokens if t), key=len, reverse=True)


def turn_window(text: str, messages, index: int, cursor: int) -> tuple[int, int]:
    """Where assistant turn `index` can lie in `text`: after the text of the message before it (found from
    `cursor`, the end of the previous answer) and before the text of the message after it."""
    low, high = cursor, len(text)
    previous = message_text(messages[index - 1]) if index else ""
    if previous and (found := text.find(previous, cursor)) >= 0:
        low = found + len(previous)
    following = message_text(messages[index + 1]) if index + 1 < len(messages) else ""
    if following and (found := text.find(following, low)) >= 0:
        high = found
    return low, high


def assistant_char_spans(processor, messages, text: str) -> list[CharSpan]:
    """Character spans of `text` that hold the assistant turns, each with the end token the template writes."""
    special_tokens = special_token_strings(processor.tokenizer)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Processors cannot render an empty conversation, so a conversation opened by the assistant is
        # handled like the templates below.
        before = render(processor, messages[:index], add_generation_prompt=True) if index else None
        through = render(processor, messages[: index + 1])
        if (
            before is not None
            and text.startswith(before)
            and text.startswith(through)
            and len(through) > len(before)
        ):
            start, end = len(before), len(through.rstrip())
        else:
            # Templates that rewrite earlier turns (dropping reasoning, say) break the prefix property: find the
            # answer text itself inside its own turn (never in the question before it, which may contain the
            # same words), then take a special token written right after it.
            answer = message_text(message)
            low, high = turn_window(text, messages, index, cursor)
            start = text.rfind(answer, low, high) if answer else -1
            if start < 0:
                raise SampleError(
                    f"the chat template does not render assistant turn {index} as a prefix of the whole "
                    "conversation, and its text was not found inside that turn of the rendered conversation"
                )
            end = start + len(answer)
            gap = len(text[end:]) - len(text[end:].lstrip())  # templates may put a space before the end token
            for token in special_tokens:
                if text.startswith(token, end + gap):
                    end += gap + len(token)
                    break
        spans.append(CharSpan(start, end))
        cursor = end
    return spans


def close_turns_with_eos(processor, text: str, spans: list[CharSpan]) -> tuple[str, list[CharSpan]]:
    """Append the tokenizer's EOS to every assistant span that does not end with a special token, and extend the
    span over it, so that what the model learns to write after an answer is what generation stops on."""
    eos = processor.tokenizer.eos_token
    special_tokens = special_token_strings(processor.tokenizer)
    if not eos:
        return text, spans
    closed, shift = [], 0
    for span in spans:
        start, end = span.start + shift, span.end + shift
        if not any(text[start:end].endswith(token) for token in special_tokens):
            text = text[:end] + eos + text[end:]
            end += len(eos)
            shift += len(eos)
        closed.append(CharSpan(start, end))
    return text, closed


def token_mask_from_spans(offsets, spans: list[CharSpan]) -> list[bool]:
    """A token is an answer token when its characters overlap an assistant span."""
    return [any(start < span.end and end > span.start for span in spans) for start, end in offsets]


def media_token_ids(processor) -> set[int]:
    """The ids of the tokens that stand for images and videos, the processor's and its tokenizer's (Gemma 3's processor
    names the <start_of_image> it expands, its tokenizer the soft tokens the expansion is made of)."""
    owners = (processor, getattr(processor, "tokenizer", None))
    ids = {getattr(owner, name, None) for owner in owners for name in ("image_token_id", "video_token_id")}
    return {token_id for token_id in ids if isinstance(token_id, int)}


def media_tokens_for(processor, kind: str, width: int, height: int, frames: int = 2) -> int:
    """How many language-model tokens the processor turns one image (or one `frames`-frame video) of width x height
    into, measured by running it: the model's own resizing, tiling and caps decide, with no formula here."""
    from PIL import Image

    frame = Image.new("RGB", (width, height))
    text = render(processor, [{"role": "user", "content": [{"type": kind}]}])
    media = {"images": [frame]} if kind == "image" else {"videos": [[frame] * frames]}
    encoded = processor(text=[text], **media, add_special_tokens=add_special_tokens_for(processor, text))
    ids = encoded["input_ids"][0]
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # some processors return tensors unasked (Pixtral)
    media_ids = media_token_ids(processor)
    return sum(1 for token in ids if token in media_ids)


# A probe larger than every cap the real checkpoints ship (Qwen3-VL: 4096 x 4096 pixels), so that it measures the cap.
PROBE_SIDE = 4096


def image_tokens_at_cap(processor) -> int:
    """Tokens of the largest image the processor lets through: what memory estimates must assume per image."""
    return media_tokens_for(processor, "image", PROBE_SIDE, PROBE_SIDE)


def carry_mask(plain_ids, plain_mask, expanded_ids, media_ids: set[int]) -> list[bool]:
    """Carry a mask over the plain token ids (the template's text, tokenized) to the processor's ids. Most processors
    only repeat each image placeholder once per image feature (expand_mask); others also write tokens of their own
    around each image (Gemma 3's "<start_of_image>...<end_of_image>", InternVL's <img>...</img>, Idefics3's tile tags,
    Pixtral's [IMG_BREAK]s), which align_mask matches up. What the processor added is never labelled."""
    try:
        return expand_mask(plain_ids, plain_mask, expanded_ids, media_ids)
    except SampleError:
        return align_mask(plain_ids, plain_mask, expanded_ids)


def align_mask(plain_ids, plain_mask, expanded_ids) -> list[bool]:
    """The mask over `expanded_ids` from the longest matching runs of tokens (difflib), for a processor that inserted
    or replaced tokens around images: matched tokens keep their label, inserted ones get none. A labelled token the
    processor changed or dropped is refused, since its label would be lost."""
    import difflib

    mask = [False] * len(expanded_ids)
    matcher = difflib.SequenceMatcher(None, plain_ids, expanded_ids, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            mask[j1:j2] = plain_mask[i1:i2]
        elif any(plain_mask[i1:i2]):
            raise SampleError(
                f"the processor changed labelled tokens (template tokens {i1}..{i2}, not only the image "
                "placeholders): the answer text and the processor's output do not line up"
            )
    return mask


def expand_mask(plain_ids, plain_mask, expanded_ids, media_ids: set[int]) -> list[bool]:
    """Carry a mask over the plain token ids to the processor's ids, where each image placeholder is
    repeated once per image feature. Placeholder runs are never labelled."""
    mask, i, j = [], 0, 0
    while j < len(expanded_ids):
        token = expanded_ids[j]
        if i >= len(plain_ids) or plain_ids[i] != token:
            raise SampleError(
                "the processor's tokens differ from the tokenizer's beyond image placeholder expansion "
                f"(position {j}); the processor must only repeat image/video tokens"
            )
        if token in media_ids:
            while i < len(plain_ids) and plain_ids[i] == token:
                i += 1
            while j < len(expanded_ids) and expanded_ids[j] == token:
                mask.append(False)
                j += 1
            continue
        mask.append(plain_mask[i])
        i += 1
        j += 1
    if i != len(plain_ids):
        raise SampleError("the processor dropped tokens the tokenizer produced; the texts do not line up")
    return mask


def add_special_tokens_for(processor, text: str) -> bool:
    # The processor's own rule at inference (`apply_chat_template(tokenize=True)`): add the tokenizer's
    # special tokens unless the template already wrote the BOS token. Training must tokenize the same way.
    bos = processor.tokenizer.bos_token
    return not (bos is not None and text.startswith(bos))


# What to do about a sample whose images take too many tokens, when the recipe knows no better advice (a processor
# that resizes every image to one size cannot be told to make fewer tokens). Recipes with resolution flags pass theirs.
FEWER_MEDIA_TOKENS = "use fewer images per sample"


def tokenize_conversation(
    processor,
    messages,
    images,
    max_length: int | None = None,
    videos=None,
    fewer_media_tokens=FEWER_MEDIA_TOKENS,
) -> dict[str, torch.Tensor]:
    """Model inputs for one conversation: per-token tensors are 1-D, per-image tensors keep their shape.
    `fewer_media_tokens`: the advice for a sample whose image span max_length would cut."""
    text = render(processor, messages)
    text, spans = close_turns_with_eos(processor, text, assistant_char_spans(processor, messages, text))
    add_special = add_special_tokens_for(processor, text)
    plain = processor.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    plain_mask = token_mask_from_spans(plain["offset_mapping"], spans)
    # One list of images per text, as apply_chat_template passes them: a processor that treats a multi-image sample
    # differently from single images (OneVision encodes each of several images without its tiles) sees which is which.
    media = {"images": [images] if images else None, **({"videos": videos} if videos else {})}
    encoded = processor(text=[text], **media, add_special_tokens=add_special, return_tensors="pt")

    sample = {key: value[0] if key in PER_TOKEN_KEYS else value for key, value in encoded.items()}
    input_ids = sample["input_ids"]
    media_ids = media_token_ids(processor)
    mask = carry_mask(plain["input_ids"], plain_mask, input_ids.tolist(), media_ids)
    sample["labels"] = torch.where(torch.tensor(mask), input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    if max_length is not None and len(input_ids) > max_length:
        last_media = max((k for k, t in enumerate(input_ids.tolist()) if t in media_ids), default=-1)
        if last_media >= max_length:
            media_tokens = sum(1 for t in input_ids.tolist() if t in media_ids)
            raise SampleError(
                f"{len(input_ids)} tokens ({media_tokens} of them image or video tokens), and cutting at "
                f"max_length={max_length} would cut through an image span (its last image token is at position "
                f"{last_media}); raise max_length, {fewer_media_tokens}, or shorten the conversation"
            )
        sample = {
            key: value[:max_length] if key in PER_TOKEN_KEYS else value for key, value in sample.items()
        }
    if not (sample["labels"] != IGNORE_INDEX).any():
        raise SampleError(
            "no assistant tokens are left to learn from"
            + (f" within max_length={max_length}" if max_length else "")
            + "; raise max_length or check that the conversation has an assistant turn"
        )
    return sample
