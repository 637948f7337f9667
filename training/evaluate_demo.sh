#!/usr/bin/env bash
# Issue #4's evaluation of the demo models, in one call (quality on a GPU; speed on a CPU with MODE=speed):
#
#   bash training/evaluate_demo.sh MODELS [OUT]
#
# MODELS holds transformer folders (diffusers format) teacher/, framewise/, framewise_nogan/, chunkwise/; any that is
# missing is skipped. The other components (tokenizer, text encoder, VAE, scheduler) come from PIPELINE. Rows:
#   gt               the world's own renders (the reference of the ratios)
#   vae              those renders through PIPELINE's VAE and back: the ceiling of every row decoded by that VAE
#   framewise_1step  frame-wise One-Forcing (DMD + adversarial), one step per frame
#   dmd_1step        frame-wise DMD-only (framewise_nogan), one step
#   chunkwise_1step  chunk-wise One-Forcing, 3 latent frames per block, one step
#   framewise_4step  the frame-wise One-Forcing student sampled with 4 steps (1000, 750, 500, 250 before the warp)
#   teacher          the bidirectional teacher: TEACHER_STEPS Euler steps, shift TEACHER_SHIFT, guidance
#                    TEACHER_GUIDANCE (training/configs/demo.json ode_pairs: 32, 8, 3)
# Outputs in OUT (default: $OUT, else runs/eval_demo): quality.json + quality.md (MODE=quality, the default; with the
# paired test of framewise_1step against dmd_1step edge sharpness when both rows are there) or
# speed.json + speed.md (MODE=speed; also table.md = the quality table with a CPU frames/s column when
# OUT/quality.json exists). Both files are rewritten after every model, so a run stopped by `timeout` keeps the
# finished models; running the same command again resumes (--resume) with the models still missing.
#
# Settings (environment): PIPELINE (models/oneforcing-demo), SPLIT (heldout: prompts of combinations never trained
# on; seen: of combinations trained on, written to quality_seen.json / .md), PROMPTS (8), SEEDS ("0 1"),
# FRAMES (81), SIZE (128), DEVICE (auto: cuda when there is one), WORKERS (processes scoring clips while the next are
# generated; default: cores - 2, at most 8; 0 with MODE=speed), ONLY (e.g. "gt framewise_1step": just these rows),
# SAVE_VIDEOS (a folder: every clip as mp4), PYTHON, WHEELS (a folder with the diffusers wheel, installed to
# /tmp/site when diffusers is not importable), EXTRA (more evaluate arguments, e.g. "--dtype bfloat16").
# MODE=speed: DEVICE cpu, one timed clip per model after one 5-frame warm-up clip (SPEED_CLIPS, WARMUP_FRAMES), on
# THREADS torch threads (default 1 there: on a 2-core machine that other jobs share, 2 threads stalling on each other
# ran 5x slower than 1; THREADS=2 on an idle machine). Otherwise THREADS defaults to torch's own choice.
set -euo pipefail
MODELS=$(realpath -m "${1:?usage: bash training/evaluate_demo.sh MODELS_DIR [OUT_DIR]}")  # paths given from here
DEST=$(realpath -m "${2:-${OUT:-runs/eval_demo}}")
[ -z "${PIPELINE:-}" ] || PIPELINE=$(realpath -m "$PIPELINE")
[ -z "${SAVE_VIDEOS:-}" ] || SAVE_VIDEOS=$(realpath -m "$SAVE_VIDEOS")
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
PIPELINE=${PIPELINE:-models/oneforcing-demo}
MODE=${MODE:-quality}
SPLIT=${SPLIT:-heldout}
SUFFIX=$([ "$SPLIT" = heldout ] && echo "" || echo "_$SPLIT")  # quality.json (held-out), quality_seen.json
TEACHER_STEPS=${TEACHER_STEPS:-32}
TEACHER_SHIFT=${TEACHER_SHIFT:-8}
TEACHER_GUIDANCE=${TEACHER_GUIDANCE:-3}
source "$ROOT/training/demo_env.sh"  # oneforcing and diffusers importable (WHEELS)
[ -d "$MODELS" ] || { echo "no folder $MODELS"; exit 2; }
[ -f "$PIPELINE/model_index.json" ] || { echo "$PIPELINE is not a saved OneForcingPipeline"; exit 2; }
mkdir -p "$DEST"

