#!/usr/bin/env bash
# One command for a lent GPU machine (no Ray, webdataset or FAISS there), done in <= 9 min:
#
#   bash benchmarks/device_check.sh OUTDIR               # the GPU: smoke + CIFAR-10 ResNet-18
#   bash benchmarks/device_check.sh --cpu --smoke OUTDIR # here: the same steps, small, on CPU
#
# (a) benchmarks/device_smoke.py: the bank's three objectives, a shard's statistics, the
#     torch kNN search and bf16 + channels_last + fused-SGD ResNet-18 steps on the device,
#     each against the CPU -> OUTDIR/smoke.json.
# (a2) benchmarks/bench_decode.py: JPEG decode + augment img/s, CPU against the GPU's batched
#     decode_jpeg -> OUTDIR/decode.json (at most 90 s).
# (b) NPID with the exact softmax through `trainer.run --launcher local` (no Ray): CIFAR-10,
#     ResNet-18 with the CIFAR stem, tau 0.07, m 0.5, batch 256, lr 0.06 cosine (the paper's
#     recipe at twice its batch, compressed to the epochs that fit TRAIN_SECONDS, measured
#     by a 2-epoch probe), the decoded data on the device, kNN every EVAL_EVERY epochs ->
#     OUTDIR/run/metrics.jsonl, OUTDIR/summary.{json,md} (images/s, epoch time, kNN curve),
#     OUTDIR/curves.png. --smoke trains the small encoder on the built-in digits instead.
#
# Environment: PYTHON (python3), ARCHIVE (the CIFAR-10 JPEG tarball: .data/cifar10-jpeg.tar.gz
# if present, else ../shared/data/cifar10-jpeg.tar.gz), DATA (.data/device), EPOCHS (auto),
# TRAIN_SECONDS (330), EVAL_EVERY (10), COMPILE (0; 1 adds --compile), ARCH (resnet18).
# Every step has its own timeout, so the whole script ends within LIMIT (530 s).
# Exit status: non-zero when a smoke check or the training run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash benchmarks/device_check.sh [--cpu] [--smoke] OUTDIR" >&2; exit 2; }
CPU=0 SMOKE=0 OUT=""
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --smoke) SMOKE=1 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage
mkdir -p "$OUT" || { echo "device_check: cannot create $OUT" >&2; exit 2; }

PY=${PYTHON:-python3}
if [ -z "${ARCHIVE:-}" ]; then
  ARCHIVE=.data/cifar10-jpeg.tar.gz
  [ -f "$ARCHIVE" ] || ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
fi
DATA=${DATA:-.data/device}
EPOCHS=${EPOCHS:-auto}
TRAIN_SECONDS=${TRAIN_SECONDS:-330}
EVAL_EVERY=${EVAL_EVERY:-10}
LIMIT=530   # seconds: the whole script stays under 9 minutes
THREADS=$(nproc 2>/dev/null || echo 2)
export NPID_CACHE_DIR=${NPID_CACHE_DIR:-$DATA/cache}
log() { echo "device_check [${SECONDS}s]: $*" | tee -a "$OUT/device_check.log"; }

DEVICE=cuda GPU=(--use-gpu) SMALL=()
[ "$CPU" = 1 ] && DEVICE=cpu GPU=()
[ "$SMOKE" = 1 ] && SMALL=(--small)
log "device $DEVICE, smoke $SMOKE, python $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"

if [ "$SMOKE" = 0 ] && [ ! -f "$ARCHIVE" ]; then  # before the smoke: say so at once
  log "no CIFAR-10 archive at $ARCHIVE (set ARCHIVE, or use --smoke)"
  exit 2
fi

# ---- (a) smoke of the device paths
timeout 240 $PY benchmarks/device_smoke.py --device "$DEVICE" "${SMALL[@]}" \
  --out "$OUT/smoke.json" >"$OUT/smoke.log" 2>&1
smoke_rc=$?
grep -E "^device_smoke: (ok|FAIL)" "$OUT/smoke.log" | tee -a "$OUT/device_check.log"
log "smoke exit $smoke_rc"

