#!/usr/bin/env bash
# Reproduce models/flickr8k-lite0-attention (Show-Attend-Tell over Lite0 grids) from the real Flickr8k
# photos, on a CPU (about 6 minutes an epoch on a quiet 2-core machine; README, "The attention decoder").
#
#   bash train/recipes/flickr8k_lite0_attention.sh                  # data at ../shared/data/flickr8k
#   DATA=/path/to/flickr8k WORK=runs/f8k-att bash train/recipes/flickr8k_lite0_attention.sh
#
# Every step resumes: rerun the script after a kill (fit continues from its checkpoint, exactly).
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
WORK=${WORK:-runs/flickr8k-lite0-attention}
OUT=${OUT:-models/flickr8k-lite0-attention}

# 1. Lite0 features with their 7x7x1280 grids (about 880 MB for 7,000 images), resumable
python -m train extract --dataset "$DATA" --backbone efficientnet_lite0 --grid --out "$WORK/features"

# 2. the attention decoder: LSTMCell 512, attention 512, embeddings 512, dropout 0.5, batch 128,
#    AdamW 1e-3 with warmup + cosine over 8 epochs, doubly stochastic weight 1, best epoch by greedy CIDEr-D
python -m train fit --features "$WORK/features" --out "$WORK/fit" --decoder attention --epochs 8 --batch-size 128 \
  --lr 1e-3 --dropout 0.5 --patience 3 --progress off --resume

# 3. ship it: float16 weights + recommended decoding (beam 3, alpha 1.0, trigram blocking; picked on validation)
rm -rf "$OUT"
python -m train bundle --model "$WORK/fit/model" --out "$OUT" --beam 3 --alpha 1.0 --no-repeat-ngram-size 3

# 4. figures of exactly what ships, into the bundle's evaluation.json and model card
python -m train evaluate --model "$OUT" --features "$WORK/features" --dataset "$DATA" --split validation \
  --beam 1 3 5 --alpha 1.0 --no-repeat-ngram-size 3 --examples 5 --seed 0 \
  --out "$WORK/evaluation.json" --report "$WORK/report.md" --write-to-model
