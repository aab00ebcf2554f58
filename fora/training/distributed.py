"""Data-parallel training over processes started by torchrun: DDP or FSDP2, PyTorch's own engine.

    global batch = batch_size x grad_accum x world

A run on W processes with `--batch-size b` equals the one-process run with `--batch-size W*b`:
every rank builds the *global* batches of the one-process run (same seed, same order) and keeps
a contiguous, near-equal share of each batch's rows (`share`). The loss of a step is the sum of
token losses over the whole accumulated global batch divided by its supervised-token count
(all-reduced); each rank backpropagates W x its part, and the gradients are *averaged* over ranks
(DDP's own rule, which stays right under gradient accumulation without `no_sync`), so every rank
holds the one-process gradient and takes the same optimizer step.

- `ddp`: `DistributedDataParallel(CausalLMLoss(model))`, so the step's forward is the loss at
  supervised positions (as in one process); the base is replicated on every device.
- `fsdp`: `fully_shard` per decoder block plus the root: the frozen base is sharded, the LoRA
  A and B are `ignored_params` (replicated, never sharded) because Cayley-Adam needs whole A's;
  their gradients are averaged with one flat `all_reduce` per optimizer step. A 4-bit base
  (QFoRA) shards its packed codes and constants (`fora.training.fsdp_nf4`).

Layer selection: Fisher scores (Eq. 2) are computed with each rank scoring its share of the
calibration batches and the weighted sums all-reduced; under FSDP a 4-bit base is sharded first
and scored sharded, every rank stepping through the same number of batches. CKA / FIM-LoRA run on
rank 0 and the selection is broadcast. Rank 0 alone writes files; the others wait at a barrier.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fora.models.decoder import CausalLMLoss
from fora.models.loss import IGNORE_INDEX
from fora.models.paths import decoder_layers
from fora.training.batching import Example, LazyBatches, StepBatches

log = logging.getLogger(__name__)

DIST_MODES = ("ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 may score CKA / FIM-LoRA alone while the others wait at a collective: be patient.
TIMEOUT = timedelta(minutes=60)
Batch = dict[str, torch.Tensor]
T = TypeVar("T")
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class DistContext:
    """Who this process is: `mode` None (one process), "ddp" or "fsdp"; rank of world."""

    mode: str | None = None
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode is not None and dist.is_available() and dist.is_initialized()

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device becomes this process's GPU (`cuda:LOCAL_RANK`); the CPU stays the CPU."""
        return torch.device("cuda", self.local_rank) if self.active and device.type == "cuda" else device

    def collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, value: N) -> N:
        """Sum of a number over ranks (the supervised-token count, a loss); exact for integers."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64 if isinstance(value, int) else torch.float64,
                         device=self.collective_device())
        dist.all_reduce(t)
        return type(value)(t.item())

    def all_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place, without a host sync (the step's loss); `t` itself in one process."""
        if self.active:
            dist.all_reduce(t)
        return t

    def seed_step(self, seed: int, step: int) -> None:
        """Across processes, seed torch's generator (LoRA dropout) from (seed, rank, step) before
        each step: ranks draw different masks, and a resumed run draws the masks of the
        uninterrupted one whatever --save-every (a checkpoint holds rank 0's RNG state only)."""
        if self.active:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block, then the others (e.g. checkpoint recovery that renames files)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()
        self.barrier()

    def main_only(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(...)` on rank 0 only (a file write); every rank waits until it is done."""
        result = fn(*args, **kwargs) if self.main else None
        self.barrier()
        return result


SINGLE = DistContext()


def torchrun_hint(mode: str) -> str:
    return (f"torchrun --nproc-per-node <GPUs> scripts/train.py ... --distributed {mode} (one node), or add "
            "--nnodes <N> --rdzv-id <id> --rdzv-backend c10d --rdzv-endpoint <host>:<port> for several nodes")


def init_distributed(mode: str | None, device_type: str) -> DistContext:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU).

    Reuses a group that is already initialised. Raises ValueError, naming the command to use,
    when `mode` is set but the process was not started by torchrun.
    """
    if mode is None:
        return SINGLE
    if mode not in DIST_MODES:
        raise ValueError(f"unknown --distributed {mode!r}; choose one of {', '.join(DIST_MODES)}")
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"--distributed {mode} needs the environment torchrun sets ({', '.join(missing)} "
                         f"missing); launch with: {torchrun_hint(mode)}")
    ctx = DistContext(mode, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        cuda = device_type == "cuda"
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    if not ctx.main:  # one log for the whole run; errors still reach stderr with the rank named
        logging.getLogger("fora").setLevel(logging.WARNING)
    log.info("%s over %d processes (%s)", mode, ctx.world, dist.get_backend())
    return ctx


def shutdown() -> None:
    """Leave the process group, if any (torchrun expects a clean exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_prefix() -> str:
    """"rank R: " inside a multi-process run, else "" (error messages name the failing rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"rank {dist.get_rank()}: "
    return ""


def share(rows: int, rank: int, world: int) -> range:
    """The rows of a global batch that `rank` computes: contiguous, sizes differing by at most one
    (`torch.tensor_split`'s rule), in rank order, so the shares concatenate to the batch."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class RankBatches(LazyBatches):
    """This rank's share of every global batch of an epoch, collated on access.

    A rank whose share is empty (a last batch with fewer rows than ranks) gets a ghost row: the
    batch's first example with every label IGNORE_INDEX. It adds nothing to the loss or the
    token count, but keeps every rank's forward/backward - and so its collectives - in step.
    """

    def __init__(self, batches: LazyBatches, rank: int, world: int) -> None:
        super().__init__(batches.examples, batches.indices, pad_id=batches.pad_id,
                         pad_to_multiple_of=batches.pad_to_multiple_of)
        self.rank, self.world = rank, world

    def batch_examples(self, k: int) -> list[Example]:
        rows = self.indices[k]
        mine = [self.examples[rows[i]] for i in share(len(rows), self.rank, self.world)]
        if not mine:
            ex = self.examples[rows[0]]
            mine = [{"input_ids": ex["input_ids"], "labels": [IGNORE_INDEX] * len(ex["input_ids"])}]
        return mine


def split_batches(ctx: DistContext, steps_of: Callable[[int], StepBatches]) -> Callable[[int], StepBatches]:
    """epoch -> its steps with this rank's share of every global micro-batch (the identity in one process)."""
    if ctx.world == 1:
        return steps_of

    def mine(epoch: int) -> StepBatches:
        steps = steps_of(epoch)
        return steps.with_micro(RankBatches(steps.micro, ctx.rank, ctx.world))
    return mine


def _all_reduce(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    out = t.to(ctx.collective_device())
    dist.all_reduce(out)
    return out.to(t.device)


def _broadcast(ctx: DistContext, obj: T) -> T:
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.collective_device())
    return box[0]


def distributed_fisher_scores(ctx: DistContext, model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                              **kwargs: Any) -> torch.Tensor:
    """F_l of Eq. (2) over all N `batches`, each rank scoring batches rank, rank+W, ...

    Implements Eq. (2): F_l = (1/N) Σ_b ‖∇_{θ_l} L_b‖²; each rank's mean over its n_r batches is
    turned back into a sum (x n_r), the sums are all-reduced (float64) and divided by N.
    `kwargs` go to `fora.fisher.fisher_scores` (params, targets).

    Returns:
        Tensor[L] (float64, CPU), equal on every rank to the one-process scores.
    """
    from torch.distributed.fsdp import FSDPModule

    from fora.fisher import fisher_scores

    batches = list(batches)
    mine = batches[ctx.rank::ctx.world]
    if isinstance(model, FSDPModule):
        # a sharded forward is a collective: every rank runs ceil(N / W) batches, one at a time
        local = torch.zeros(len(decoder_layers(model)), dtype=torch.float64)
        for i in range(-(-len(batches) // ctx.world)):
            if i < len(mine):
                local += fisher_scores(model, [mine[i]], **kwargs)
            else:
                fisher_scores(model, batches[:1], **kwargs)  # in step with the others, not counted
    elif mine:
        local = fisher_scores(model, mine, **kwargs) * len(mine)
    else:  # fewer batches than ranks: this rank has nothing to score
        local = torch.zeros(len(decoder_layers(model)), dtype=torch.float64)
    return (_all_reduce(ctx, local) if ctx.active else local) / len(batches)


def distributed_select(ctx: DistContext, method: str, args: Any) -> Any:
    """`fora.training.methods.select` across ranks: Fisher scored in shares and all-reduced; the
    other selectors run on rank 0; the `Selection` is broadcast so every rank adapts the same layers.

    Under FSDP a 4-bit base is sharded here, before the adapters exist, so Fisher runs on the
    sharded model (on the GPUs, never whole on one); `wrap_model` then only places the adapters."""
    from fora.selection import select_layers
    from fora.training.fsdp_nf4 import is_quantized, shard_base
    from fora.training.methods import METHODS, Selection, select

    if not ctx.active:
        return select(method, args)
    if METHODS[method].selector == "fisher":
        if ctx.mode == "fsdp" and is_quantized(args.model):  # score the 4-bit base sharded (fsdp_nf4)
            shard_base(args.model, ctx.world, ctx.collective_device())
        scores = distributed_fisher_scores(ctx, args.model, args.batches, params=args.fisher_params,
                                           targets=args.targets)
        sel = Selection(select_layers(scores, args.k, by="fisher"), scores.tolist())
    else:
        sel = select(method, args) if ctx.main else None
    return _broadcast(ctx, sel)


def load_device(ctx: DistContext, device: torch.device) -> torch.device:
    """Where to load the base: the host under FSDP (`fully_shard` moves each block's shard to
    the device, so a base larger than one GPU never lands whole on it), else `device`."""
    return torch.device("cpu") if ctx.active and ctx.mode == "fsdp" else device


def wrap_model(ctx: DistContext, model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training step calls: `model` itself, `DDP(CausalLMLoss(model))`, or `model`
    sharded in place by `fully_shard` (per decoder block, then the root) with the adapters kept whole.

    Call after `inject_lora` + `freeze_base` and before building the optimizers. `model` keeps
    its module names (adapter export and checkpoints read it directly).
    """
    if not ctx.active:
        return model
    adapters = {p for p in model.parameters() if p.requires_grad}
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # forward = CausalLM.loss; device_ids=None: the step already puts the ids on the device, and
        # the labels stay on the host, where the loss reads its supervised positions without a sync
        return DistributedDataParallel(CausalLMLoss(model), device_ids=None)
    from fora.training.fsdp_nf4 import shard_base

    return shard_base(model, ctx.world, device, keep=adapters)


def sync_adapter_grads(ctx: DistContext, params: Sequence[torch.Tensor]) -> None:
    """Under FSDP, average the replicated adapters' gradients over ranks (one flat all_reduce), as
    DDP does during backward; one process has nothing to do."""
    if not (ctx.active and ctx.mode == "fsdp"):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _all_reduce(ctx, torch.cat([g.reshape(-1) for g in grads]))
    flat /= ctx.world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


class _NoMetrics:
    """metrics.jsonl stand-in on ranks > 0 (rank 0 writes the run's one file)."""

    def write(self, row: dict[str, Any]) -> None:
        pass


def metrics_log(ctx: DistContext, path: Path, *, keep_until_step: int | None = None) -> Any:
    """`MetricsLog(path)` on rank 0, a no-op writer elsewhere."""
    from fora.training.loop import MetricsLog

    return MetricsLog(path, keep_until_step=keep_until_step) if ctx.main else _NoMetrics()
