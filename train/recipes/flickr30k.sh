#!/usr/bin/env bash
# The real thing: the winning Flickr8k recipe on Flickr30k from the Hub with ResNet50 grids, scored on the
# Karpathy test split, and published as a model and a Space if you ask for it. On Flickr8k, attention beat the
# pooled decoder under cross-entropy (beam-3 CIDEr-D 0.484 vs 0.449) and SCST (AdamW 2e-4, up to 25 epochs)
# lifted the pooled model by 23% (to 0.554): this runs both, Show-Attend-Tell then SCST (README, "Results").
#
#   bash train/recipes/flickr30k.sh                    # train only: nothing is uploaded, no Hub login needed
#   bash train/recipes/flickr30k.sh HUB_USER --no-publish   # the same
#   hf auth login                                      # once, for publishing: a token with write access
#   bash train/recipes/flickr30k.sh HUB_USER           # train, then publish to HUB_USER
# A GPU machine with internet access (the data and the ResNet50 weights come from the Hub); what it costs:
# docs/training.md, "Train your own on Flickr30k".
#
# Steps:
#   1. extract  ResNet50 pooled features + 7x7x2048 grids of the 31,014 photos (float16, ~6.2 GB)
#   2. fit      the attention decoder with cross-entropy (best epoch by validation CIDEr-D)
#   3. scst     self-critical fine-tuning on CIDEr-D from fit's model
#   4. bundle   float16 weights + the recommended decoding (beam 3, alpha 1.0, trigram blocking, --bad-endings standard)
#   5. evaluate the bundle on the Karpathy test split (1,000 photos; greedy, beam 3, beam 5) into its card
#   6. publish  only with HUB_USER and without --no-publish: hub_upload.py, the model to HUB_USER/$MODEL_NAME
#               and the app to the Space HUB_USER/$SPACE_NAME
#
# Resuming: rerun the same command after a kill and it goes on where it stopped. extract skips its finished
# 1,024-photo chunks (and a finished cache altogether), fit and scst continue from their checkpoint.pt (a
# finished run only re-exports its best epoch), bundle and evaluate are redone (minutes), and publishing
# uploads again (the Hub makes a new commit only if files changed). Start over: delete $WORK.
#
# Everything is overridable from the environment, which is how tests/test_recipes.py runs this very
# script offline on a tiny local parquet with a random-weight backbone and UPLOAD_ARGS=--dry-run:
#   DATASET        Hub id, local parquet file/folder or imagefolder   (nlphuji/flickr30k)
#   REVISION       Hub revision of DATASET                            (refs/convert/parquet; "" for local data)
#   BACKBONE       backbone registry name                             (resnet50)
#   WORK           run folder, outside the repository                 (runs/flickr30k-$BACKBONE)
#   MODEL_NAME     model repo name                                    (storyteller-flickr30k-$BACKBONE-attention)
#   SPACE_NAME     Space name                                         (neural-storyteller)
#   EXTRACT_ARGS, FIT_ARGS, SCST_ARGS, EVAL_ARGS, UPLOAD_ARGS: extra arguments of each step
#   (e.g. FIT_ARGS="--feature-memory mmap" to memory-map the grids instead of holding them in memory)
set -euo pipefail
usage="usage: bash train/recipes/flickr30k.sh [HUB_USER] [--no-publish]   (HUB_USER: the Hugging Face user or organisation to publish to)"
HUB_USER="" PUBLISH=1
for arg in "$@"; do
  case "$arg" in
    --no-publish) PUBLISH=0 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) if [ -n "$HUB_USER" ]; then echo "$usage" >&2; exit 2; fi; HUB_USER=$arg ;;
  esac
done
if [ -z "$HUB_USER" ]; then PUBLISH=0; fi
DATASET=${DATASET:-nlphuji/flickr30k}
REVISION=${REVISION-refs/convert/parquet}
BACKBONE=${BACKBONE:-resnet50}
WORK=${WORK:-runs/flickr30k-$BACKBONE}
MODEL_NAME=${MODEL_NAME:-storyteller-flickr30k-$BACKBONE-attention}
SPACE_NAME=${SPACE_NAME:-neural-storyteller}
PY=${PYTHON:-python}
REV_ARGS=()
if [ -n "$REVISION" ]; then REV_ARGS=(--revision "$REVISION"); fi

echo "== 1/6 extract: $BACKBONE features and grids of $DATASET -> $WORK/features"
# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
$PY -m train extract --dataset "$DATASET" "${REV_ARGS[@]}" --backbone "$BACKBONE" --grid --out "$WORK/features" \
  ${EXTRACT_ARGS:-}

echo "== 2/6 fit: Show-Attend-Tell, cross-entropy -> $WORK/fit"
# shellcheck disable=SC2086
$PY -m train fit --features "$WORK/features" --out "$WORK/fit" --decoder attention --epochs 20 --batch-size 128 \
  --lr 1e-3 --dropout 0.5 --patience 3 --progress off --resume ${FIT_ARGS:-}

echo "== 3/6 scst: self-critical fine-tuning on CIDEr-D -> $WORK/scst"
# shellcheck disable=SC2086
$PY -m train scst --init "$WORK/fit/model" --features "$WORK/features" --out "$WORK/scst" --samples 5 \
  --baseline mean --reward cider:1 --batch-size 50 --lr 2e-4 --epochs 25 --patience 4 --bad-endings none \
  --progress off --resume ${SCST_ARGS:-}

echo "== 4/6 bundle -> $WORK/bundle"
rm -rf "$WORK/bundle"
$PY -m train bundle --model "$WORK/scst/model" --out "$WORK/bundle" --beam 3 --alpha 1.0 --no-repeat-ngram-size 3 \
  --bad-endings standard

echo "== 5/6 evaluate on the Karpathy test split -> $WORK/test.json and the bundle's card"
# shellcheck disable=SC2086
$PY -m train evaluate --model "$WORK/bundle" --features "$WORK/features" --split test --beam 1 3 5 --examples 5 \
  --seed 0 --out "$WORK/test.json" --report "$WORK/test.md" --write-to-model ${EVAL_ARGS:-}

if [ "$PUBLISH" = 0 ]; then
  why="no HUB_USER given"
  if [ -n "$HUB_USER" ]; then why="--no-publish"; fi
  echo "== 6/6 publish: skipped ($why); nothing was uploaded"
  echo "  model folder: $WORK/bundle (publish it later: bash $0 HUB_USER, or python hub_upload.py $WORK/bundle --repo-id ...)"
  echo "  test-split figures: $WORK/test.json (report $WORK/test.md)"
  exit 0
fi

echo "== 6/6 publish: model $HUB_USER/$MODEL_NAME, Space $HUB_USER/$SPACE_NAME"
# shellcheck disable=SC2086
$PY hub_upload.py "$WORK/bundle" --repo-id "$HUB_USER/$MODEL_NAME" --space-id "$HUB_USER/$SPACE_NAME" ${UPLOAD_ARGS:-}

case " ${UPLOAD_ARGS:-} " in
  *" --dry-run "*) echo "dry run: nothing was published; it would go to" ;;
  *) echo "published:" ;;
esac
echo "  model  https://huggingface.co/$HUB_USER/$MODEL_NAME"
echo "  Space  https://huggingface.co/spaces/$HUB_USER/$SPACE_NAME"
echo "  test-split figures: $WORK/test.json (report $WORK/test.md)"
