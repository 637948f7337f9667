#!/usr/bin/env bash
# The demo model on ONE GPU, as calls of at most ~9 minutes (issue 20's recipe; benchmarks/results/demo_diagnosis.md
# says why): first a VAE that keeps the objects' colour and shape (trained with extra weight on object pixels and
# checked by the adherence metrics on its round trips of ground-truth clips), then a teacher on encoded clips (or,
# with STREAM=1, on clips rendered on the fly: it never sees a clip twice, but a step takes several times as long),
# then the students. The tokenizer and text encoder are the shipped ones (the diagnosis found they keep every word
# apart). Run the phases in order, one call or several (PHASE takes a list, e.g. PHASE="ode students"); repeat a
# phase while it says "not finished" (every stage resumes):
#
#   PHASE=vae      bash training/demo_model_1gpu.sh  # fine-tune the VAE (VAE_INIT, default the shipped one; empty:
#                                                    # a fresh VAE) for VAE_SECONDS, then its round-trip check
#   PHASE=teacher  bash training/demo_model_1gpu.sh  # teacher for TEACHER_SECONDS on NUM_SAMPLES encoded clips
#                                                    # (STREAM=1: on streamed clips), then its evaluation on seen
#                                                    # and held-out prompts
#   PHASE=ode      bash training/demo_model_1gpu.sh  # 1024 encoded clips (the later stages' prompts and real data),
#                                                    # ODE pairs (once), the frame-wise and chunk-wise ODE
#                                                    # initialisations that STUDENTS start from
#   PHASE=students bash training/demo_model_1gpu.sh  # STUDENTS (default: framewise framewise_nogan chunkwise):
#                                                    # frame-wise One-Forcing, frame-wise DMD-only, chunk-wise
#                                                    # One-Forcing, DISTILL_SECONDS each
#   PHASE=evaluate bash training/demo_model_1gpu.sh  # all rows of training/evaluate_demo.sh, seen and held-out
#
# The stages run one after another: two processes sharing the GPU ran slower in all than one alone (the README's
# "Retraining on one GPU" has the measurement).
#
# Every phase leaves its models in $RUN/pack (float16) and, with OUT set, ships them as $OUT/<name>.tar.part-* plus
# the logs. A phase on a fresh machine reads the VAE phase's parts from PARTS (its vae.tar.part-* pieces or a folder
# with tokenizer/, text_encoder/, vae/; default $RUN/parts when it exists, else models/oneforcing-demo) and the
# other phases' models from $RUN/pack when an earlier phase made them on this machine, else from BASE (their pieces
# or an unpacked pack, such as models/oneforcing-demo-training, which holds the bundled teacher). Latents,
# checkpoints, the VAE's training state and the evaluation tables ($RUN/eval/seeds_<EVAL_SEEDS>, also copied to
# $OUT/eval) stay in RUN (default /tmp/oneforcing_demo) and survive between calls only while the machine does.
# Settings: VAE_STAGES
# (1200x64x5x32,600x128x9x12,200x128x33x4,250x64x81x6), VAE_OBJECT_WEIGHT (4), VAE_SECONDS (400), VAE_ARGS (more
# demo_components arguments), VAE_CHECK_SIZE (81x128x128: FRAMESxHEIGHTxWIDTH of the round-trip check), STREAM (0),
# NUM_SAMPLES (3072, without STREAM), TEACHER_SECONDS (240), TEACHER_STEPS (12000),
# ODE_INIT_SECONDS (150), DISTILL_SECONDS (150), STUDENTS, EVAL_SEEDS ("0 1 2 3 4 5"), EVAL_PROMPTS (8), EVAL_EXTRA
# (more evaluate arguments; FRAMES, SIZE, WORKERS, THREADS of training/evaluate_demo.sh pass through), WHEELS
# (diffusers' wheel when it is not installed), EXTRA (more config overrides for every stage), CALL_SECONDS (unset: no
# limit): how long this call may run, for a device whose calls are killed at a time limit; every training stage's own
# limit above is cut so that it stops CALL_RESERVE (60) s before, and a stage left no time is not started (encodes and
# evaluations are not cut: a later call resumes them). All *_SECONDS settings and CALL_RESERVE are whole seconds.
set -euo pipefail
source "$(dirname "$0")/demo_lib.sh"  # the repository root as working folder, RUN, CONFIG, PY, run_stage, half...
PHASES=${PHASE:?set PHASE to vae, teacher, ode, students or evaluate (or several, in that order)}
VAE_INIT=${VAE_INIT-models/oneforcing-demo/vae}  # set it empty for a fresh VAE

