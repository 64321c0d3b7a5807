#!/usr/bin/env bash
# ThinkRec end to end on CPU, every stage, on the synthetic world of scripts/thinkrec_demo.sh:
#   rec synth -> rec prepare -> rec train-cf (MF) -> stage 1 (text, demo.yaml) -> stage 2 (ids + projector,
#   demo_stage2.yaml) -> rec group -> stage 3 (MoLoRA experts, demo_stage3.yaml) -> rec eval (each stage; stage 3
#   with --fusion) -> rec explain (stage 3, entropy-gated fusion).
# Prints one table (test AUC / UAUC of MF, stage 1, stage 2, stage 3 fusion / global / hard, the gate's branch
# counts, rec explain's figures); the last line is the same as a JSON object.
#
# Usage: scripts/thinkrec_demo_full.sh [OUT_DIR]     (default runs/thinkrec_demo_full; from the repository root)
# Environment: QUICK=1 (CI: a 300-user world, 40/20/20 steps, one process, 200 test rows, 8 explained rows;
# about 3 minutes on 2 quiet cores) or the full run (the 1000-user world, 150/100/100 steps on 2 ranks under
# ZeRO-3, the whole test split, 64 explained rows; see docs/thinkrec.md for its time and figures).
# STEPS1/STEPS2/STEPS3, NPROC, LIMIT (test rows scored; 0 = all), EXPLAIN (rows explained), SEED override either.
set -euo pipefail

OUT=${1:-runs/thinkrec_demo_full}
SEED=${SEED:-0}
if [ "${QUICK:-0}" = "1" ]; then
    USERS=300; ITEMS=450; D_STEPS1=40; D_STEPS2=20; D_STEPS3=20; D_NPROC=1; D_LIMIT=200; D_EXPLAIN=8
else
    USERS=1000; ITEMS=1500; D_STEPS1=150; D_STEPS2=100; D_STEPS3=100; D_NPROC=2; D_LIMIT=0; D_EXPLAIN=64
fi
STEPS1=${STEPS1:-$D_STEPS1}; STEPS2=${STEPS2:-$D_STEPS2}; STEPS3=${STEPS3:-$D_STEPS3}
NPROC=${NPROC:-$D_NPROC}; LIMIT=${LIMIT:-$D_LIMIT}; EXPLAIN=${EXPLAIN:-$D_EXPLAIN}
PREP="$OUT/prep"
DATA=(data.train="$PREP/train.parquet" data.eval="$PREP/valid.parquet")
EVAL=(--split "$PREP/test.parquet" --batch-size 16)
if [ "$LIMIT" != "0" ]; then EVAL+=(--limit "$LIMIT"); fi

train() {  # train CONFIG OVERRIDES...: 2 ranks under ZeRO-3 (the configs' default), or one plain process
    local config=$1
    shift
    if [ "$NPROC" -gt 1 ]; then
        accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m distthink.train --config "$config" \
            "$@" logging.progress=false
    else
        python -m distthink.train --config "$config" "$@" distributed.deepspeed=null logging.progress=false
    fi
}

# The world of scripts/thinkrec_demo.sh: sparse users whose leniency shows in the history labels, genre words in
# the titles, a weak hidden CF term (docs/thinkrec.md, "End to end").
distthink rec synth --out "$OUT/world" --users "$USERS" --items "$ITEMS" --min-per-user 5 --max-per-user 20 \
    --personas 0 --latent-scale 0.3 --user-bias 0.8 --seed "$SEED" --format parquet
distthink rec prepare --input "$OUT/world/interactions.parquet" --items "$OUT/world/items.parquet" \
    --out "$PREP" --reasons template
distthink rec train-cf --data "$PREP" --model mf --out "$OUT/cf_mf" --no-progress

# Stage 1: text prompts, reasoning mixed in (full fine-tuning of the random-init tiny model: demo.yaml says why).
train configs/thinkrec/demo.yaml "${DATA[@]}" train.output_dir="$OUT/stage1" train.max_steps="$STEPS1"
distthink rec eval --config configs/thinkrec/demo.yaml --export "$OUT/stage1/export" "${EVAL[@]}" \
    --cf "$OUT/cf_mf" "${DATA[@]}" | tee "$OUT/eval_stage1.txt"

