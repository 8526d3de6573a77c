r"""Ask a trained model one question about one or more images and print its answer.

    python scripts/infer.py --model_name_or_path runs/demo/llava-finetuned \
        --image runs/demo/data/images/test_0000.png --prompt "What color is the shape? Answer with one word."

--model_name_or_path takes whatever a recipe saved: a full model (config.json + model.safetensors) or a LoRA
adapter (adapter_config.json), which is put on the base model it names; a checkpoint-* folder works the
same way. The images come before the question in the prompt, one image placeholder each, as in the training
data; pass --image once per image, or not at all for a text-only question. The answer is greedy and is
printed on the last line as `answer: ...`. For a whole data file with accuracy, use scripts/evaluate.py;
both load through vlm_recipes.inference.load_for_inference.
"""

import argparse
import sys
from pathlib import Path

from transformers.utils import logging

from vlm_recipes.inference import answer_question, load_for_inference


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_name_or_path",
        required=True,
        help="a recipe's output_dir or checkpoint-* folder (full model or LoRA adapter), or a Hub id",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        type=Path,
        help="an image file; repeat for several images, in the order the prompt refers to them",
    )
    parser.add_argument("--prompt", required=True, help="the question, without image placeholders")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="longest answer, in tokens")
    parser.add_argument(
        "--base_model_name_or_path",
        default=None,
        help="for a LoRA adapter: the base model, if not where adapter_config.json says",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="run code shipped with the checkpoint"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Check the images before loading any weights: a typo should not cost a model load.
    missing = [str(path) for path in args.image if not path.is_file()]
    if missing:
        sys.exit(f"error: image file(s) not found: {', '.join(missing)}; pass existing files with --image")
    logging.disable_progress_bar()  # the answer is the output; weight-loading bars only bury it
    try:
        model, processor = load_for_inference(
            args.model_name_or_path,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            base_model_name_or_path=args.base_model_name_or_path,
        )
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    answer = answer_question(model, processor, args.prompt, args.image, args.max_new_tokens)
    if not answer:
        # Not an error: an undertrained model often ends its turn at once. Say so rather than print nothing.
        print("(the model generated no text: it produced its end-of-turn token first)", file=sys.stderr)
    print(f"answer: {answer}")


if __name__ == "__main__":
    main()
