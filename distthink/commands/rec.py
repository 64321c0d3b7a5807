"""`distthink rec ...`: recommendation data and collaborative encoders for the ThinkRec recipe.

The text users see is DESCRIPTION and each option's help. Each action is a small function taking the parsed
args; heavy imports happen inside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_PICKLE_HELP = ("allow --format pickle. Unpickling executes arbitrary code embedded in the file, so only use "
                "it on files you created yourself or fully trust; prefer converting them to Parquet/CSV")


DESCRIPTION = """\
Recommendation data, collaborative-filtering encoders and user groups for the ThinkRec recipe
(docs/thinkrec.md). A typical pipeline:

  distthink rec synth      --out data/synth --format parquet        # or real data: MovieLens, Amazon, Yelp, CSV
  distthink rec prepare    --input data/synth/interactions.parquet --items data/synth/items.parquet \\
                           --out data/prep --reasons template
  distthink rec train-cf   --data data/prep --model mf --out runs/cf_mf    # or lightgcn, sasrec, dcn, din
  distthink rec group      --cf runs/cf_mf --out runs/groups --data data/prep
  distthink rec eval       --config STAGE.yaml --export RUN/export --split data/prep/test.parquet
  distthink rec explain    --config STAGE.yaml --export RUN/export --split data/prep/test.parquet --out why.jsonl
  distthink rec synthesize --split data/prep/train.parquet --out reasons.jsonl    # needs a teacher endpoint

