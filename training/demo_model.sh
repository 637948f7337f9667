#!/usr/bin/env bash
# Trains the demo model (training/configs/demo.json) on one GPU, in two phases that each fit one 10-minute call:
#
#   PHASE=base bash training/demo_model.sh       # tokenizer, text encoder, VAE; encode; teacher; ODE pairs;
#                                                # frame-wise and chunk-wise ODE initialisation
#   PHASE=students bash training/demo_model.sh   # distillation: frame-wise One-Forcing (DMD + GAN), frame-wise
#                                                # DMD-only (--no-gan), chunk-wise One-Forcing
#
# Phase `base` leaves its models in $RUN/pack (float16 safetensors, the parts as saved); phase `students` reads
# them from $BASE (default: the same $RUN/pack) and writes the three students' EMA generators to $RUN/pack.
# With OUT set, each phase also writes its pack as a tar split into 15 MiB pieces plus a logs tar to $OUT (what
# comes back from a device call); BASE may then be a folder holding the base pieces. EXTRA: more overrides for every
# stage (e.g. a short calibration run: EXTRA="teacher.steps=50 ...").
# Afterwards: python -m oneforcing.training.assemble_demo --parts ... --generator ... --out models/oneforcing-demo
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN=${RUN_DIR:-/tmp/oneforcing_demo}
CONFIG=training/configs/demo.json
PY=${PYTHON:-python}
PHASE=${PHASE:?set PHASE=base or PHASE=students}
VAE_STAGES=${VAE_STAGES:-1500x64x5x16,1000x128x9x8}
export PYTHONUNBUFFERED=1
if ! $PY -c "import oneforcing" 2>/dev/null; then
  mkdir -p /tmp/oneforcing_path && ln -sfn "$ROOT" /tmp/oneforcing_path/oneforcing
  export PYTHONPATH=/tmp/oneforcing_path${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$RUN/pack" "$RUN/logs"
started=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - started )) s)"; }
run_stage() {  # name, command...: output in $RUN/logs/<name>.out; its last lines, or the error
  local name=$1; shift
  stamp "$name"
  if ! "$@" > "$RUN/logs/$name.out" 2>&1; then tail -n 40 "$RUN/logs/$name.out"; echo "FAILED: $name"; exit 1; fi
  grep -v -i "warn" "$RUN/logs/$name.out" | tail -n 2 || true
}
half() {  # diffusers model folder -> the same folder with float16 weights (loads back as float32 by default)
  $PY - "$1" "$2" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.suffix == ".safetensors":
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    elif f.is_file():
        shutil.copy(f, dst / f.name)
EOF
}
ship() {  # tar of $RUN/pack -> $OUT/<phase>.tar.part-* (15 MiB pieces), logs -> $OUT/<phase>_logs.tar.gz
  [ -n "${OUT:-}" ] || return 0
  tar -C "$RUN/pack" -cf - . | split -b 15M - "$OUT/$PHASE.tar.part-"
  for d in "$RUN"/*/; do  # stage logs and summaries, not the checkpoints
    find "$d" -maxdepth 2 \( -name "log.jsonl" -o -name "summary.json" -o -name "report.json" \) 2>/dev/null
  done | tar -czf "$OUT/${PHASE}_logs.tar.gz" -T - "$RUN/logs" 2>/dev/null || true
  ls -la "$OUT"
}

if [ "$PHASE" = base ]; then
  PARTS=$RUN/parts
  run_stage parts $PY -m oneforcing.training.demo_components --out "$PARTS" --vae-stages "$VAE_STAGES" \
      --eval-clips 4 --stat-clips 8
  grep -o '"heldout_psnr_db": [0-9.]*' "$PARTS/report.json" || true
  TEXT_DIM=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['d_model'])" "$PARTS/text_encoder/config.json")
  SET=(output_dir="$RUN" encode.vae="$PARTS/vae" encode.tokenizer="$PARTS/tokenizer"
       encode.text_encoder="$PARTS/text_encoder" model.architecture.text_dim="$TEXT_DIM"
       ode_pairs.teacher="$RUN/teacher/final/transformer_ema" ode_init.init="$RUN/teacher/final/transformer_ema"
       ${EXTRA:-})
  for stage in encode teacher ode-pairs ode-init; do
    run_stage "$stage" $PY -m oneforcing.training "$stage" --config "$CONFIG" "${SET[@]}"
  done
  run_stage ode-init-chunkwise $PY -m oneforcing.training ode-init --config "$CONFIG" "${SET[@]}" \
      output_dir="$RUN/chunkwise" ode_init.pairs="$RUN/ode_pairs" model.frames_per_block=3
  stamp "pack"
  cp -r "$PARTS/tokenizer" "$PARTS/text_encoder" "$PARTS/vae" "$PARTS/report.json" "$RUN/pack/"
  half "$RUN/teacher/final/transformer_ema" "$RUN/pack/teacher"
  half "$RUN/ode_init/final/generator" "$RUN/pack/ode_init_framewise"
  half "$RUN/chunkwise/ode_init/final/generator" "$RUN/pack/ode_init_chunkwise"
  ship
elif [ "$PHASE" = students ]; then
  BASE=${BASE:-$RUN/pack}
  if ls "$BASE"/base.tar.part-* >/dev/null 2>&1; then  # pieces from a base call: unpack them
    mkdir -p "$RUN/base" && cat "$BASE"/base.tar.part-* | tar -C "$RUN/base" -xf - && BASE=$RUN/base
  fi
  TEXT_DIM=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['d_model'])" "$BASE/text_encoder/config.json")
  SET=(encode.vae="$BASE/vae" encode.tokenizer="$BASE/tokenizer" encode.text_encoder="$BASE/text_encoder"
       model.architecture.text_dim="$TEXT_DIM" data.latents="$RUN/latents" distill.teacher="$BASE/teacher"
       ${EXTRA:-})
  run_stage encode $PY -m oneforcing.training encode --config "$CONFIG" output_dir="$RUN" "${SET[@]}"
  run_stage distill-framewise $PY -m oneforcing.training distill --config "$CONFIG" "${SET[@]}" \
      output_dir="$RUN/framewise" distill.generator="$BASE/ode_init_framewise"
  run_stage distill-framewise-nogan $PY -m oneforcing.training distill --config "$CONFIG" --no-gan "${SET[@]}" \
      output_dir="$RUN/framewise_nogan" distill.generator="$BASE/ode_init_framewise"
  run_stage distill-chunkwise $PY -m oneforcing.training distill --config "$CONFIG" "${SET[@]}" \
      output_dir="$RUN/chunkwise" distill.generator="$BASE/ode_init_chunkwise" model.frames_per_block=3 \
      distill.gan.feature_layers="[5]"
  stamp "pack"
  for name in framewise framewise_nogan chunkwise; do
    half "$RUN/$name/distill/final/generator_ema" "$RUN/pack/$name"
  done
  ship
else
  echo "PHASE must be base or students, not $PHASE"; exit 2
fi
for d in "$RUN" "$RUN/chunkwise" "$RUN/framewise" "$RUN/framewise_nogan"; do
  [ -d "$d" ] && ls "$d"/*/log.jsonl >/dev/null 2>&1 && $PY -m oneforcing.training.report "$d" || true
done
stamp "done"
