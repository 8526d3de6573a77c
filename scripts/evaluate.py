r"""Answer every question of a data file with a trained model and score exact-match accuracy.

    python scripts/evaluate.py --model_name_or_path runs/demo/llava-finetuned \
        --dataset_path runs/demo/data/test.json --image_root runs/demo/data

Each record's last assistant turn is the reference; the conversation before it is the prompt. Answers are
generated greedily in batches. Per-sample results go to --predictions_file (JSONL, default
<model>/predictions.jsonl); the last line printed is a JSON summary with `accuracy` (exact match after
lower-casing and removing punctuation and articles) and `n`. Works on a full model or a LoRA adapter folder.
"""

import argparse
import json
import time
from pathlib import Path

from vlm_recipes.data import load_records
from vlm_recipes.inference import exact_match, generate, load_for_inference, split_prompt_and_answer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="a recipe's output_dir, or any checkpoint"
    )
    parser.add_argument(
        "--dataset_path", required=True, help="LLaVA/chat JSON or JSONL, or a datasets folder"
    )
    parser.add_argument("--image_root", default=None, help="folder that image paths are relative to")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--predictions_file", type=Path, default=None)
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="run code shipped with the checkpoint"
    )
    args = parser.parse_args()

    records = load_records(args.dataset_path, args.image_root)[: args.limit]
    model, processor = load_for_inference(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    predictions_file = args.predictions_file or Path(args.model_name_or_path, "predictions.jsonl")
    start, correct = time.perf_counter(), 0
    with predictions_file.open("w") as out:
        for first in range(0, len(records), args.batch_size):
            batch = records[first : first + args.batch_size]
            prompts, references = zip(*(split_prompt_and_answer(r["messages"]) for r in batch), strict=True)
            answers = generate(
                model, processor, list(prompts), [r["images"] for r in batch], args.max_new_tokens
            )
            for record, answer, reference in zip(batch, answers, references, strict=True):
                match = exact_match(answer, reference)
                correct += match
                out.write(
                    json.dumps(
                        {"id": record["id"], "prediction": answer, "reference": reference, "correct": match}
                    )
                    + "\n"
                )
    summary = {
        "accuracy": correct / len(records),
        "n": len(records),
        "correct": correct,
        "model": args.model_name_or_path,
        "dataset": args.dataset_path,
        "predictions_file": str(predictions_file),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