# Stage 2: id prompts; the projector maps the MF vectors into the prompt (the stage-1 model stays as it is).
S2=(model.name_or_path="$OUT/stage1/export" task.options.cf_export="$OUT/cf_mf" "${DATA[@]}")
train configs/thinkrec/demo_stage2.yaml "${S2[@]}" train.output_dir="$OUT/stage2" train.max_steps="$STEPS2"
distthink rec eval --config configs/thinkrec/demo_stage2.yaml --export "$OUT/stage2/export" "${EVAL[@]}" \
    "${S2[@]}" | tee "$OUT/eval_stage2.txt"

# User groups on the MF user vectors (K by silhouette over 2..10), then one expert per group + the global adapter.
distthink rec group --cf "$OUT/cf_mf" --out "$OUT/groups" --data "$PREP" --no-plots
S3=(model.name_or_path="$OUT/stage1/export" task.options.cf_export="$OUT/cf_mf"
    task.options.init_projector="$OUT/stage2/export" task.options.molora.groups_dir="$OUT/groups"
    task.options.molora.init_adapter="$OUT/stage2/export" "${DATA[@]}")
train configs/thinkrec/demo_stage3.yaml "${S3[@]}" train.output_dir="$OUT/stage3" train.max_steps="$STEPS3"
distthink rec eval --config configs/thinkrec/demo_stage3.yaml --export "$OUT/stage3/export" "${EVAL[@]}" --fusion \
    "${S3[@]}" | tee "$OUT/eval_stage3.txt"
distthink rec explain --config configs/thinkrec/demo_stage3.yaml --export "$OUT/stage3/export" \
    --split "$PREP/test.parquet" --limit "$EXPLAIN" --out "$OUT/explain.jsonl" --metrics "$OUT/explain_metrics.json" \
    --max-new-tokens 48 "${S3[@]}" > /dev/null

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
last = lambda name: json.loads([ln for ln in open(f"{out}/{name}") if ln.startswith("{")][-1])
s1, s2, s3 = last("eval_stage1.txt"), last("eval_stage2.txt"), last("eval_stage3.txt")
ex = json.load(open(f"{out}/explain_metrics.json"))
rows = [("MF (rec train-cf)", s1["cf"]), ("stage 1 (text)", s1["llm"]), ("stage 2 (ids + projector)", s2["llm"]),
        ("stage 3 fusion (entropy gate)", s3["llm_fusion"]), ("stage 3 global adapter", s3["llm_global"]),
        ("stage 3 hard (group expert)", s3["llm_hard"])]
print(f"{'scorer':32s} {'test AUC':>9s} {'UAUC':>7s}  rows")
for name, m in rows:
    print(f"{name:32s} {m['auc']:9.4f} {m['uauc']:7.4f}  {m['n']}")
bc = s3["branch_counts"]
print("gate branches (rec eval --fusion): " + ", ".join(f"{k} {v}" for k, v in bc.items()))
fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
print(f"rec explain ({ex['rows']} rows): verdict agreement {fmt(ex['verdict_agreement'])} over "
      f"{ex['verdict_parsed']} parsed, rows with a reason {ex['with_reason']}, BLEU-4 {fmt(ex.get('bleu4'))}, "
      f"ROUGE-L {fmt(ex.get('rouge_l'))}, METEOR {fmt(ex.get('meteor_nosyn'))} ({ex['reason_pairs']} reason pairs)")
print(json.dumps({"mf": s1["cf"]["auc"], "stage1": s1["llm"]["auc"], "stage2": s2["llm"]["auc"],
                  "stage3_fusion": s3["llm_fusion"]["auc"], "stage3_global": s3["llm_global"]["auc"],
                  "stage3_hard": s3["llm_hard"]["auc"], "uauc": {n: m["uauc"] for n, m in rows},
                  "n": s1["llm"]["n"], "branch_counts": bc, "explain": ex}))
PY
