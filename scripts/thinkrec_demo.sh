#!/usr/bin/env bash
# ThinkRec end to end on CPU, on the synthetic world:
#   rec synth -> rec prepare -> rec train-cf (MF) -> stage 1 (2 ranks, ZeRO-3) -> rec eval (stage 1 and MF).
# The last line is a JSON object with both test AUCs. About 3-4 minutes on 2 quiet CPU cores.
#
# Usage: scripts/thinkrec_demo.sh [OUT_DIR]      (default: runs/thinkrec_demo; run from the repository root)
# Environment: STEPS (stage-1 optimizer steps, default 150: about half an epoch on 2 ranks), SEED (world, 0).
set -euo pipefail

OUT=${1:-runs/thinkrec_demo}
STEPS=${STEPS:-150}
SEED=${SEED:-0}
CONFIG=configs/thinkrec/demo.yaml
DATA=(data.train="$OUT/prep/train.parquet" data.eval="$OUT/prep/valid.parquet")

# A sparse world (1000 users with 5-20 ratings each, 1500 items) where the text carries signal MF struggles
# with: genre words in the titles (the hidden CF-only term is weak) and each user's rating leniency, which
# shows in the labels of the history the prompt lists (docs/thinkrec.md, "End to end").
distthink rec synth --out "$OUT/world" --users 1000 --items 1500 --min-per-user 5 --max-per-user 20 \
    --personas 0 --latent-scale 0.3 --user-bias 0.8 --seed "$SEED" --format parquet
distthink rec prepare --input "$OUT/world/interactions.parquet" --items "$OUT/world/items.parquet" \
    --out "$OUT/prep" --reasons template
distthink rec train-cf --data "$OUT/prep" --model mf --out "$OUT/cf_mf" --no-progress

accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m distthink.train --config "$CONFIG" \
    "${DATA[@]}" train.output_dir="$OUT/stage1" train.max_steps="$STEPS" logging.progress=false

distthink rec eval --config "$CONFIG" --export "$OUT/stage1/export" --split "$OUT/prep/test.parquet" \
    --cf "$OUT/cf_mf" --scores "$OUT/test_scores.parquet" "${DATA[@]}" | tee "$OUT/eval.jsonl"

python - "$OUT/eval.jsonl" <<'PY'
import json, sys
res = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
llm, cf = res["llm"], res["cf"]
print(f"test AUC: stage 1 {llm['auc']:.4f} vs MF {cf['auc']:.4f}   UAUC: {llm['uauc']:.4f} vs {cf['uauc']:.4f}")
print(json.dumps({"stage1_auc": llm["auc"], "mf_auc": cf["auc"], "stage1_uauc": llm["uauc"], "mf_uauc": cf["uauc"],
                  "n": llm["n"], "stage1_beats_mf": llm["auc"] > cf["auc"]}))
PY
