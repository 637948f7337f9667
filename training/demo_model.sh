#!/usr/bin/env bash
# Trains the demo model (training/configs/demo.json) on one GPU in phases that each fit one 10-minute call:
#
#   PHASE=vae bash training/demo_model.sh        # tokenizer, text encoder, VAE (at most VAE_SECONDS of training;
#                                                # VAE_INIT=folder fine-tunes a saved VAE)
#   PHASE=base bash training/demo_model.sh       # encode; teacher; ODE pairs; frame-wise ODE initialisation
#   PHASE=students bash training/demo_model.sh   # frame-wise One-Forcing (DMD + GAN) and DMD-only (--no-gan)
#   PHASE=chunkwise bash training/demo_model.sh  # chunk-wise ODE pairs, ODE initialisation, One-Forcing
#
# Each phase leaves its models in $RUN/pack (transformers as float16 safetensors) and, with OUT set, also as a tar
# split into 15 MiB pieces ($OUT/<phase>.tar.part-*) plus a logs tar: what comes back from a device call. Later
# phases read the parts from PARTS and the base models from BASE: a folder with the pieces of that phase, or an
# unpacked pack (default: $RUN/pack). EXTRA: more config overrides for every stage.
# Afterwards: python -m oneforcing.training.assemble_demo (see its --help) builds models/oneforcing-demo.
set -euo pipefail
source "$(dirname "$0")/demo_lib.sh"  # the repository root as working folder, RUN, CONFIG, PY
PHASE=${PHASE:?set PHASE=vae, base, students or chunkwise}
VAE_STAGES=${VAE_STAGES:-1200x64x5x32,800x128x9x12}
if [ "$PHASE" = vae ]; then  # tokenizer, text encoder, VAE (trained for VAE_SECONDS at most)
  run_stage parts $PY -m oneforcing.training.demo_components --out "$RUN/parts" --vae-stages "$VAE_STAGES" \
      --vae-max-seconds "${VAE_SECONDS:-420}" --eval-clips 4 --stat-clips 8 ${VAE_INIT:+--vae-init "$VAE_INIT"} ${VAE_ARGS:-}
  grep -o '"heldout_psnr_db": [0-9.]*' "$RUN/parts/report.json" || true
  cp -r "$RUN/parts/tokenizer" "$RUN/parts/text_encoder" "$RUN/parts/vae" "$RUN/parts/report.json" "$RUN/pack/"
  ship
  exit 0
fi
parts_settings "${PARTS:-$RUN/pack}"
run_stage encode $PY -m oneforcing.training encode --config "$CONFIG" output_dir="$RUN" "${COMMON[@]}" ${EXTRA:-}
if [ "$PHASE" = base ]; then  # teacher, ODE pairs, frame-wise ODE initialisation
  SET=(output_dir="$RUN" "${COMMON[@]}" ode_pairs.teacher="$RUN/teacher/final/transformer_ema"
       ode_init.init="$RUN/teacher/final/transformer_ema" ${EXTRA:-})
  for stage in teacher ode-pairs ode-init; do
    run_stage "$stage" $PY -m oneforcing.training "$stage" --config "$CONFIG" "${SET[@]}"
  done
  stamp "pack"
  half "$RUN/teacher/final/transformer_ema" "$RUN/pack/teacher"
  half "$RUN/ode_init/final/generator" "$RUN/pack/ode_init_framewise"
elif [ "$PHASE" = students ]; then  # frame-wise One-Forcing and its DMD-only ablation, each shipped when done
  BASE=$(unpack "${BASE:-$RUN/pack}" base)
  SET=("${COMMON[@]}" distill.teacher="$BASE/teacher" distill.generator="$BASE/ode_init_framewise" ${EXTRA:-})
  run_stage distill-framewise $PY -m oneforcing.training distill --config "$CONFIG" "${SET[@]}" \
      output_dir="$RUN/framewise"
  half "$RUN/framewise/distill/final/generator_ema" "$RUN/pack/framewise"
  ship_folder framewise
  run_stage distill-framewise-nogan $PY -m oneforcing.training distill --config "$CONFIG" --no-gan "${SET[@]}" \
      output_dir="$RUN/framewise_nogan"
  half "$RUN/framewise_nogan/distill/final/generator_ema" "$RUN/pack/framewise_nogan"
  ship_folder framewise_nogan
  exit 0
elif [ "$PHASE" = chunkwise ]; then  # ODE pairs again, chunk-wise ODE initialisation and One-Forcing
  BASE=$(unpack "${BASE:-$RUN/pack}" base)
  SET=(output_dir="$RUN/chunkwise" "${COMMON[@]}" model.frames_per_block=3 ode_pairs.teacher="$BASE/teacher"
       ode_init.init="$BASE/teacher" distill.teacher="$BASE/teacher" distill.gan.feature_layers="[5]" ${EXTRA:-})
  for stage in ode-pairs ode-init distill; do
    run_stage "$stage-chunkwise" $PY -m oneforcing.training "$stage" --config "$CONFIG" "${SET[@]}"
  done
  stamp "pack"
  half "$RUN/chunkwise/distill/final/generator_ema" "$RUN/pack/chunkwise"
else
  echo "PHASE must be vae, base, students or chunkwise, not $PHASE"; exit 2
fi
ship
for d in "$RUN" "$RUN/chunkwise" "$RUN/framewise" "$RUN/framewise_nogan"; do
  [ -d "$d" ] && ls "$d"/*/log.jsonl >/dev/null 2>&1 && $PY -m oneforcing.training.report "$d" || true
done
stamp "done"