ARGS=()
add() {  # add NAME SUBFOLDER OPTIONS: a row, when MODELS/SUBFOLDER exists and ONLY (if set) names it
  local name=$1 folder=$2 options=$3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -z "$folder" ]; then ARGS+=(--model "$name=$options"); return; fi  # no transformer: OPTIONS is the model
  if [ ! -f "$MODELS/$folder/config.json" ]; then echo "skipping $name: no $MODELS/$folder/config.json"; return; fi
  ARGS+=(--model "$name=$PIPELINE:transformer=$MODELS/$folder${options:+,$options}")
}
# the rows the paper's claim is about first; the teacher (the slowest on a CPU) last
[ "$MODE" = speed ] || add gt "" ground-truth
[ "$MODE" = speed ] || add vae "" "$PIPELINE:sampler=round-trip"
add framewise_1step framewise "steps=1,frames_per_block=1"
add dmd_1step framewise_nogan "steps=1,frames_per_block=1"
add chunkwise_1step chunkwise "steps=1,frames_per_block=3"
add framewise_4step framewise "steps=4,frames_per_block=1"
add teacher teacher "sampler=teacher,steps=$TEACHER_STEPS,shift=$TEACHER_SHIFT,guidance=$TEACHER_GUIDANCE"
if [ ${#ARGS[@]} -eq 0 ]; then echo "nothing to evaluate in $MODELS (ONLY=${ONLY:-})"; exit 2; fi

COMMON=(--prompts "$SPLIT" --num-prompts "${PROMPTS:-8}" --seeds ${SEEDS:-0 1} --num-frames "${FRAMES:-81}"
        --height "${SIZE:-128}" --width "${SIZE:-128}" --resume)
start=$(date +%s)
if [ "$MODE" = speed ]; then
  $PY -m oneforcing.training.evaluate "${ARGS[@]}" "${COMMON[@]}" --speed-only --device "${DEVICE:-cpu}" \
      --speed-clips "${SPEED_CLIPS:-1}" --warmup 1 --warmup-frames "${WARMUP_FRAMES:-5}" --threads "${THREADS:-1}" \
      --out "$DEST/speed.json" --markdown "$DEST/speed.md" ${EXTRA:-}
  if [ -f "$DEST/quality.json" ]; then
    $PY -m oneforcing.training.evaluate --tabulate --out "$DEST/quality.json" --speed-from "$DEST/speed.json" \
        --markdown "$DEST/table.md" >/dev/null
    echo "table with CPU speed: $DEST/table.md"
  fi
elif [ "$MODE" = quality ]; then
  if [ -z "${WORKERS:-}" ]; then
    cores=$(nproc 2>/dev/null || echo 2)
    WORKERS=$(( cores > 10 ? 8 : (cores > 2 ? cores - 2 : 0) ))
  fi
  $PY -m oneforcing.training.evaluate "${ARGS[@]}" "${COMMON[@]}" --device "${DEVICE:-auto}" --warmup 1 \
      --workers "$WORKERS" ${THREADS:+--threads "$THREADS"} ${SAVE_VIDEOS:+--save-videos "$SAVE_VIDEOS"} \
      --compare framewise_1step:dmd_1step --out "$DEST/quality$SUFFIX.json" --markdown "$DEST/quality$SUFFIX.md" \
      ${EXTRA:-}
else
  echo "MODE must be quality or speed, not $MODE"; exit 2
fi
echo "evaluate_demo ($MODE): $(( $(date +%s) - start )) s"