# ---- (a2) JPEG decode + augment: the CPU paths and the GPU path (--decode gpu)
DECODE_IMAGES=2000
[ "$SMOKE" = 1 ] && DECODE_IMAGES=64
timeout 90 $PY -m benchmarks.bench_decode --images "$DECODE_IMAGES" --repeats 3 \
  --json "$OUT/decode.json" >"$OUT/decode.log" 2>&1 || log "bench_decode failed (see decode.log)"
grep -E "^(pil|cpu-batched|gpu) " "$OUT/decode.log" | tee -a "$OUT/device_check.log"

# ---- (b) training through the local launcher
if [ "$SMOKE" = 1 ]; then
  DATA_ARGS=(--data digits) NUM_IMAGES=1437
  RECIPE=(--arch small --epochs 20 --eval-every 5)
else
  mkdir -p "$DATA"
  [ -d "$DATA/cifar10/train" ] || tar xzf "$ARCHIVE" -C "$DATA"
  for split in train test; do
    [ -f "$DATA/shards/$split/dataset.json" ] ||
      timeout 120 $PY -m trainer.make_shards "$DATA/cifar10/$split" "$DATA/shards/$split" --split "$split" \
        --threads "$THREADS" >>"$OUT/device_check.log" 2>&1 || { log "make_shards $split failed"; exit 1; }
  done
  log "shards ready"
  DATA_ARGS=(--data "$DATA/shards/train" --val-data "$DATA/shards/test") NUM_IMAGES=50000
  RECIPE=(--arch "${ARCH:-resnet18}" --objective softmax --nce-t 0.07 --nce-m 0.5 --batch-size 256
    --lr 0.06 --schedule cosine --data-cache "$([ "$CPU" = 1 ] && echo memory || echo device)")
  if [ "$EPOCHS" = auto ]; then
    timeout 120 $PY -m trainer.run --launcher local "${GPU[@]}" "${DATA_ARGS[@]}" "${RECIPE[@]}" \
      --epochs 2 --eval-every 0 --loader-workers "$THREADS" --no-progress \
      --output "$OUT/probe" >"$OUT/probe.log" 2>&1 || { log "probe run failed (see probe.log)"; exit 1; }
    EPOCHS=$($PY benchmarks/device_summary.py --metrics "$OUT/probe/metrics.jsonl" \
      --fit-seconds "$TRAIN_SECONDS" --num-images "$NUM_IMAGES")
    log "probe: $(tail -n 1 "$OUT/probe/metrics.jsonl"); $EPOCHS epochs fit ${TRAIN_SECONDS}s"
  fi
  RECIPE+=(--epochs "$EPOCHS" --eval-every "$EVAL_EVERY")
fi
[ "${COMPILE:-0}" = 1 ] && RECIPE+=(--compile)

left=$((LIMIT - SECONDS - 15))
if [ "$left" -lt 30 ]; then
  log "no time left to train (${left}s): stopping at $SECONDS s"
  exit 1
fi
log "training: ${RECIPE[*]} (at most ${left}s)"
timeout "$left" $PY -m trainer.run --launcher local "${GPU[@]}" "${DATA_ARGS[@]}" "${RECIPE[@]}" \
  --loader-workers "$THREADS" --checkpoint-every 1000 --no-progress --output "$OUT/run" \
  >"$OUT/run.log" 2>&1
train_rc=$?
log "training exit $train_rc"
if [ -f "$OUT/run/metrics.jsonl" ]; then
  $PY benchmarks/device_summary.py --metrics "$OUT/run/metrics.jsonl" --out "$OUT/summary.json" \
    --num-images "$NUM_IMAGES" >"$OUT/summary.md"
  cat "$OUT/summary.md" | tee -a "$OUT/device_check.log"
  $PY -m knn_service.show curves --metrics "$OUT/run/metrics.jsonl" --out "$OUT/curves.png" \
    >>"$OUT/device_check.log" 2>&1 || log "no curves.png"
fi
log "done: smoke exit $smoke_rc, training exit $train_rc"
[ "$smoke_rc" = 0 ] && [ "$train_rc" = 0 ]
