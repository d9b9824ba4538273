#!/usr/bin/env bash
# Reproduce models/flickr8k-lite0 (the pooled SCST run's starting point; shipped until 2026-12-02) from the real
# Flickr8k photos, on a CPU.
#
#   bash train/recipes/flickr8k_lite0.sh                      # data at ../shared/data/flickr8k
#   DATA=/path/to/flickr8k WORK=runs/f8k bash train/recipes/flickr8k_lite0.sh
#   BACKBONE=efficientnet_lite2 WORK=runs/flickr8k-lite2 OUT=models/flickr8k-lite2 bash train/recipes/flickr8k_lite0.sh
#
# DATA is an imagefolder with train/ and validation/ (metadata.jsonl lines {"file_name", "captions"}).
# Validation is used for early stopping / model selection and for the figures in the model card.
# Hyper-parameters come from the sweep recorded in the README ("The bundled model").
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
WORK=${WORK:-runs/flickr8k-lite0}
OUT=${OUT:-models/flickr8k-lite0}
BACKBONE=${BACKBONE:-efficientnet_lite0}  # any of `python -m train extract --help`'s --backbone choices

# 1. pooled $BACKBONE features (EfficientNet-Lite0 unless set; offline ImageNet weights), 7,000 images, resumable
python -m train extract --dataset "$DATA" --backbone "$BACKBONE" --out "$WORK/features"

# 2. the decoder: 2-layer LSTM 512, dropout 0.5, batch 64, AdamW 1e-3 with warmup + cosine,
#    best epoch by validation CIDEr-D (greedy), early stopping after 6 epochs without improvement
python -m train fit --features "$WORK/features" --out "$WORK/fit" \
  --num-layers 2 --embed-dim 512 --hidden-dim 512 --dropout 0.5 --min-freq 5 \
  --batch-size 64 --lr 1e-3 --epochs 25 --patience 6 --select cider --seed 0

# 3. ship it: float16 weights + recommended decoding (beam 3, alpha 0.5, trigram blocking)
rm -rf "$OUT"
python -m train bundle --model "$WORK/fit/model" --out "$OUT" --beam 3 --alpha 0.5 --no-repeat-ngram-size 3

# 4. figures of exactly what ships, into the bundle's evaluation.json and model card
python -m train evaluate --model "$OUT" --features "$WORK/features" --dataset "$DATA" --split validation \
  --beam 1 3 --alpha 0.5 --no-repeat-ngram-size 3 --examples 5 --seed 0 \
  --out "$WORK/evaluation.json" --report "$WORK/report.md" --write-to-model
