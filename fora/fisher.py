"""Per-layer empirical Fisher scores of a frozen decoder (Eq. 2), computed in O(one gradient) memory.

    F_l = (1/N) · Σ_b ‖∇_{θ_l} L_b‖²₂                                            (Eq. 2)

is the trace of the empirical diagonal Fisher of block ``l`` on the observed labels. Only the
per-layer (and per-module) sums of squared gradients are needed, so each parameter gradient is
squared, summed into its module's accumulator and freed the moment autograd has produced it
(``Tensor.register_post_accumulate_grad_hook``): the model never holds gradients for more than the
parameters autograd is finishing at that instant. The embedding, final norm and LM head get
``requires_grad=False`` while scoring, so no gradient is ever formed for them.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from fora.inject import DEFAULT_TARGETS
from fora.models.decoder import CausalLM
from fora.models.linear import is_packed_linear, linear_device
from fora.models.loss import causal_lm_loss
from fora.models.paths import decoder_layers, layer_index, target_modules
from fora.models.weight_grad import quantized_linears, weight_grad_norms
from fora.selection import validate_batches

log = logging.getLogger(__name__)

PARAM_MODES = ("block", "targets")



def _is_adapter_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("lora_")



def scoring_parameters(model: nn.Module, params: str = "block",
                       targets: Sequence[str] = DEFAULT_TARGETS) -> list[tuple[int, str, nn.Parameter]]:
    """θ_l of Eq. (2) as (layer, module path, parameter) triples.

    ``params="block"``: every base parameter of each block (norms included, LoRA ``lora_*``
    adapters excluded). ``params="targets"``: only the weights of the target projections (the base
    ``weight`` when the module is already a LoRALinear).
    """
    if params not in PARAM_MODES:
        raise ValueError(f"unknown params={params!r}; valid values: {list(PARAM_MODES)}")
    out: list[tuple[int, str, nn.Parameter]] = []
    if params == "targets":
        for path, module in target_modules(model, targets).items():
            if getattr(module, "weight", None) is not None:  # a 4-bit base is scored by fisher_scores' hooks
                out.append((int(path.split(".")[2]), path, module.weight))
        return out
    for i, block in enumerate(decoder_layers(model)):
        # a packed weight's codes and constants (Parameters once FSDP shards them) get no gradient:
        # fisher_scores' hooks score that weight; its bias is an ordinary parameter
        codes = {id(t) for m in block.modules() if is_packed_linear(m)
                 for name, t in m.named_parameters(recurse=False) if name != "bias"}
        for name, p in block.named_parameters():
            if not _is_adapter_param(name) and id(p) not in codes:
                module = name.rsplit(".", 1)[0] if "." in name else ""
                out.append((i, f"model.layers.{i}" + (f".{module}" if module else ""), p))
    return out


@contextlib.contextmanager
def scoring_state(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode, ``requires_grad`` only on ``trainable``, no stale ``.grad``; all restored on exit.

    Eval mode because calibration must be deterministic (no dropout, e.g. in LoRA adapters).
    Existing ``.grad`` tensors of ``trainable`` are stashed and put back, so the model leaves
    exactly as it came in.
    """
    was_training = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stashed = [(p, p.grad) for p in trainable]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p, _ in stashed:
            p.grad = None
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, grad in stashed:
            p.grad = grad
        for m, mode in was_training.items():
            m.training = mode


def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean token cross-entropy of one batch over supervised positions (labels shifted inside, as in HF)."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    if isinstance(model, CausalLM):  # logits only at supervised positions, chunked (head_loss)
        total, count = model.loss(ids, batch["labels"], mask)
        return total / count
    out = model(ids, attention_mask=mask)
    logits = getattr(out, "logits", out)  # HF models return an output object
    total, count = causal_lm_loss(logits, batch["labels"].to(device))
    return total / count