vae_phase() {  # the shipped tokenizer and text encoder; the VAE fine-tuned (or trained afresh), then its check
  mkdir -p "$RUN/parts" && cp -rn models/oneforcing-demo/tokenizer models/oneforcing-demo/text_encoder "$RUN/parts/"
  local seconds
  seconds=$(stage_seconds "${VAE_SECONDS:-400}") || { no_time_for vae; return 0; }
  run_stage vae $PY -m oneforcing.training.demo_components --out "$RUN/parts" --parts vae \
      --vae-stages "${VAE_STAGES:-1200x64x5x32,600x128x9x12,200x128x33x4,250x64x81x6}" \
      --vae-object-weight "${VAE_OBJECT_WEIGHT:-4}" --vae-max-seconds "$seconds" --eval-clips 4 \
      --stat-clips 8 ${VAE_INIT:+--vae-init "$VAE_INIT"} ${VAE_ARGS:-}
  run_stage vae-check $PY benchmarks/demo_diagnosis.py components --pipeline "$RUN/parts" \
      --size "${VAE_CHECK_SIZE:-81x128x128}" --seeds 0 1 --json "$RUN/parts/diagnosis.json"
  cp -r "$RUN/parts/tokenizer" "$RUN/parts/text_encoder" "$RUN/parts/vae" "$RUN/parts"/*.json "$RUN/pack/"
  ship
}
use_parts() {  # PARTS, COMMON and BASE for the phases after the VAE's
  local default=models/oneforcing-demo
  [ -d "$RUN/parts/vae" ] && default=$RUN/parts
  parts_settings "${PARTS:-$default}"
  BASE=${BASE:-$RUN/pack}
}
model_dir() {  # name -> its folder: $RUN/pack/name, else unpacked from BASE's pieces, or BASE/name
  local unpacked
  if [ -f "$RUN/pack/$1/config.json" ]; then echo "$RUN/pack/$1"; return; fi
  unpacked=$(unpack "$BASE" "$1")
  if [ -d "$unpacked/$1" ]; then echo "$unpacked/$1"; else echo "$BASE/$1"; fi
}
encode() {  # clips -> $RUN/latents (kept: a later call on the same machine skips those already there)
  run_stage encode $PY -m oneforcing.training encode --config "$CONFIG" output_dir="$RUN" \
      encode.num_samples="$1" "${COMMON[@]}" ${EXTRA:-}
}
evaluate() {  # models folder, rows ("teacher"; all when empty): seen and held-out quality into $RUN/eval/<seeds>
  local pipeline=$RUN/eval_pipeline  # the parts as a pipeline folder (the rows bring their own transformers)
  local seeds=${EVAL_SEEDS:-0 1 2 3 4 5}
  # one folder per seed list: a later call on this machine with other seeds starts its own tables, where the same
  # seeds resume (and rerun a model whose weights changed since)
  local dest=$RUN/eval/seeds_${seeds// /_}
  [ -f "$pipeline/model_index.json" ] || $PY -m oneforcing.training.assemble_demo --parts "$PARTS" \
      --transformer "$1/teacher" --out "$pipeline" --max-mb 0
  for split in seen heldout; do
    # TEACHER_STEPS here counts training steps; the evaluation's teacher samples with the recipe's 32 Euler steps
    EXTRA=${EVAL_EXTRA:-} ONLY=${2:+gt vae $2} SPLIT=$split SEEDS="$seeds" TEACHER_STEPS=32 \
        PROMPTS="${EVAL_PROMPTS:-8}" PIPELINE="$pipeline" bash training/evaluate_demo.sh "$1" "$dest"
  done
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/eval" && cp "$dest"/quality*.{json,md} "$OUT/eval/"; fi
}
teacher_phase() {
  local steps=${TEACHER_STEPS:-12000} data=(data.stream=true)
  if [ "${STREAM:-0}" = 0 ]; then encode "${NUM_SAMPLES:-3072}"; data=(); fi
  local seconds
  seconds=$(stage_seconds "${TEACHER_SECONDS:-240}") || { no_time_for teacher; return 0; }
  run_stage teacher $PY -m oneforcing.training teacher --config "$CONFIG" output_dir="$RUN" "${COMMON[@]}" \
      "${data[@]}" teacher.steps="$steps" teacher.max_seconds="$seconds" teacher.save_every=500 \
      ${EXTRA:-}
  half "$RUN/teacher/final/transformer_ema" "$RUN/pack/teacher"
  ship_folder teacher
  grep -q '"steps": \?'"$steps"'[,}]' "$RUN/teacher/summary.json" || echo "teacher: not finished (run again)"
  evaluate "$RUN/pack" teacher
}
STUDENT_NAMES="framewise framewise_nogan chunkwise"  # every student, in the order they are made by default
# each student's layout: the ODE initialisation it starts from (ode_init_<layout>), and that layout's frames per block
declare -A STUDENT_LAYOUT=([framewise]=framewise [framewise_nogan]=framewise [chunkwise]=chunkwise)
declare -A LAYOUT_FRAMES=([framewise]=1 [chunkwise]=3)
chosen_students() {  # STUDENTS (all by default), each name checked
  local name
  for name in ${STUDENTS:-$STUDENT_NAMES}; do
    [[ -v STUDENT_LAYOUT[$name] ]] || { echo "STUDENTS: unknown student $name ($STUDENT_NAMES)" >&2; return 2; }
  done
  echo "${STUDENTS:-$STUDENT_NAMES}"
}
ode_layouts() {  # the layouts whose ODE initialisations the chosen students start from, each once
  local name layout made=" "
  for name in $CHOSEN; do
    layout=${STUDENT_LAYOUT[$name]}
    [[ $made == *" $layout "* ]] || { echo "$layout"; made+="$layout "; }
  done
}
ode_phase() {
  encode 1024
  local teacher name seconds
  teacher=$(model_dir teacher)
  local set=(ode_pairs.teacher="$teacher" ode_init.init="$teacher" "${COMMON[@]}" ${EXTRA:-})
  # the teacher's trajectories do not depend on the student's layout: made once, read by both initialisations
  run_stage ode-pairs $PY -m oneforcing.training ode-pairs --config "$CONFIG" output_dir="$RUN/framewise" "${set[@]}"
  for name in $(ode_layouts); do
    seconds=$(stage_seconds "${ODE_INIT_SECONDS:-150}") || { no_time_for "ode-init-$name"; continue; }
    run_stage "ode-init-$name" $PY -m oneforcing.training ode-init --config "$CONFIG" output_dir="$RUN/$name" \
        model.frames_per_block="${LAYOUT_FRAMES[$name]}" ode_init.pairs="$RUN/framewise/ode_pairs" \
        ode_init.max_seconds="$seconds" "${set[@]}"
    half "$RUN/$name/ode_init/final/generator" "$RUN/pack/ode_init_$name"
    ship_folder "ode_init_$name"
  done
}
distill() {  # name, ODE initialisation, overrides...: one student, shipped when done
  local name=$1 init=$2 seconds; shift 2
  seconds=$(stage_seconds "${DISTILL_SECONDS:-150}") || { no_time_for "distill-$name"; return 0; }
  run_stage "distill-$name" $PY -m oneforcing.training distill --config "$CONFIG" "${COMMON[@]}" \
      distill.teacher="$(model_dir teacher)" distill.max_seconds="$seconds" ${EXTRA:-} \
      output_dir="$RUN/$name" distill.generator="$(model_dir "$init")" "$@"
  half "$RUN/$name/distill/final/generator_ema" "$RUN/pack/$name"
  ship_folder "$name"
}
student() {  # name: its distillation, from its layout's ODE initialisation
  local layout=${STUDENT_LAYOUT[$1]} own=()
  case $1 in
    framewise_nogan) own=(--no-gan) ;;
    chunkwise) own=(distill.gan.feature_layers="[5]") ;;
  esac
  distill "$1" "ode_init_$layout" model.frames_per_block="${LAYOUT_FRAMES[$layout]}" "${own[@]}"
}
students_phase() {
  local name
  encode 1024
  for name in $CHOSEN; do student "$name"; done
}
evaluate_phase() {
  local name
  for name in teacher $STUDENT_NAMES; do
    [ -d "$RUN/pack/$name" ] || cp -r "$(model_dir "$name")" "$RUN/pack/$name"
  done
  evaluate "$RUN/pack" ""
}

CHOSEN=$(chosen_students)  # checked before any phase spends GPU time
for setting in CALL_SECONDS CALL_RESERVE VAE_SECONDS TEACHER_SECONDS ODE_INIT_SECONDS DISTILL_SECONDS; do
  [[ -z ${!setting:-} || ${!setting} =~ ^[0-9]+$ ]] || { echo "$setting must be whole seconds, not ${!setting}" >&2; exit 2; }
done

for PHASE in $PHASES; do
  case $PHASE in
    vae) vae_phase; continue ;;
    teacher|ode|students|evaluate) use_parts; "${PHASE}_phase" ;;
    *) echo "PHASE must be vae, teacher, ode, students or evaluate, not $PHASE"; exit 2 ;;
  esac
  for d in "$RUN" "$RUN"/{framewise,chunkwise,framewise_nogan}; do
    [ -d "$d" ] && $PY -m oneforcing.training.report "$d" 2>/dev/null || true
  done
  stamp "$PHASE done"
done