`distthink rec ACTION --help` explains the options of each action."""


def register(subparsers) -> None:
    p = subparsers.add_parser("rec", help="recommendation data, CF encoders and user groups (ThinkRec)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="rec_command", metavar="ACTION")

    s = sub.add_parser("synth", help="write the synthetic movie world (generic CSV/Parquet + ground truth)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--users", type=int, default=300, help="number of users (default 300)")
    s.add_argument("--items", type=int, default=200, help="number of movies (default 200)")
    s.add_argument("--min-per-user", type=int, default=20,
                   help="fewest ratings a user gives (default 20; each user draws a count in min..max)")
    s.add_argument("--max-per-user", type=int, default=60,
                   help="most ratings a user gives (default 60; at most --items)")
    s.add_argument("--personas", type=int, default=4, help="planted user taste groups (0: every user independent)")
    s.add_argument("--latent-scale", type=float, default=1.0, help="strength of the hidden CF-only term")
    s.add_argument("--user-bias", type=float, default=0.0,
                   help="std of a per-user rating leniency (0: none); it shows in the labels of a user's history")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed and sizes give the same world")
    s.add_argument("--format", choices=("csv", "parquet"), default="csv",
                   help="file format of the written tables (default csv)")
    s.set_defaults(func=_synth)

    s = sub.add_parser("prepare", help="labels, chronological splits, histories, cold flags, id maps")
    s.add_argument("--input", required=True, help="ml-1m folder (movielens) or the interactions/reviews file; "
                   "'synthetic' generates the default synthetic world in memory (see `rec synth` for sizes)")
    s.add_argument("--format", default="generic", choices=("movielens", "amazon", "yelp", "generic", "pickle"),
                   help="input format (default generic CSV/Parquet)")
    s.add_argument("--items", default=None, help="item metadata file (generic items CSV/Parquet, Amazon meta "
                   "JSON lines, Yelp business.json)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--threshold", type=float, default=4.0, help="label = rating >= threshold (default 4)")
    s.add_argument("--history-len", type=int, default=10, help="history items per sample (default 10)")
    s.add_argument("--train-frac", type=float, default=0.8,
                   help="share of the log, in time order over all users, that goes to train (default 0.8)")
    s.add_argument("--valid-frac", type=float, default=0.1,
                   help="share that goes to valid after train (default 0.1); the rest is test")
    s.add_argument("--reasons", choices=("none", "template"), default="none",
                   help="template: add a 'reason' column from item genres (synthetic/ML-1M style data)")
    s.add_argument("--output-format", choices=("parquet", "jsonl"), default="parquet",
                   help="file format of the written splits (default parquet)")
    s.add_argument("--trust-pickle", action="store_true", help=_PICKLE_HELP)
    s.add_argument("--seed", type=int, default=0, help="seed for --input synthetic")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train-cf", help="train MF / LightGCN / SASRec / DCN / DIN and export embeddings (safetensors)")
    s.add_argument("--data", required=True, help="folder written by `distthink rec prepare`")
    s.add_argument("--model", choices=("mf", "lightgcn", "sasrec", "dcn", "din"), default="mf",
                   help="mf: matrix factorisation; lightgcn: graph propagation over the user-item graph; sasrec: "
                        "self-attention over the user's history; dcn / din: target-aware, a row's user vector "
                        "encodes (user, target, last history items) (default mf)")
    s.add_argument("--out", required=True, help="export folder")
    s.add_argument("--dim", type=int, default=64, help="embedding size of users and items (default 64)")
    s.add_argument("--layers", type=int, default=2, help="LightGCN propagation layers / SASRec blocks / DCN cross "
                   "layers")
    s.add_argument("--lr", type=float, default=None, help="default: mf/lightgcn 5e-2, sasrec/dcn/din 3e-3")
    s.add_argument("--weight-decay", type=float, default=1e-2,
                   help="MF/LightGCN: L2 on the batch rows; SASRec/DCN/DIN: AdamW decay")
    s.add_argument("--batch-size", type=int, default=512, help="training rows per step (default 512)")
    s.add_argument("--epochs", type=int, default=50, help="maximum epochs")
    s.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a valid-AUC gain")
    s.add_argument("--seed", type=int, default=0, help="random seed of initialisation and shuffling (default 0)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_train_cf)

    s = sub.add_parser("group", help="K-means / ward user groups on standardised CF user vectors")
    s.add_argument("--cf", required=True, help="export folder of `distthink rec train-cf`, or .npz shards "
                   "(user_ids, user_emb) keyed by the prepared user ids")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-groups", default="auto", help="'auto' (k in --k-min..--k-max by silhouette) or an integer")
    s.add_argument("--k-min", type=int, default=2, help="fewest groups tried by --n-groups auto (default 2)")
    s.add_argument("--k-max", type=int, default=10, help="most groups tried by --n-groups auto (default 10)")
    s.add_argument("--method", choices=("kmeans", "ward"), default="kmeans",
                   help="ward (agglomerative) is O(n^2) memory: small user sets only")
    s.add_argument("--sample", type=int, default=10000, help="users sampled (seeded) for the silhouette score")
    s.add_argument("--space", choices=("standardised", "raw"), default="standardised",
                   help="clustering space: per-dimension standardised CF vectors (default) or the raw vectors "
                   "(ThinkRec). Both centroid sets are saved: the gate's space is task.options.molora.gate_space")
    s.add_argument("--data", default=None, help="prepared folder: also write per-group train/valid/test splits")
    s.add_argument("--include-cold-users", action="store_true",
                   help="also fit on users without train interactions (by default they are only assigned to "
                   "the nearest centroid, since their CF vectors are untrained)")
    s.add_argument("--seed", type=int, default=0, help="random seed of K-means and of the sampled users (default 0)")
    s.add_argument("--no-plots", action="store_true",
                   help="do not write user_map.png (users in 2-D, coloured by group) and silhouette.png")
    s.set_defaults(func=_group)

    s = sub.add_parser("eval", help="score a ThinkRec LLM export on a split: AUC/UAUC/HR/NDCG/MAP, scores to Parquet")
    s.add_argument("--config", required=True, help="the stage's YAML config (task.options, model)")
    s.add_argument("--export", default=None, help="adapter export folder of the stage (train.output_dir/export)")
    s.add_argument("--split", required=True, help="prepared split file, e.g. PREP/test.parquet")
    s.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    s.add_argument("--scores", default=None, help="write per-sample scores to this Parquet file")
    s.add_argument("--cf", default=None, help="a `rec train-cf` export (or .npz shards, or `inline`): also report "
                   "its metrics on the same rows (SASRec/DCN/DIN score each row with its encoder)")
    s.add_argument("--projector", default=None, help="prompt_mode=ids stages: a training checkpoint's "
                   "model.safetensors holding the trained projector (not needed with --export of the stage: the "
                   "export holds projector.safetensors)")
    s.add_argument("--batch-size", type=int, default=8, help="prompts scored together (default 8)")
    s.add_argument("--fusion", action="store_true", help="--export is a stage-3 export (export/ + export/molora): "
                   "report entropy-gated fusion, global-adapter-only and hard-routing-only metrics + gate branches")
    s.add_argument("overrides", nargs="*", help="dotted config overrides")
    s.set_defaults(func=_eval)
    s = sub.add_parser("explain", help="generate each row's verdict and reason with a trained stage (JSONL + metrics)",
                       description="For each (user, item) row of --split, continue the stage's prompt (CF vectors "
                       "injected; a stage-3 export's experts mixed per row by its gate) and write the verdict, the "
                       "reason, the Yes-probability of the scored verdict and the gate's branch/weights to --out. "
                       "Prints verdict agreement (generated vs scored) and BLEU-4 / ROUGE-L / METEOR of the reasons "
                       "against the rows' reference reasons. Under torchrun every rank takes a share; with a ZeRO-3 "
                       "distributed.deepspeed JSON the model is partitioned and the ranks generate in lockstep.")
    s.add_argument("--config", required=True, help="the stage's YAML config (task.options, model)")
    s.add_argument("--export", required=True, help="the stage's export folder (train.output_dir/export); a stage-3 "
                   "export (export/molora) mixes its experts by --mode")
    s.add_argument("--split", required=True, help="prepared split file, e.g. PREP/test.parquet")
    s.add_argument("--out", required=True, help="JSONL of the records (rank 0 writes it, in split order)")
    s.add_argument("--mode", choices=("fusion", "global", "hard"), default="fusion",
                   help="stage 3: the entropy gate of molora.json (fusion), the global adapter (global), or one-hot "
                   "by the group table (hard)")
    s.add_argument("--limit", type=int, default=None, help="the first N rows only")
    s.add_argument("--sample", action="store_true", help="sample (default greedy)")
    s.add_argument("--temperature", type=float, default=1.0, help="with --sample: softmax temperature (default 1.0)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="with --sample: keep the smallest set of tokens whose probability reaches P (default 1.0)")
    s.add_argument("--top-k", type=int, default=0,
                   help="with --sample: only the K most likely tokens (default 0 = no limit)")
    s.add_argument("--max-new-tokens", type=int, default=64,
                   help="most tokens generated per row: the verdict and its reason (default 64)")
    s.add_argument("--min-new-tokens", type=int, default=0, help="forbid the end of turn before this many tokens "
                   "(e.g. 3 to ask for a reason after the verdict from a model trained mostly on label-only answers)")
    s.add_argument("--batch-size", type=int, default=8,
                   help="rows generated together (default 8); lower it if memory runs out")
    s.add_argument("--seed", type=int, default=0, help="random seed of --sample (one stream per rank; default 0)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (ZeRO-3 runs use DeepSpeed's device)")
    s.add_argument("--projector", default=None, help="as rec eval: a checkpoint's model.safetensors with the projector")
    s.add_argument("--metrics", default=None, help="also write the metrics JSON to this file")
    s.add_argument("overrides", nargs="*", help="dotted config overrides")
    s.set_defaults(func=_explain)

    s = sub.add_parser("synthesize", help="ask a teacher (OpenAI-compatible endpoint) for reasoning traces")
    s.add_argument("--split", required=True, help="prepared split file to synthesise reasons for")
    s.add_argument("--out", required=True, help="JSONL of records (resumable: existing keys are skipped)")
    s.add_argument("--scores", default=None, help="`rec eval --scores` Parquet: only rows the model gets wrong")
    s.add_argument("--threshold", type=float, default=0.0, help="score > threshold predicts Yes (with --scores)")
    s.add_argument("--limit", type=int, default=None, help="only the first N rows of the split")
    s.add_argument("--base-url", default=None, help="default: $OPENAI_BASE_URL")
    s.add_argument("--model", default=None, help="default: $DISTTHINK_TEACHER_MODEL")
    s.add_argument("--max-rounds", type=int, default=10,
                   help="reflection rounds per row: while the teacher's verdict is wrong, the conversation continues "
                        "with a hint, up to N rounds (default 10); a row still wrong is stored as failed (ok: false) "
                        "and counted")
    s.add_argument("--match", choices=("substring", "strict"), default="substring",
                   help="substring: the label's text appears in the answer (ThinkRec); strict: the answer's first "
                   "verdict word is the label")
    s.add_argument("--concurrency", type=int, default=4, help="requests to the teacher in flight at once (default 4)")
    s.add_argument("--write-split", default=None, help="also write the split with the new reasons (Parquet)")
    s.set_defaults(func=_synthesize)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _synth(args) -> int:
    from distthink.tasks.thinkrec.synthetic_world import generate

    d = generate(args.users, args.items, min_per_user=args.min_per_user, max_per_user=args.max_per_user,
                 n_personas=args.personas, latent_scale=args.latent_scale, user_bias=args.user_bias,
                 seed=args.seed)
    paths = d.write(args.out, args.format)
    print(json.dumps({"rows": len(d.interactions.ratings), **{k: str(v) for k, v in paths.items()}}))
    return 0


def _prepare(args) -> int:
    from distthink.tasks.thinkrec.interactions import load_interactions
    from distthink.tasks.thinkrec.prepare import prepare

    if args.input == "synthetic":
        from distthink.tasks.thinkrec.synthetic_world import generate

        data = generate(seed=args.seed).interactions
    else:
        data = load_interactions(args.input, args.format, items=args.items, trust_pickle=args.trust_pickle)
    meta = prepare(data, args.out, threshold=args.threshold, history_len=args.history_len,
                   train_frac=args.train_frac, valid_frac=args.valid_frac, reasons=args.reasons,
                   fmt=args.output_format)
    print(json.dumps({"out": str(args.out), "n_users": meta["n_users"], "n_items": meta["n_items"],
                      **{k: v["rows"] for k, v in meta["splits"].items()}}))
    return 0


def _train_cf(args) -> int:
    import pandas as pd

    from distthink.tasks.thinkrec.cf import CFConfig, export_cf, load_split, predict, train_cf
    from distthink.tasks.thinkrec.metrics import auc, uauc
    from distthink.tasks.thinkrec.prepare import find_split

    data = Path(args.data)
    meta_path = data / "prepare_meta.json"
    history_len = json.loads(meta_path.read_text())["history_len"] if meta_path.is_file() else 10
    n_users = len(pd.read_parquet(data / "users.parquet"))
    n_items = len(pd.read_parquet(data / "items.parquet"))
    splits = {s: load_split(find_split(data, s), n_items, history_len) for s in ("train", "valid", "test")}
    cfg = CFConfig(model=args.model, dim=args.dim, layers=args.layers, lr=args.lr, weight_decay=args.weight_decay,
                   batch_size=args.batch_size, max_epochs=args.epochs, patience=args.patience, seed=args.seed,
                   history_len=history_len, progress=not args.no_progress)
    res = train_cf(splits["train"], splits["valid"], n_users, n_items, cfg)
    test = splits["test"]
    extra = {}
    if len(test):
        y = test.label.numpy().astype("int64")
        p = predict(res.model, test).numpy()
        value, used, skipped = uauc(test.user.numpy(), y, p)
        extra = {"test_auc": auc(y, p), "test_uauc": value, "test_uauc_users": used, "test_uauc_skipped": skipped}
    out = export_cf(res, args.out, data, extra)
    print(json.dumps({"out": str(out), "model": args.model, "best_epoch": res.best_epoch,
                      "valid_auc": round(res.valid_auc, 4), **{k: (round(v, 4) if isinstance(v, float) else v)
                                                               for k, v in extra.items()}}))
    return 0


def _group(args) -> int:
    from distthink.tasks.thinkrec.grouping import GroupConfig, group_users

    n_groups = args.n_groups if args.n_groups == "auto" else _int_or_error(args.n_groups)
    cfg = GroupConfig(n_groups=n_groups, k_min=args.k_min, k_max=args.k_max, method=args.method,
                      silhouette_sample=args.sample, seed=args.seed, only_trained_users=not args.include_cold_users,
                      plots=not args.no_plots, space=args.space)
    summary = group_users(args.cf, args.out, cfg, prepared_dir=args.data)
    print(json.dumps({k: summary[k] for k in ("n_groups", "sizes", "silhouette", "out")}))
    return 0


def _int_or_error(text: str) -> int:
    from distthink.errors import ConfigError

    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--n-groups must be 'auto' or an integer >= 2, got {text!r}") from None
    if k < 2:
        raise ConfigError(f"--n-groups must be >= 2, got {k}")
    return k


def _eval(args) -> int:
    """`rec eval`: one process, or every rank of a torchrun launch (predictions gathered exactly)."""
    import numpy as np
    import torch.distributed as dist

    from distthink.config import load_config
    from distthink.tasks.thinkrec.evaluate import evaluate
    from distthink.tasks.thinkrec.metrics import compute_metrics, format_metrics

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.fusion:
            from distthink.errors import ConfigError
            from distthink.tasks.thinkrec.evaluate import evaluate_fusion

            if not args.export:
                raise ConfigError("rec eval --fusion needs --export (train.output_dir/export of a stage-3 run)")
            fm = evaluate_fusion(cfg, args.split, export=args.export, limit=args.limit, scores_out=args.scores,
                                 batch_size=args.batch_size)
            out = {f"llm_{k}": v for k, v in fm.items() if k != "branch_counts"}
            out["branch_counts"] = fm["branch_counts"]
        else:
            m = evaluate(cfg, args.split, export=args.export, limit=args.limit, scores_out=args.scores,
                         batch_size=args.batch_size, projector=args.projector)
            out = {"llm": m}
        if args.cf:
            from distthink.tasks.thinkrec.cf_source import open_cf_source
            from distthink.tasks.thinkrec.prepare import read_split

            df = read_split(args.split)
            if args.limit is not None:
                df = df.iloc[:args.limit]
            sc = open_cf_source(args.cf).score_rows(df, source=args.split)
            out["cf"] = compute_metrics(df["user_id"].to_numpy(), df["label"].to_numpy().astype(np.int64), sc)
        if not dist.is_initialized() or dist.get_rank() == 0:
            for k, v in out.items():
                print(f"{k}: " + (" ".join(f"{b}={c}" for b, c in v.items()) if k == "branch_counts"
                                  else format_metrics(v)))
            print(json.dumps(out))

    return _on_every_rank("gloo", body)


def _explain(args) -> int:
    """`rec explain`: one process, or every rank of a torchrun launch."""
    import torch.distributed as dist

    from distthink.config import load_config
    from distthink.inference.generate import GenerationOptions
    from distthink.tasks.thinkrec.explain import explain

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        gen = GenerationOptions(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.min_new_tokens, batch_size=args.batch_size, seed=args.seed)
        m = explain(cfg, args.split, export=args.export, out=args.out, mode=args.mode, gen=gen, limit=args.limit,
                    projector=args.projector, device=args.device)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if args.metrics:
                Path(args.metrics).write_text(json.dumps(m, indent=1))
            print(json.dumps(m))

    return _on_every_rank("gloo" if args.device == "cpu" else "nccl", body)


def _on_every_rank(backend: str, body) -> int:
    """Run a command's body in one process, or on every rank of a torchrun launch. The ranks get a process group
    of `backend` first and end with it alive, through os._exit (distthink/engine/distributed.py says why); one
    process destroys a group its body may have created."""
    import torch.distributed as dist

    from distthink.engine.distributed import launched_rank, leave

    if launched_rank() and not dist.is_initialized():
        dist.init_process_group(backend)
    try:
        body()
    finally:
        if dist.is_initialized() and not launched_rank():
            dist.destroy_process_group()
    if launched_rank():
        leave(0)
    return 0


def _synthesize(args) -> int:
    """`rec synthesize`: API key from $OPENAI_API_KEY (never a flag, so it stays out of shell history)."""
    import os

    from distthink.tasks.thinkrec.prepare import read_split
    from distthink.tasks.thinkrec.teacher import TeacherConfig, apply_reasons, select_rows, synthesize

    cfg = TeacherConfig(base_url=args.base_url or os.environ.get("OPENAI_BASE_URL", ""),
                        model=args.model or os.environ.get("DISTTHINK_TEACHER_MODEL", ""),
                        api_key=os.environ.get("OPENAI_API_KEY"), max_rounds=args.max_rounds,
                        concurrency=args.concurrency, match=args.match)
    split = read_split(args.split)
    counts = synthesize(select_rows(split, args.scores, args.threshold, args.limit), args.out, cfg)
    if args.write_split:
        apply_reasons(split, args.out).to_parquet(args.write_split, index=False)
    print(json.dumps({"out": args.out, **counts}))
    return 0
