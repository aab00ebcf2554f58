"""The commands: ``fora-train``, ``fora-eval``, ``fora-export``, ``fora-generate``, ``fora-analyze``.

Each module holds one command's argparse and ``cli(argv) -> exit code``, the console entry point
that ``pip install fora-lora`` puts on PATH; ``scripts/<name>.py`` runs the same ``cli`` from a
checkout (``python scripts/train.py ...``). Flags: docs/cli.md.
"""