def fisher_scores(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], *,
                  params: str = "block", targets: Sequence[str] = DEFAULT_TARGETS,
                  per_module: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Per-layer Fisher scores F_l.

    Implements Eq. (2): ``F_l = (1/N) Σ_b ‖∇_{θ_l} L_b‖²``, with ``L_b`` the mean token
    cross-entropy of batch ``b`` over positions whose (shifted) label is not -100.

    Runs in eval mode (deterministic: no dropout). Memory: one forward-backward's activations plus
    one parameter gradient at a time — each gradient is folded into its module's sum by a
    post-accumulate hook and freed at once. The model is left as found: modes, ``requires_grad``
    flags and any pre-existing ``.grad`` restored, all hooks removed.

    Args:
        model: a causal LM with blocks at ``model.model.layers`` (fora.CausalLM; HF models work too).
        batches: N dicts with ``input_ids`` [B, T], ``labels`` [B, T] (-100 = ignored, aligned with
            input_ids) and optionally ``attention_mask`` [B, T].
        params: "block" (θ_l = every parameter of block l, norms included) or "targets" (the
            base weights of the LoRA target projections). A packed (4-bit) weight is no Parameter;
            its ‖∇W‖² is formed exactly from the layer's inputs and output gradients
            (``fora.models.weight_grad``), so a quantized model scores as its dequantized twin.
        targets: target projection names, used when ``params="targets"``.
        per_module: also return {module path: score} (the same mean over batches, per module).

    Returns:
        Tensor[L] (float64, CPU); with ``per_module=True`` a tuple (Tensor[L], dict[str, float]).
    """
    entries = scoring_parameters(model, params, targets)
    validate_batches(batches)
    num_layers = len(decoder_layers(model))
    quantized = quantized_linears(model, params, targets)  # 4-bit weights: no Parameters, see hooks
    paths = list(dict.fromkeys([*(path for _, path, _ in entries), *quantized]))
    index = {path: j for j, path in enumerate(paths)}
    layer_of = torch.zeros(len(paths), dtype=torch.long)
    for layer, path, _ in entries:
        layer_of[index[path]] = layer
    for path in quantized:
        layer_of[index[path]] = layer_index(path)
    device = entries[0][2].device if entries else linear_device(next(iter(quantized.values())))
    acc = torch.zeros(len(paths), dtype=torch.float32, device=device)  # this batch, per module
    # float64 sums stay on the device (MPS has no float64) and reach the host once, at the end
    total = torch.zeros(len(paths), dtype=torch.float64, device=device if device.type != "mps" else "cpu")

    def fold(j: int):
        def hook(p: torch.Tensor) -> None:
            # Square-and-sum the finished gradient into its module, then free it: no gradient
            # outlives this call, which is what keeps peak memory at one-gradient scale.
            # vector_norm reduces bf16 in fp32 without a full-size fp32 copy of the gradient
            acc[j] += torch.linalg.vector_norm(p.grad, dtype=torch.float32).square().to(acc.device)
            p.grad = None
        return hook

    trainable = list({id(p): p for _, _, p in entries}.values())
    def fold_quantized(path: str, sq_norm: torch.Tensor) -> None:
        acc[index[path]] += sq_norm.to(acc.device)

    with scoring_state(model, trainable), weight_grad_norms(quantized, fold_quantized):
        hooks = [p.register_post_accumulate_grad_hook(fold(index[path])) for _, path, p in entries]
        try:
            t0, every = time.perf_counter(), max(1, len(batches) // 8)
            for b, batch in enumerate(batches):
                loss = batch_loss(model, batch, device)
                loss.backward()
                total += acc.double().to(total.device)
                acc.zero_()
                if log.isEnabledFor(logging.DEBUG):  # .item() waits for the device
                    log.debug("fisher batch %d/%d: loss %.4f", b + 1, len(batches), loss.item())
                elif (b + 1) % every == 0 or b + 1 == len(batches):  # N = 128 takes many minutes on a CPU
                    log.info("Fisher scores: %d/%d calibration batches, %.0f s", b + 1, len(batches),
                             time.perf_counter() - t0)
        finally:
            for h in hooks:
                h.remove()
    total = total.cpu() / len(batches)
    scores = torch.zeros(num_layers, dtype=torch.float64).index_add_(0, layer_of, total)
    if per_module:
        return scores, {path: float(total[j]) for j, path in enumerate(paths)}
    return scores
