python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The prepared GPU check of issue 9 (throughput with a floor), run from the repository root:
#     OUT=/some/folder bash benchmarks/perf/gpu_check.sh
# Parts, each under its own time limit, all within BUDGET seconds (default 460, under 8 minutes on an H100),
# each independent of the others (a failing or timed-out part leaves the rest running):
#   1 embedded models, fp32, batch 256: the three paths + batch scaling 1/8/64/256  -> $OUT/embedded_fp32.json
#   2 embedded models, bf16 autocast, batch 256: the three paths                     -> $OUT/embedded_bf16.json
#   3 paper scale, released GDM settings: ADM-256 + ResNet-50 (random), bf16 + channels_last, 16 images
#                                                                                    -> $OUT/paper_gdm_bf16.json
#   4 paper scale, DiT-XL/2 + SD-VAE + ResNet-50 (random), classifier-free guidance + DSG, bf16, 32 images
#                                                                                    -> $OUT/paper_dit_bf16.json
#   5 host-device synchronisations per batch at two depths (must not grow)           -> $OUT/sync_check.json
#   6 evaluate.py on the whole embedded benchmark, fp32 and bf16, and their AUROCs   -> $OUT/auroc_compare.json
#   then, while time is left: 7 the DiT path at batch 64, 8 the GDM path without channels_last;
#   last, benchmarks.perf.gpu_summary: one Markdown row per check with its target and verdict -> $OUT/summary.md
# Every throughput part also prints the floor (FLOPs of the model calls against the measured matmul rate).
# Everything is printed to stdout as well. CPU smoke test of the same script (tiny settings, a few minutes):
#     SMOKE=1 OUT=/tmp/gpu_check bash benchmarks/perf/gpu_check.sh
set -x
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
BUDGET=${BUDGET:-460}
PY=python3
if [ -n "${SMOKE:-}" ]; then
  DEV=cpu
  EMB="--images 4 --batch-size 4 --scaling 1,2 --scaling-images 2 --repeats 1 diffguard.num_steps=4 diffguard.depth=2"
  EMB_BF16="--images 4 --batch-size 4 --scaling none --repeats 1 diffguard.num_steps=4 diffguard.depth=2"
  EVAL="trainer.accelerator=cpu data.eval_batch_size=64 limit_per_set=4 diffguard.num_steps=4 diffguard.depth=2"
  PAPER="--tiny-arch --repeats 1 diffguard.num_steps=4 diffguard.depth=3"
  GDM_IMAGES=2; DIT_IMAGES=2; DIT_BIG=4
else
  DEV=cuda
  EMB="--batch-size 256 --images 256 --repeats 2 --scaling 1,8,64,256 --scaling-images 4"
  EMB_BF16="--batch-size 256 --images 256 --repeats 2 --scaling none"
  EVAL="trainer.accelerator=gpu data.eval_batch_size=256"
  PAPER="--repeats 1"
  GDM_IMAGES=16; DIT_IMAGES=32; DIT_BIG=64
fi

part() {  # part NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget runs out)
  local name=$1 limit=$2
  shift 2
  local remaining=$((BUDGET - SECONDS - 5))
  if [ "$limit" -gt "$remaining" ]; then limit=$remaining; fi
  if [ "$limit" -lt 10 ]; then
    echo "=== SKIP $name: ${SECONDS}s of ${BUDGET}s used"
    return 0
  fi
  echo "=== $name: limit ${limit}s, ${SECONDS}s elapsed"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || true
  echo "=== $name done at ${SECONDS}s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia_smi.log" || true
$PY -c "import torch, diffusers, timm, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee "$OUT/versions.log" || true

# 1-2: embedded models (checkpoints/digits), fp32 then bf16.
part embedded_fp32 80 $PY -m benchmarks.perf.throughput --device $DEV $EMB --json "$OUT/embedded_fp32.json"
part embedded_bf16 50 $PY -m benchmarks.perf.throughput --device $DEV $EMB_BF16 --json "$OUT/embedded_bf16.json" \
  diffguard.runtime.autocast=bf16

# 3-4: paper-scale architectures with random weights (no checkpoints needed).
part paper_gdm_bf16 140 $PY -m benchmarks.perf.throughput --paper-scale --device $DEV --paths gdm --images $GDM_IMAGES \
  $PAPER --json "$OUT/paper_gdm_bf16.json" diffguard.runtime.autocast=bf16 diffguard.runtime.channels_last=true
part paper_dit_bf16 60 $PY -m benchmarks.perf.throughput --paper-scale --device $DEV --paths classifier_free_dsg \
  --images $DIT_IMAGES $PAPER --json "$OUT/paper_dit_bf16.json" diffguard.runtime.autocast=bf16

part sync_check 40 $PY -m benchmarks.perf.sync_check --json "$OUT/sync_check.json"

# 6: the whole embedded benchmark through evaluate.py, fp32 and bf16, then their AUROCs side by side.
COMMON="$EVAL trainer.devices=1 trainer.enable_progress_bar=false callbacks.curves=false callbacks.reconstructions=0 \
callbacks.score_plots=false resume=false"
rm -rf "$OUT/auroc_fp32" "$OUT/auroc_bf16"
part auroc_fp32 45 $PY evaluate.py $COMMON output_dir="$OUT/auroc_fp32" diffguard.runtime.autocast=none
part auroc_bf16 45 $PY evaluate.py $COMMON output_dir="$OUT/auroc_bf16" diffguard.runtime.autocast=bf16
part auroc_compare 15 $PY -m benchmarks.perf.throughput --compare "$OUT/auroc_fp32" "$OUT/auroc_bf16" \
  --json "$OUT/auroc_compare.json"
rm -rf "$OUT"/auroc_*/shards || true

# 7-8: extras while time is left.
part paper_dit_bf16_b64 60 $PY -m benchmarks.perf.throughput --paper-scale --device $DEV --paths classifier_free_dsg \
  --images $DIT_BIG --batch-size $DIT_BIG $PAPER --json "$OUT/paper_dit_bf16_b64.json" diffguard.runtime.autocast=bf16
part paper_gdm_bf16_nocl 150 $PY -m benchmarks.perf.throughput --paper-scale --device $DEV --paths gdm \
  --images $GDM_IMAGES $PAPER --json "$OUT/paper_gdm_bf16_nocl.json" diffguard.runtime.autocast=bf16

ls -la "$OUT"
# The verdicts against the targets, from the JSON files above (also in $OUT/summary.md).
$PY -m benchmarks.perf.gpu_summary "$OUT" 2>&1 | tee "$OUT/summary.md" || true
echo "gpu_check finished in ${SECONDS}s"
