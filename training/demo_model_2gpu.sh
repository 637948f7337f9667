#!/usr/bin/env bash
# The demo model's transformers on one machine with two GPUs, in two calls of under 10 minutes (tokenizer, text
# encoder and VAE are taken from PARTS, default the shipped models/oneforcing-demo):
#
#   PHASE=base bash training/demo_model_2gpu.sh      # encode; teacher on both GPUs (DDP through accelerate, with a
#                                                    # short one-GPU run first for the scaling figure); ODE pairs and
#                                                    # ODE initialisation, frame-wise on GPU 0 and chunk-wise on GPU 1
#   PHASE=students bash training/demo_model_2gpu.sh  # at once: frame-wise One-Forcing (GPU 0), frame-wise DMD-only
#                                                    # and chunk-wise One-Forcing (GPU 1)
#
# Each finished model goes to $RUN/pack/<name> (float16) and, with OUT set, to $OUT/<name>.tar.part-* plus a logs
# tar. The students phase reads the base models from BASE (pieces from the first call, or an unpacked pack).
# Time limits (seconds of training per stage; a stopped stage saves its model as final): TEACHER_SECONDS,
# ODE_INIT_SECONDS, DISTILL_SECONDS. EXTRA: more config overrides for every stage.
set -euo pipefail
source "$(dirname "$0")/demo_lib.sh"  # the repository root as working folder, RUN, CONFIG, PY
PHASE=${PHASE:?set PHASE=base or students}
NPROC=${NPROC:-2}
$PY -c "import torch; n = torch.cuda.device_count(); assert n >= 2, f'{n} GPUs'; print(n, 'x', torch.cuda.get_device_name())"
parts_settings "${PARTS:-models/oneforcing-demo}"
on_gpu() { local gpu=$1; shift; CUDA_VISIBLE_DEVICES=$gpu "$@"; }
wait_all() {  # pids...: wait for each; fail after all have ended if any failed
  local failed=0
  for pid in "$@"; do wait "$pid" || failed=1; done
  return $failed
}
run_stage encode on_gpu 0 $PY -m oneforcing.training encode --config "$CONFIG" output_dir="$RUN" "${COMMON[@]}" ${EXTRA:-}

if [ "$PHASE" = base ]; then
  TEACHER=(teacher.max_seconds="${TEACHER_SECONDS:-270}" "${COMMON[@]}" ${EXTRA:-})
  run_stage teacher_1gpu on_gpu 0 $PY -m oneforcing.training teacher --config "$CONFIG" output_dir="$RUN/measure_1gpu" \
      "${TEACHER[@]}" teacher.steps="${MEASURE_STEPS:-300}" teacher.save_every=0 --resume never
  run_stage "teacher_${NPROC}gpu" $PY -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" \
      --num_machines 1 --mixed_precision bf16 --dynamo_backend no -m oneforcing.training teacher --config "$CONFIG" \
      output_dir="$RUN" "${TEACHER[@]}"
  half "$RUN/teacher/final/transformer_ema" "$RUN/pack/teacher"
  ship_folder teacher
  INIT=(ode_pairs.teacher="$RUN/teacher/final/transformer_ema" ode_init.init="$RUN/teacher/final/transformer_ema"
        ode_init.max_seconds="${ODE_INIT_SECONDS:-110}" "${COMMON[@]}" ${EXTRA:-})
  ( for stage in ode-pairs ode-init; do
      run_stage "$stage" on_gpu 0 $PY -m oneforcing.training "$stage" --config "$CONFIG" output_dir="$RUN" "${INIT[@]}"
    done ) & framewise=$!
  ( for stage in ode-pairs ode-init; do
      run_stage "$stage-chunkwise" on_gpu 1 $PY -m oneforcing.training "$stage" --config "$CONFIG" \
          output_dir="$RUN/chunkwise" model.frames_per_block=3 "${INIT[@]}"
    done ) & chunkwise=$!
  wait_all $framewise $chunkwise || echo "an ODE stage failed"
  for pair in framewise:"$RUN" chunkwise:"$RUN/chunkwise"; do
    if [ -d "${pair#*:}/ode_init/final/generator" ]; then
      half "${pair#*:}/ode_init/final/generator" "$RUN/pack/ode_init_${pair%%:*}"
      ship_folder "ode_init_${pair%%:*}"
    fi
  done
elif [ "$PHASE" = students ]; then
  BASE=${BASE:-$RUN/pack}
  for name in teacher ode_init_framewise ode_init_chunkwise; do unpack "$BASE" "$name" >/dev/null; done
  in_dir() { if [ -d "$RUN/in_$1/$1" ]; then echo "$RUN/in_$1/$1"; else echo "$BASE/$1"; fi; }
  SET=("${COMMON[@]}" distill.teacher="$(in_dir teacher)" distill.max_seconds="${DISTILL_SECONDS:-420}" ${EXTRA:-})
  distill() {  # name, gpu, overrides...: one student, shipped when done
    local name=$1 gpu=$2; shift 2
    run_stage "distill-$name" on_gpu "$gpu" $PY -m oneforcing.training distill --config "$CONFIG" "${SET[@]}" \
        output_dir="$RUN/$name" "$@"
    half "$RUN/$name/distill/final/generator_ema" "$RUN/pack/$name"
    ship_folder "$name"
  }
  distill framewise 0 distill.generator="$(in_dir ode_init_framewise)" & a=$!
  distill framewise_nogan 1 distill.generator="$(in_dir ode_init_framewise)" --no-gan & b=$!
  distill chunkwise 1 distill.generator="$(in_dir ode_init_chunkwise)" model.frames_per_block=3 \
      distill.gan.feature_layers="[5]" & c=$!
  wait_all $a $b $c || echo "a distillation failed"
else
  echo "PHASE must be base or students, not $PHASE"; exit 2
fi
find "$RUN" -maxdepth 4 \( -name "log.jsonl" -o -name "summary.json" \) | tar -czf "${OUT:-$RUN}/${PHASE}_logs.tar.gz" -T - "$RUN/logs"
for d in "$RUN" "$RUN/measure_1gpu" "$RUN"/{chunkwise,framewise,framewise_nogan}; do
  [ -d "$d" ] && $PY -m oneforcing.training.report "$d" 2>/dev/null || true
done
stamp "done"
