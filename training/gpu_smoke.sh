#!/usr/bin/env bash
# Every stage of the One-Forcing recipe end to end on one GPU at small scale (training/configs/small_gpu.json, the
# synthetic world), then the loss curves in compact form. About 5 minutes on an H100.
#
#   bash training/gpu_smoke.sh            # from the repository root; needs torch, diffusers, transformers,
#                                         # accelerate, safetensors, sentencepiece, opencv-python-headless
# Environment: RUN_DIR (default /tmp/oneforcing_small_gpu), PARTS (a demo_components folder with tokenizer/,
# text_encoder/, vae/; default: ./demo_model_parts if complete, else built here with an untrained VAE), OUT (if set,
# logs, summaries, the curves and a sample video are copied there), EXTRA (more config overrides for every stage),
# SMOKE_DEVICE=cpu (a dry run of the script itself on a CPU, with EXTRA shrinking the recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN=${RUN_DIR:-/tmp/oneforcing_small_gpu}
CONFIG=training/configs/small_gpu.json
PY=${PYTHON:-python}

if ! $PY -c "import oneforcing" 2>/dev/null; then  # not installed: import the repository folder under its name
  mkdir -p /tmp/oneforcing_path && ln -sfn "$ROOT" /tmp/oneforcing_path/oneforcing
  export PYTHONPATH=/tmp/oneforcing_path${PYTHONPATH:+:$PYTHONPATH}
fi
DEVICE=${SMOKE_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('GPU:', torch.cuda.get_device_name())"
fi
rm -rf "$RUN" && mkdir -p "$RUN"
started=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - started )) s since start)"; }
run_stage() {  # name, command...: full output in $RUN/<name>.out; its last lines, or the error
  local name=$1; shift
  if ! "$@" > "$RUN/$name.out" 2>&1; then tail -n 40 "$RUN/$name.out"; echo "FAILED: $name"; exit 1; fi
  grep -v -i "warn" "$RUN/$name.out" | tail -n 3 || true
}

complete() { [ -d "$1/tokenizer" ] && [ -d "$1/text_encoder" ] && [ -d "$1/vae" ]; }
PARTS=${PARTS:-$ROOT/demo_model_parts}
if ! complete "$PARTS"; then
  stamp "building demo tokenizer / text encoder / (untrained) VAE"
  PARTS=$RUN/parts
  run_stage parts $PY -m oneforcing.training.demo_components --out "$PARTS" --vae-stages 0x64x5x4 --stat-clips 2 \
      --eval-clips 1 --eval-frames 9
fi
TEXT_DIM=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['d_model'])" "$PARTS/text_encoder/config.json")
echo "components: $PARTS (text_dim $TEXT_DIM)"

SET=(output_dir="$RUN" encode.vae="$PARTS/vae" encode.tokenizer="$PARTS/tokenizer"
     encode.text_encoder="$PARTS/text_encoder" model.architecture.text_dim="$TEXT_DIM" ${EXTRA:-})
for stage in encode teacher ode-pairs ode-init distill; do
  stamp "$stage"
  run_stage "$stage" $PY -m oneforcing.training "$stage" --config "$CONFIG" "${SET[@]}"
done
stamp "distill --no-gan (the DMD-only ablation)"
run_stage distill_nogan $PY -m oneforcing.training distill --config "$CONFIG" --no-gan "${SET[@]}" \
    output_dir="$RUN/nogan" data.latents="$RUN/latents" distill.generator="$RUN/ode_init/final/generator" \
    distill.teacher="$RUN/teacher/final/transformer"

stamp "sample from the distilled generator (reference export -> pipeline)"
$PY - "$RUN" "$PARTS" "$DEVICE" <<'EOF'
import sys, time, torch
from diffusers import AutoencoderKLWan
from transformers import AutoTokenizer, UMT5EncoderModel
from oneforcing import CausalWanTransformer3DModel, OneForcingPipeline, OneForcingScheduler
from oneforcing.pipelines.video_io import export_to_mp4
from oneforcing.training import world

import json
run, parts, device = sys.argv[1:4]
encode = json.load(open(f"{run}/latents/run_config.json"))["encode"]
heads = CausalWanTransformer3DModel.from_pretrained(f"{run}/distill/final/generator_ema").config.num_attention_heads
generator = CausalWanTransformer3DModel.from_single_file(f"{run}/distill/final/one_forcing.pt",
                                                         num_attention_heads=heads, frames_per_block=1)
pipe = OneForcingPipeline(AutoTokenizer.from_pretrained(f"{parts}/tokenizer"),
                          UMT5EncoderModel.from_pretrained(f"{parts}/text_encoder"), generator,
                          AutoencoderKLWan.from_pretrained(f"{parts}/vae"), OneForcingScheduler()).to(device)
prompt = world.heldout_prompts(1)[0]
start = time.time()
video = pipe(prompt, num_frames=encode["num_frames"], height=encode["height"], width=encode["width"],
             max_sequence_length=encode["max_sequence_length"], output_type="np",
             generator=torch.Generator(device).manual_seed(0)).frames[0]
if device == "cuda":
    torch.cuda.synchronize()
export_to_mp4(video, f"{run}/sample.mp4", fps=16)
print(f"sample: {prompt!r} -> {video.shape} in {time.time() - start:.2f} s, {run}/sample.mp4")
EOF

stamp "loss curves"
$PY -m oneforcing.training.report "$RUN" --json "$RUN/curves.json"
echo "-- DMD-only ablation"
$PY -m oneforcing.training.report "$RUN/nogan" --json "$RUN/nogan/curves.json"
stamp "done"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$RUN/curves.json" "$OUT/curves.json"; cp "$RUN/nogan/curves.json" "$OUT/curves_nogan.json"
  cp "$RUN/sample.mp4" "$OUT/" 2>/dev/null || true
  for d in latents teacher ode_pairs ode_init distill nogan/distill; do
    mkdir -p "$OUT/logs/$d" && cp "$RUN/$d"/*.json* "$OUT/logs/$d/" 2>/dev/null || true
  done
fi
