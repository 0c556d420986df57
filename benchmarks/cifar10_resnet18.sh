#!/usr/bin/env bash
# Reproduce the paper's CIFAR-10 result (ResNet-18 with the CIFAR stem, 128-d, NCE
# K=4096, kNN top-1 ~80 %) on one GPU, with the reference's CIFAR recipe: batch 128,
# lr 0.03, 200 epochs, x0.1 at epochs 80/120/160, tau 0.07, m 0.5.
#
#   bash benchmarks/cifar10_resnet18.sh                  # full 200 epochs
#   EPOCHS=20 OBJECTIVE=softmax bash benchmarks/cifar10_resnet18.sh
#
# ARCHIVE: the CIFAR-10 JPEG tarball (default ../shared/data/cifar10-jpeg.tar.gz);
# DATA: where it is extracted and sharded (default .data, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHIVE=${ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
DATA=${DATA:-.data}
EPOCHS=${EPOCHS:-200}
OBJECTIVE=${OBJECTIVE:-nce}          # nce | softmax
OUTPUT=${OUTPUT:-runs/cifar10-resnet18-${OBJECTIVE}}

mkdir -p "$DATA"
[ -d "$DATA/cifar10" ] || tar xzf "$ARCHIVE" -C "$DATA"
[ -f "$DATA/shards/cifar-train/dataset.json" ] ||
  python -m trainer.make_shards "$DATA/cifar10/train" "$DATA/shards/cifar-train" --split train
[ -f "$DATA/shards/cifar-test/dataset.json" ] ||
  python -m trainer.make_shards "$DATA/cifar10/test" "$DATA/shards/cifar-test" --split test

K=4096
[ "$OBJECTIVE" = softmax ] && K=0
python -m trainer.run \
  --data "$DATA/shards/cifar-train" --val-data "$DATA/shards/cifar-test" \
  --arch resnet18 --low-dim 128 --nce-k "$K" --nce-t 0.07 --nce-m 0.5 \
  --lr 0.03 --batch-size 128 --epochs "$EPOCHS" --schedule step \
  --num-workers 1 --num-shards 1 --use-gpu --loader-workers 8 \
  --eval-every 5 --checkpoint-every 5 --output "$OUTPUT"
python -m knn_service.show curves --metrics "$OUTPUT/metrics.jsonl" --out "$OUTPUT/curves.png"
