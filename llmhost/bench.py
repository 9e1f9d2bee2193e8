"""`python -m llmhost.bench`: load generator against a running llmhost server.

    python -m llmhost.bench generate --url http://127.0.0.1:8000 --model M ...
    python -m llmhost.bench embed --url http://127.0.0.1:8000 --model M ...

Each prints throughput and latency, and with --compare-inprocess the same
workload run in-process with transformers (or sentence-transformers) on this
machine, as ratios.
"""
from __future__ import annotations

import argparse
import sys


def bench_generate(args) -> int:
    raise SystemExit("not yet")


def bench_embed(args) -> int:
    raise SystemExit("not yet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmhost.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="chat/completions load")
    gen.set_defaults(func=bench_generate)
    emb = sub.add_parser("embed", help="embeddings load")
    emb.set_defaults(func=bench_embed)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
