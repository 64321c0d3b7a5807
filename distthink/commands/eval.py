"""`distthink eval captions --generations G.jsonl --references R.jsonl [--out per_sample.parquet]`."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate generations (captions: BLEU-4, ROUGE-L, METEOR-nosyn, think stats)")
    sub = p.add_subparsers(dest="eval_kind", required=True)
    c = sub.add_parser("captions", help="caption metrics of a generations JSONL against references",
                       description="BLEU-4, ROUGE-L, METEOR without synonyms (offline), well-formed think "
                                   "fraction, average thinking length; per-sample rows to Parquet. Matched by id "
                                   "when both files have ids, else by line order (docs/molecules.md).")
    c.add_argument("--generations", required=True, help="JSONL from `distthink generate`")
    c.add_argument("--references", default="demo", help="JSONL with the reference field; `demo` = demo test split")
    c.add_argument("--ref-field", default="description",
                   help="field of each --references row that holds the reference caption (default description)")
    c.add_argument("--out", default=None, help="per-sample Parquet")
    c.set_defaults(func=_captions)


def _captions(args) -> int:
    from distthink.inference.metrics import main
    from distthink.tasks.molecule.demo import ASSET_DIR, SPLIT_FILES

    refs = str(ASSET_DIR / SPLIT_FILES["test"]) if args.references == "demo" else args.references
    argv = ["--generations", args.generations, "--references", refs, "--ref-field", args.ref_field]
    if args.out:
        argv += ["--out", args.out]
    return main(argv)
