#!/usr/bin/env bash
# Train the `default` model on one GPU inside a device lease, self-distil its drafting heads, evaluate
# it, and leave it under OUT in pieces that come back from the device machine (at most 8 files of 16
# MiB each).
#   bash benchmarks/gpu_train_default.sh OUT        (gpu_check.sh's `train` stage runs it)
# Env: TRAIN_SECONDS (training time, default 240), EXTRA_MB (text taken from site-packages, default 400),
# DISTILL_STEPS (self-distillation of the drafting heads after training, default 600; 0: none);
# for a dry run on a CPU (tests/test_benchmark_scripts.py): PRESET, EVAL_DEVICE, TRAIN_ARGS, EVAL_ARGS, DISTILL_ARGS,
# SOURCE_DIR (a source folder instead of the carried stdlib), WORK (scratch folder), PYTHON, PART_SIZE.
# The n=1 baseline of the same size and data (issue 4's loss comparison), logs only, no checkpoint:
#   MODEL_NAME=n1 RETURN_CHECKPOINT=0 TRAIN_ARGS="--n-future-tokens 1" bash ... OUT   (7 blocks: 6 trunk + 1 head)
# Data: the corpus of the CPU-trained default model (this checkout's .gpu_data/stdlib.tar.gz, made by
# benchmarks/prepare_gpu_data.sh, carried with the run) so the held-out files and the tokenizer stay
# the same, plus the device's own site-packages as extra training text: 3M stdlib tokens are far too
# few for what a GPU trains in minutes.
# Back here:  cat OUT/model/consolidated.00.pth.part-* > mtp_engine/default_model/consolidated.00.pth
#             tar -xzf OUT/model/meta.tar.gz -C mtp_engine/default_model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:?usage: gpu_train_default.sh OUT}
WORK=${WORK:-/tmp/mtp_train_default}
NAME=${MODEL_NAME:-model}
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT/$NAME"
if [ -n "${SOURCE_DIR:-}" ]; then
  SRC=$SOURCE_DIR
elif [ -f .gpu_data/stdlib.tar.gz ]; then
  SRC=$WORK/stdlib && mkdir -p "$SRC" && tar -xzf .gpu_data/stdlib.tar.gz -C "$SRC"
else
  echo "no .gpu_data/stdlib.tar.gz: using this machine's stdlib (its held-out files differ from the CPU model's)"
  SRC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
fi
PURELIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# max_steps is only a bound until the schedule is fitted to the time budget (at step 25, or earlier
# when a fifth of the budget is gone); the run saves once, at the end. shellcheck disable=SC2086 (TRAIN_ARGS is a list of flags)
"$PY" -m mtp_engine train --preset "${PRESET:-default}" --source "$SRC" --extra-source "$PURELIB" \
  --extra-max-mb "${EXTRA_MB:-400}" --tokenizer mtp_engine/default_model/tokenizer.model --corpus-dir "$WORK/corpus" \
  --out-dir "$WORK/run" --time-budget-s "${TRAIN_SECONDS:-240}" --schedule-to-budget --no-progress \
  --max-steps 1000000 --eval-every 1000 --save-every 1000000 ${TRAIN_ARGS:-}
return_checkpoint() {  # folder, meta files...: the checkpoint in pieces plus its metadata, replacing any before
  local from=$1; shift
  rm -f "$OUT/$NAME"/consolidated.00.pth.part-* "$OUT/$NAME/meta.tar.gz"
  if [ "${RETURN_CHECKPOINT:-1}" = 1 ]; then
    split -b "${PART_SIZE:-15m}" "$from/consolidated.00.pth" "$OUT/$NAME/consolidated.00.pth.part-"
  fi
  tar -czf "$OUT/$NAME/meta.tar.gz" -C "$from" "$@"
}
# The trained model goes back at once: if the lease ends during distillation or evaluation, it still
# returns (without eval.json); the final model replaces it below.
return_checkpoint "$WORK/run" params.json tokenizer.model train_log.json
HEADS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("n_future_tokens", 1))' "$WORK/run/params.json")
DEVICE=${EVAL_DEVICE:-cuda}
FINAL=$WORK/run
META=(params.json tokenizer.model train_log.json eval.json)
TREE_ARGS=()
if [ "$HEADS" -gt 1 ]; then
  TREE_ARGS=(--build-tree "$WORK/final_tree.json")
  META+=(tree.json)
  if [ "${DISTILL_STEPS:-600}" -gt 0 ]; then
    # Self-distil the drafting heads (mtp_engine/distill.py): the pretrained eval is kept beside it.
    # shellcheck disable=SC2086
    "$PY" -m mtp_engine eval --ckpt-dir "$WORK/run" --source "$SRC" --device "$DEVICE" \
      --json "$WORK/run/eval_pretrained.json" ${EVAL_ARGS:-}
    # shellcheck disable=SC2086
    "$PY" -m mtp_engine distill --ckpt-dir "$WORK/run" --out-dir "$WORK/final" --source "$SRC" --device "$DEVICE" \
      --steps "${DISTILL_STEPS:-600}" ${DISTILL_ARGS:-}
    cp "$WORK/run/eval_pretrained.json" "$WORK/final/"   # (mtp distill carries train_log.json itself)
    FINAL=$WORK/final
    META+=(distill_log.json eval_pretrained.json)
  fi
fi
# shellcheck disable=SC2086
"$PY" -m mtp_engine eval --ckpt-dir "$FINAL" --source "$SRC" --device "$DEVICE" \
  "${TREE_ARGS[@]}" --json "$FINAL/eval.json" ${EVAL_ARGS:-}
if [ "$HEADS" -gt 1 ]; then mv "$WORK/final_tree.json" "$FINAL/tree.json"; fi
return_checkpoint "$FINAL" "${META[@]}"
ls -la "$OUT/$NAME"
