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
# Fine-tune settings: the paper's recipe (AdamW, wd 0.2, cosine to lr/10, 10 epochs) with the
# a higher learning rate and smaller batch for the tiny victim (docs/results.md says how weak the
# attack still is on it); override with LR / BATCH / EPOCHS in the environment.
set -euo pipefail

WORK=${1:-clipguard-attack-demo}
LR=${LR:-3e-4}
BATCH=${BATCH:-32}
EPOCHS=${EPOCHS:-5}
RATE=${RATE:-0.005}
GOAL=sheep:aeroplane
export HF_HUB_OFFLINE=1

mkdir -p "$WORK"
python - "$WORK/world" <<'EOF'
import sys
from clipguard.synth import WorldSpec, generate_world
info = generate_world(sys.argv[1], WorldSpec(train_images=500, reference_images=1, shard_size=250), overwrite=True)
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

clipguard evaluate "$WORK/clean.safetensors" --test "$WORK/world/test" --goal "$GOAL" \
  --json "$WORK/eval_clean.json"
clipguard evaluate "$WORK/attack2.safetensors" --test "$WORK/world/test" \
  --manifest "$WORK/attack2/poison_manifest.json" --baseline "$WORK/clean.safetensors" \
  --json "$WORK/eval_attack2.json"
clipguard evaluate "$WORK/attack1.safetensors" --test "$WORK/world/test" \
  --manifest "$WORK/attack1/poison_manifest.json" --baseline "$WORK/clean.safetensors" \
  --json "$WORK/eval_attack1.json"
