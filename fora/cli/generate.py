"""Greedy continuation of a prompt and perplexity of a paragraph, with fora's own model code.

    python scripts/generate.py                                  # smollm2-135m (GGUF preset, offline)
    python scripts/generate.py --model gemma-3-270m --max-new-tokens 40
    python scripts/generate.py --model path/to/folder_or_file.gguf --prompt "Once upon a time"
    python scripts/generate.py --adapter runs/smollm2-135m-fora-k15 --prompt "$(cat prompt.txt)"

Thin and importable: argparse -> `GenerateConfig` -> `main(cfg)`, which returns the results.
Greedy decoding uses `CausalLM.generate` (KV cache); `greedy` below is the cache-free reference.
--adapter attaches a LoRA adapter folder (fora's or peft's) to the model first.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fora.training.argparser import ArgumentParser, command_name

DEFAULT_PROMPT = "The three primary colours are"
DEFAULT_PARAGRAPH = (
    "Exceptions are a means of breaking out of the normal flow of control of a code block in order "
    "to handle errors or other exceptional conditions. An exception is raised at the point where the "
    "error is detected; it may be handled by the surrounding code block or by any code block that "
    "directly or indirectly invoked the code block where the error occurred.")


@dataclass(frozen=True)
class GenerateConfig:
    model: str = "smollm2-135m"
    adapter: str | None = None
    prompt: str = DEFAULT_PROMPT
    paragraph: str = DEFAULT_PARAGRAPH
    max_new_tokens: int = 30
    dtype: str = "float32"
    device: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag has a help text."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=GenerateConfig.model,
                   help="preset name, hub repo id, checkpoint folder or .gguf file")
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--prompt", default=GenerateConfig.prompt, help="text to continue greedily")
    p.add_argument("--paragraph", default=GenerateConfig.paragraph, help="text whose perplexity is reported")
    p.add_argument("--max-new-tokens", type=int, default=GenerateConfig.max_new_tokens,
                   help="tokens to generate after the prompt (stops early at the end-of-sequence token)")
    p.add_argument("--dtype", default=GenerateConfig.dtype, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights and the computation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; default: cuda if available, else cpu")
    return p


def parse_args(argv: Sequence[str] | None = None) -> GenerateConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return GenerateConfig(model=a.model, adapter=a.adapter, prompt=a.prompt, paragraph=a.paragraph,
                          max_new_tokens=a.max_new_tokens, dtype=a.dtype, device=a.device)


def greedy(model, ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """The next `max_new_tokens` argmax tokens after `ids` (stops early after `eos_id`), re-running
    the whole prefix at every step: the cache-free reference for `CausalLM.generate`."""
    import torch

    device = model.lm_head.weight.device
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out], device=device))
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == eos_id:
                break
    return out


def perplexity(model, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:] given the prefix)."""
    import torch

    x = torch.tensor([ids], device=model.lm_head.weight.device)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x)[0, :-1].float(), x[0, 1:])
    return math.exp(nll.item())


def main(cfg: GenerateConfig) -> dict:
    import torch

    from fora.evaluation.adapted import load_evaluated

    model, tok = load_evaluated(cfg.model, cfg.adapter, dtype=getattr(torch, cfg.dtype), device=cfg.device)  # logs its time
    prompt_ids = tok.encode(cfg.prompt)
    t0 = time.perf_counter()
    x = torch.tensor([prompt_ids], device=model.lm_head.weight.device)
    new = model.generate(x, max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id)[0].tolist()
    seconds = time.perf_counter() - t0
    continuation = tok.decode(new, skip_special_tokens=True)
    ppl = perplexity(model, tok.encode(cfg.paragraph))
    print(f"{cfg.prompt}{continuation}")
    print(f"[{len(new)} tokens in {seconds:.1f} s] perplexity of the paragraph: {ppl:.2f}")
    return {"continuation": continuation, "new_ids": new, "perplexity": ppl}


def cli(argv: Sequence[str] | None = None) -> int:
    from fora.evaluation.cli import run_cli

    return run_cli(command_name("generate.py"), parse_args, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
