"""Fine-tune a decoder LLM with FoRA or one of its ablations; writes a PEFT LoRA adapter.

Thin wrapper: argparse -> `fora.training.config.TrainConfig` -> `fora.training.run.main`.

    # the README's main job: FoRA on the built-in cloze task, held-out accuracy before / after at the end
    python scripts/train.py --model smollm2-135m --k 15   # plus the README's short-run flags
    python scripts/train.py --help   # every flag; defaults are the paper's settings
    # N GPUs (--batch-size is per process; see docs/distributed.md)
    torchrun --nproc-per-node 8 scripts/train.py --model llama-3.1-8b --batch-size 2 --distributed fsdp
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from fora.training.argparser import command_name
from fora.training.flags import parse_args
from fora.training.interrupt import TrainingInterrupted
from fora.training.loop import TrainingDiverged

# Errors a user can fix from the command line: shown as one message, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError, PermissionError, TrainingDiverged)


def cli(argv: Sequence[str] | None = None) -> int:
    """`fora-train` / `python scripts/train.py`: 0 done, 1 a user error (one line), 130 interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prog = command_name("train.py")
    cfg = parse_args(argv)
    from fora.evaluation.final_eval import eval_table, final_evaluation
    from fora.training.distributed import rank_prefix, shutdown
    from fora.training.run import main  # after parsing: --help stays quick

    try:
        result = main(cfg, final_eval=final_evaluation)  # ends with accuracy before / after (--eval-data)
        if result.eval is not None and os.environ.get("RANK", "0") == "0":  # one process prints it
            print(f"\nheld-out accuracy before and after training ({result.out / 'eval.json'}):\n"
                  f"{eval_table(result.eval)}")
        if cfg.export is not None and os.environ.get("RANK", "0") == "0":
            from fora.formats.gguf_export import export_gguf, export_summary

            print(export_summary(export_gguf(result.out, to=cfg.export)))
    except USER_ERRORS as err:
        print(f"{prog}: error: {rank_prefix()}{err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # Ctrl-C in the loop: a checkpoint was written
        print(f"{prog}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the loop (or a second Ctrl-C): nothing to continue from
        print(f"{prog}: interrupted before a checkpoint could be written; run the same command again",
              file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
