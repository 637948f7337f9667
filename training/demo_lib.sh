# What training/demo_model.sh and training/demo_model_2gpu.sh share (sourced, not run): the repository root as the
# working folder, RUN (env RUN_DIR), CONFIG (env CONFIG), PY (env PYTHON), oneforcing importable, and the shell functions below.
# The functions read PHASE; OUT (optional) is where pieces and logs are shipped.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
RUN=${RUN_DIR:-/tmp/oneforcing_demo}
CONFIG=${CONFIG:-training/configs/demo.json}
PY=${PYTHON:-python}
source "$ROOT/training/demo_env.sh"  # oneforcing and diffusers importable (WHEELS)
mkdir -p "$RUN/pack" "$RUN/logs"
started=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - started )) s)"; }
stage_seconds() {  # a training stage's own time limit (whole seconds) -> that limit, cut so that the stage stops
  # CALL_RESERVE seconds (default 60: its last iteration, the save, the float16 copy and the shipping) before the call's
  # CALL_SECONDS (when set: how long this call may run, counted from the script's start) are spent. Prints nothing and
  # fails when not a second of training would be left: the caller skips the stage, and a later call resumes it.
  local limit=$1 left
  [ -n "${CALL_SECONDS:-}" ] || { echo "$limit"; return 0; }
  left=$(( CALL_SECONDS - ($(date +%s) - started) - ${CALL_RESERVE:-60} ))
  (( left >= 1 )) || return 1
  echo $(( left < limit ? left : limit ))
}
no_time_for() {  # stage name: say that CALL_SECONDS left it no time
  stamp "$1 not started: CALL_SECONDS=$CALL_SECONDS leaves it no time (not finished: run again, it resumes)"
}
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

ship_folder() {  # one model of $RUN/pack -> $OUT/<name>.tar.part-*, and the logs so far (a later stage may not finish)
  [ -n "${OUT:-}" ] || return 0
  tar -C "$RUN/pack" -cf - "$1" | split -b 15M - "$OUT/$1.tar.part-"
  local aside="$OUT/.logs.$BASHPID"  # written aside, then renamed: students side by side (demo_model_2gpu.sh) ship apart
  find "$RUN" -maxdepth 3 \( -name "log.jsonl" -o -name "summary.json" \) | tar -czf "$aside" -T - "$RUN/logs"
  mv "$aside" "$OUT/${PHASE}_logs.tar.gz"
}
unpack() {  # folder holding <phase>.tar.part-* pieces (from an earlier call) or an unpacked pack -> the folder
  local src=$1 name=$2
  if ls "$src"/"$name".tar.part-* >/dev/null 2>&1; then
    mkdir -p "$RUN/in_$name" && cat "$src"/"$name".tar.part-* | tar -C "$RUN/in_$name" -xf - && echo "$RUN/in_$name"
  else
    echo "$src"
  fi
}
parts_settings() {  # folder of tokenizer/, text_encoder/, vae/ (or its packed pieces) -> PARTS, and COMMON: the
  # config overrides every stage takes (those parts, the text width, where the encoded latents go)
  PARTS=$(unpack "$1" vae)
  local text_dim
  text_dim=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['d_model'])" "$PARTS/text_encoder/config.json")
  COMMON=(encode.vae="$PARTS/vae" encode.tokenizer="$PARTS/tokenizer" encode.text_encoder="$PARTS/text_encoder"
          model.architecture.text_dim="$text_dim" data.latents="$RUN/latents")
}
