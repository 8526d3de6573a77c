#!/usr/bin/env bash
# The demo behind `make demo`: build a tiny random model and the demo questions, score the untrained model,
# fine-tune it through `accelerate launch` with the shared ZeRO-3 offload config, print the DeepSpeed config
# as it was resolved, and score it again. Outputs go to runs/demo/.
#
#   bash scripts/demo.sh [llava|qwen-vl|chexagent|image-text-to-text]    (PYTHON, NUM_PROCESSES, ACCELERATE_CONFIG may be set)
set -euo pipefail

MODEL=${1:-llava}
PYTHON=${PYTHON:-python}
NUM_PROCESSES=${NUM_PROCESSES:-2}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/zero3_offload.yaml}
RECIPE=recipes/${MODEL//-/_}.py
CONFIGS=recipes/configs/${MODEL//-/_}_demo.yaml
DEMO=runs/demo
MODEL_DIR=$DEMO/tiny-${MODEL}
OUTPUT_DIR=$DEMO/${MODEL}-finetuned
DATA_SCRIPT=scripts/make_demo_data.py
DATA=$DEMO/data
TEST_FILE=$DATA/test.json
if [ "$MODEL" = chexagent ]; then
    # Synthetic chest X-ray studies, and CheXagent's two stages: stage 2 starts from stage 1's output.
    CONFIGS="recipes/configs/chexagent_stage1_demo.yaml recipes/configs/chexagent_stage2_demo.yaml"
    DATA_SCRIPT=scripts/make_xray_demo_data.py
    DATA=$DEMO/xray-data
    TEST_FILE=$DATA/test.jsonl
fi

[ -f "$RECIPE" ] || { echo "no recipe $RECIPE for MODEL=$MODEL" >&2; exit 2; }
for config in $CONFIGS; do
    [ -f "$config" ] || { echo "no demo config $config for MODEL=$MODEL" >&2; exit 2; }
done
# Quiet the libraries' deprecation chatter so the demo's own output is readable; errors still show.
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::UserWarning}

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.0f", b - a }'; }
accuracy() {
    tail -n 1 "$1" | "$PYTHON" -c 'import json, sys; r = json.load(sys.stdin); print("%.2f (%d/%d)" % (r["accuracy"], r["correct"], r["n"]))'
}

start=$(seconds)
echo "== 1/5 tiny $MODEL model and demo data"
"$PYTHON" scripts/make_tiny_model.py --family "$MODEL" --output_dir "$MODEL_DIR"
"$PYTHON" "$DATA_SCRIPT" --output_dir "$DATA"

echo "== 2/5 accuracy of the untrained model on the held-out questions"
"$PYTHON" scripts/evaluate.py --model_name_or_path "$MODEL_DIR" --dataset_path "$TEST_FILE" \
    --image_root "$DATA" --predictions_file "$DEMO/${MODEL}_predictions_before.jsonl" | tee "$DEMO/${MODEL}_eval_before.json"

echo "== 3/5 fine-tune: accelerate launch --num_processes $NUM_PROCESSES with $ACCELERATE_CONFIG"
train_start=$(seconds)
: >"$DEMO/${MODEL}_train.log"
for config in $CONFIGS; do
    [ "$config" = "$CONFIGS" ] || echo "-- $config"
    "$PYTHON" -m accelerate.commands.accelerate_cli launch --config_file "$ACCELERATE_CONFIG" \
        --num_processes "$NUM_PROCESSES" "$RECIPE" --config "$config" 2>&1 | tee -a "$DEMO/${MODEL}_train.log"
done
train_seconds=$(elapsed "$train_start")

echo "== 4/5 the DeepSpeed config as DeepSpeed received it (every \"auto\" replaced)"
cat "$OUTPUT_DIR/ds_config_resolved.json"

echo "== 5/5 accuracy of the fine-tuned model on the same questions"
"$PYTHON" scripts/evaluate.py --model_name_or_path "$OUTPUT_DIR" --dataset_path "$TEST_FILE" \
    --image_root "$DATA" --predictions_file "$DEMO/${MODEL}_predictions_after.jsonl" | tee "$DEMO/${MODEL}_eval_after.json"

cat <<EOF

Demo summary ($MODEL, $NUM_PROCESSES processes, ZeRO-3 with CPU offload)
  accuracy before fine-tuning: $(accuracy "$DEMO/${MODEL}_eval_before.json")
  accuracy after fine-tuning:  $(accuracy "$DEMO/${MODEL}_eval_after.json")
  training wall time:          ${train_seconds} s
  demo wall time:              $(elapsed "$start") s
  fine-tuned model:            $OUTPUT_DIR (loads with from_pretrained)
EOF
