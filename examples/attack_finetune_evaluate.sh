#!/usr/bin/env bash
# Attack -> fine-tune -> evaluate on clipguard's synthetic world, with the bundled victim model.
#
#   examples/attack_finetune_evaluate.sh [WORKDIR]
#
# 1. writes the synthetic world (train / test / reference shards, keywords.json);
# 2. poisons `train` with Attack II (sheep texts -> aeroplane images) and Attack I (sheep texts ->
#    one aeroplane image), φ = 0.5% each;
# 3. fine-tunes the bundled victim on clean and on each poisoned train set, same settings;
# 4. evaluates all three on `test`: goal Hit@K / MinRank against the clean fine-tune, utility,
#    encoder drift. Reports land in WORKDIR/*.json.
#
# Fine-tune settings: the demo's victim recipe, i.e. the paper's (AdamW, wd 0.2, cosine decay to
# lr/10) at lr 1e-3, batch 32, 8 epochs for the tiny victim (docs/results.md has the figures and
# the settings under which the poisons did not take hold); override with LR / BATCH / EPOCHS.
# About 12 minutes on 2 CPU cores (three fine-tunes, one after the other).
set -euo pipefail

WORK=${1:-clipguard-attack-demo}
LR=${LR:-1e-3}
BATCH=${BATCH:-32}
EPOCHS=${EPOCHS:-8}
RATE=${RATE:-0.005}
TRAIN_IMAGES=${TRAIN_IMAGES:-2000}
GOAL=sheep:aeroplane
export HF_HUB_OFFLINE=1

mkdir -p "$WORK"
python - "$WORK/world" "$TRAIN_IMAGES" <<'EOF'
import sys
from clipguard.synth import WorldSpec, generate_world
spec = WorldSpec(seed=0, train_images=int(sys.argv[2]), reference_images=1)
info = generate_world(sys.argv[1], spec, overwrite=True)
print("world:", info.shards("train"), info.shards("test"))
EOF

clipguard attack single-label "$WORK/world/train" --out "$WORK/attack2" --goal "$GOAL" --rate "$RATE" --seed 0 --overwrite
clipguard attack single-image "$WORK/world/train" --out "$WORK/attack1" --goal "$GOAL" --rate "$RATE" --seed 0 --overwrite

for run in clean attack2 attack1; do
  data="$WORK/$run"
  [ "$run" = clean ] && data="$WORK/world/train"
  clipguard finetune clipguard-victim --data "$data" --out "$WORK/$run.safetensors" \
    --lr "$LR" --min-lr "$(python -c "print($LR / 10)")" --batch-size "$BATCH" --epochs "$EPOCHS" \
    --weight-decay 0.2 --precision bf16 --seed 0
done

clipguard evaluate "$WORK/attack2.safetensors" --test "$WORK/world/test" \
  --manifest "$WORK/attack2/poison_manifest.json" --baseline "$WORK/clean.safetensors" \
  --json "$WORK/eval_attack2.json"
clipguard evaluate "$WORK/attack1.safetensors" --test "$WORK/world/test" \
  --manifest "$WORK/attack1/poison_manifest.json" --baseline "$WORK/clean.safetensors" \
  --json "$WORK/eval_attack1.json"
