#!/usr/bin/env bash
# The Show-Attend-Tell run reported in the README ("The attention decoder on Flickr8k"), on a CPU.
#
#   bash train/recipes/flickr8k_lite0_attention.sh                  # data at ../shared/data/flickr8k
#   DATA=/path/to/flickr8k WORK=runs/f8k-att EPOCHS_NOW=8 bash train/recipes/flickr8k_lite0_attention.sh
#
# The run is scheduled for 8 epochs (cosine learning rate over 8), but on the 2-core CPU it was cut
# after EPOCHS_NOW epochs by the session's deadline and the best epoch so far exported with
# `fit --resume --export-now`; `--resume` (same arguments) continues it later. Resuming is exact,
# so this script gives the same weights as the interrupted run.
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
WORK=${WORK:-runs/flickr8k-lite0-attention}
EPOCHS_NOW=${EPOCHS_NOW:-6}

# 1. Lite0 features with their 7x7x1280 grids (about 880 MB for 7,000 images), resumable
python -m train extract --dataset "$DATA" --backbone efficientnet_lite0 --grid --out "$WORK/features"

# 2. the attention decoder: LSTMCell 512, attention 512, embeddings 512, dropout 0.5, batch 128,
#    AdamW 1e-3 with warmup + cosine over 8 epochs, doubly stochastic weight 1, best epoch by greedy CIDEr-D
FIT=(--features "$WORK/features" --out "$WORK/fit" --decoder attention --epochs 8 --batch-size 128 --lr 1e-3
     --dropout 0.5 --patience 3 --progress off)
python -m train fit "${FIT[@]}" --resume --stop-after-epochs "$EPOCHS_NOW"  # leaves after EPOCHS_NOW epochs
python -m train fit "${FIT[@]}" --resume --export-now

# 3. validation figures (greedy, beam 3, beam 5) of the exported model
python -m train evaluate --model "$WORK/fit/model" --features "$WORK/features" --split validation \
  --beam 1 3 5 --out "$WORK/evaluation.json"
