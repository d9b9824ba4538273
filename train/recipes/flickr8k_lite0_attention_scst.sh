#!/usr/bin/env bash
# SCST on the attention model: models/flickr8k-lite0-attention (Show-Attend-Tell over Lite0 7x7 grids,
# cross-entropy) fine-tuned on CIDEr-D with the settings that made the pooled SCST model (train/recipes/
# flickr8k_lite0_scst.sh), then scored. With XE_WEIGHT=0.2 it makes the attention member of the default
# ensemble (flickr8k_lite0_ensemble.sh averages its epochs).
#
#   bash train/recipes/flickr8k_lite0_attention_scst.sh              # data at ../shared/data/flickr8k
#   XE_WEIGHT=0.2 WORK=runs/att-scst-xe bash train/recipes/flickr8k_lite0_attention_scst.sh   # mixed objective
#
# Cost, measured 2026-12-02 on a 2-core AMX CPU at one thread (bf16 autocast; another job on the other core):
# 7-8 minutes an epoch of 6,000 photos x 5 samples plus about 2 minutes of validation; on a GPU the 25 epochs
# take minutes. Every step resumes: rerun after a kill, or with a larger EPOCHS to go on (scst --resume accepts
# more epochs, and --keep-epochs). Every epoch's weights are kept (--keep-epochs) for checkpoint averaging
# (python -m train average, docs/training.md). docs/results.md has what the runs gave.
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
INIT=${INIT:-models/flickr8k-lite0-attention}
FEATURES=${FEATURES:-runs/flickr8k-lite0-attention/features}
WORK=${WORK:-runs/flickr8k-lite0-attention-scst}
OUT=${OUT:-$WORK/bundle}
EPOCHS=${EPOCHS:-25}
XE_WEIGHT=${XE_WEIGHT:-0}  # > 0: add the cross-entropy of human captions (scst --xe-weight)

# 1. Lite0 features with grids: the same command as flickr8k_lite0_attention.sh (nothing to do when it ran)
python -m train extract --dataset "$DATA" --backbone efficientnet_lite0 --grid --out "$FEATURES"

# 2. SCST from the attention model; validation with its own decoding (beam 3, alpha 1.0, trigram blocking) and
#    the bad-ending rule it will ship with
python -m train scst --init "$INIT" --features "$FEATURES" --out "$WORK/scst" \
  --samples 5 --baseline mean --reward cider:1 --batch-size 50 --lr 2e-4 --xe-weight "$XE_WEIGHT" \
  --epochs "$EPOCHS" --patience 4 --seed 0 --bad-endings standard --keep-epochs --progress off --resume

# 3. bundle like the attention model (float16, beam 3, alpha 1.0, trigram blocking) with the bad-ending rule
rm -rf "$OUT"
python -m train bundle --model "$WORK/scst/model" --out "$OUT" --beam 3 --alpha 1.0 --no-repeat-ngram-size 3 \
  --bad-endings standard

# 4. figures of exactly what it ships
python -m train evaluate --model "$OUT" --features "$FEATURES" --dataset "$DATA" --split validation --beam 1 3 5 \
  --examples 5 --seed 0 --out "$WORK/eval_scst.json" --write-to-model
