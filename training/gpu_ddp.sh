#!/usr/bin/env bash
# Multi-GPU proof (nvidia-h200-x2): the same `distill` and `teacher` commands on 1 GPU and, through
# `accelerate launch`, on 2 GPUs (DDP, same batch per GPU), with steps/s and samples/s of each, and a check that the
# replicas end identical. Prerequisites (encode, teacher, ode-pairs, ode-init) are made first at reduced size on one
# GPU. About 5 minutes.
#
#   bash training/gpu_ddp.sh      # env: RUN_DIR (default /tmp/oneforcing_ddp), PARTS, OUT, NPROC (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN=${RUN_DIR:-/tmp/oneforcing_ddp}
CONFIG=training/configs/small_gpu.json
PY=${PYTHON:-python}
NPROC=${NPROC:-2}
if ! $PY -c "import oneforcing" 2>/dev/null; then
  mkdir -p /tmp/oneforcing_path && ln -sfn "$ROOT" /tmp/oneforcing_path/oneforcing
  export PYTHONPATH=/tmp/oneforcing_path${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch; n = torch.cuda.device_count(); assert n >= $NPROC, f'{n} GPUs'; print(n, 'x', torch.cuda.get_device_name())"
rm -rf "$RUN" && mkdir -p "$RUN"
run_stage() {
  local name=$1; shift
  echo "== $name"
  if ! "$@" > "$RUN/$name.out" 2>&1; then tail -n 40 "$RUN/$name.out"; echo "FAILED: $name"; exit 1; fi
  grep -v -i "warn" "$RUN/$name.out" | grep -E "identical|step|resumed|\]" | tail -n 2 || true
}
complete() { [ -d "$1/tokenizer" ] && [ -d "$1/text_encoder" ] && [ -d "$1/vae" ]; }
PARTS=${PARTS:-$ROOT/demo_model_parts}
if ! complete "$PARTS"; then
  PARTS=$RUN/parts
  run_stage parts $PY -m oneforcing.training.demo_components --out "$PARTS" --vae-stages 0x64x5x4 --stat-clips 2 \
      --eval-clips 1 --eval-frames 9
fi
TEXT_DIM=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['d_model'])" "$PARTS/text_encoder/config.json")
SET=(output_dir="$RUN/base" encode.vae="$PARTS/vae" encode.tokenizer="$PARTS/tokenizer"
     encode.text_encoder="$PARTS/text_encoder" model.architecture.text_dim="$TEXT_DIM" encode.num_samples=128
     teacher.steps=200 ode_pairs.num_pairs=64 ode_init.steps=100 ${EXTRA:-})
for stage in encode teacher ode-pairs ode-init; do
  run_stage "$stage" $PY -m oneforcing.training "$stage" --config "$CONFIG" "${SET[@]}"
done

# the measured runs: distill 60 iterations (12 generator steps), teacher 300 steps; no intermediate checkpoints
MEASURE=(data.latents="$RUN/base/latents" distill.generator="$RUN/base/ode_init/final/generator"
         distill.teacher="$RUN/base/teacher/final/transformer" distill.steps=60 distill.save_every=0
         teacher.steps=300 teacher.save_every=0 encode.vae="$PARTS/vae" model.architecture.text_dim="$TEXT_DIM" ${EXTRA:-})
for stage in distill teacher; do
  run_stage "${stage}_1gpu" $PY -m oneforcing.training "$stage" --config "$CONFIG" "${MEASURE[@]}" \
      output_dir="$RUN/gpu1" --resume never
  run_stage "${stage}_${NPROC}gpu" accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
      --mixed_precision bf16 --dynamo_backend no -m oneforcing.training "$stage" --config "$CONFIG" \
      "${MEASURE[@]}" output_dir="$RUN/gpu$NPROC" --resume never
done

echo "== throughput (steady state: second half of each run)"
$PY - "$RUN" "$NPROC" "$CONFIG" <<'EOF'
import json, sys
from oneforcing.training.report import read_log, summarise
run, nproc, config = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3]))
rows = {}
for stage in ("distill", "teacher"):
    batch = config[stage]["batch_size"]
    for gpus in (1, nproc):
        s = summarise(read_log(__import__("pathlib").Path(f"{run}/gpu{gpus}/{stage}/log.jsonl")))
        rate = s["steps_per_second"]
        rows[f"{stage}_{gpus}gpu"] = {"steps_per_s": rate, "samples_per_s": rate * batch * gpus,
                                      "last": {k: v[-1] for k, v in s["curves"].items() if v}}
        print(f"{stage:8s} {gpus} GPU(s): {rate:6.2f} steps/s, {rate * batch * gpus:7.1f} samples/s "
              f"(batch {batch} per GPU)")
    one, many = rows[f"{stage}_1gpu"], rows[f"{stage}_{nproc}gpu"]
    print(f"{stage:8s} scaling x{many['samples_per_s'] / one['samples_per_s']:.2f} samples/s on {nproc} GPUs")
json.dump(rows, open(f"{run}/throughput.json", "w"), indent=2)
EOF
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$RUN/throughput.json" "$RUN"/*.out "$OUT/"; fi
