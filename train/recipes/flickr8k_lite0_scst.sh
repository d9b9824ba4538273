#!/usr/bin/env bash
# Fine-tune the bundled model models/flickr8k-lite0 with self-critical sequence training (SCST,
# CIDEr-D reward) on the Flickr8k training photos, on a CPU, and score it against the starting model.
#
#   bash train/recipes/flickr8k_lite0_scst.sh                    # data at ../shared/data/flickr8k
#   DATA=/path/to/flickr8k WORK=runs/f8k-scst bash train/recipes/flickr8k_lite0_scst.sh
#
# This is the run reported in the README ("Fine-tuning on CIDEr-D: SCST"): 2 epochs of 6,000 images,
# 5 samples per image, mean-of-others baseline, AdamW 2e-4, seed 0, one CPU thread (the machine's
# other core was busy). Validation (1,000 images) picks the epoch; it is the split the figures are on.
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
INIT=${INIT:-models/flickr8k-lite0}
FEATURES=${FEATURES:-runs/flickr8k-lite0/features}
WORK=${WORK:-runs/flickr8k-lite0-scst}
OUT=${OUT:-$WORK/bundle}
BAD_ENDINGS=a,an,the,of,with,in,on,at,to,and,his,her,their,its,is,are,while,for,from,by,near

# 1. pooled EfficientNet-Lite0 features: the same command as flickr8k_lite0.sh (nothing to do when it ran)
python -m train extract --dataset "$DATA" --backbone efficientnet_lite0 --out "$FEATURES"

# 2. SCST from the bundled model; validation with its own decoding (beam 3, alpha 0.5, trigram blocking)
python -m train scst --init "$INIT" --features "$FEATURES" --out "$WORK/scst" \
  --samples 5 --baseline mean --reward cider:1 --batch-size 50 --lr 2e-4 --epochs 2 --patience 1 --seed 0 \
  --bad-endings none --num-threads 1

# 3. ship it like the starting model: float16, beam 3, alpha 0.5, trigram blocking, and no caption
#    ending on a function word
rm -rf "$OUT"
python -m train bundle --model "$WORK/scst/model" --out "$OUT" --beam 3 --alpha 0.5 --no-repeat-ngram-size 3 \
  --bad-endings "$BAD_ENDINGS"

# 4. the README's table: both models on validation, greedy / beam 3 / beam 5, each at its own decoding
#    settings, and the SCST model without the bad-ending rule
python -m train evaluate --model "$INIT" --features "$FEATURES" --split validation --beam 1 3 5 \
  --out "$WORK/eval_xe.json"
python -m train evaluate --model "$OUT" --features "$FEATURES" --split validation --beam 1 3 5 \
  --out "$WORK/eval_scst.json"
python -m train evaluate --model "$OUT" --features "$FEATURES" --split validation --beam 1 3 5 --bad-endings none \
  --out "$WORK/eval_scst_no_rule.json"
