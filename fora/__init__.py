"""fora: Fisher-orthogonal Rank Adaptation (FoRA) for decoder LLMs.

The method is the core: ``fora.lora`` (Eq. 1), ``fora.fisher`` (Eq. 2), ``fora.selection``
(Eq. 3), ``fora.stiefel`` (Eq. 4-6), ``fora.cayley_adam`` (the algorithm), ``fora.inject`` and
``fora.optim`` (adapters into a model and their optimizer pair). Its names are imported here,
with the few entry points a run needs (load a model, train, save and load an adapter). Everything
else is imported from its module: the baselines (``fora.baselines``), the 4-bit base
(``fora.quant``), file formats (``fora.formats``), the training run and its data
(``fora.training``), measurements (``fora.evaluation``), the Hugging Face stack (``fora.hf``).
"""
from __future__ import annotations

from fora.cayley_adam import CAYLEY_BETAS, CayleyAdam, cayley_adam_step
from fora.defaults import FORA, SOURCES, Defaults
from fora.fisher import fisher_scores
from fora.formats.hub import resolve_checkpoint
from fora.formats.loading import load_model, load_tokenizer
from fora.formats.peft_io import load_adapter, save_adapter, save_merged
from fora.inject import (DEFAULT_TARGETS, adapted_layers, adapters_disabled, count_trainable,
                         euclidean_parameters, freeze_base, inject_lora, lora_modules, stiefel_parameters)
from fora.lora import LoRALinear
from fora.models.decoder import CausalLM
from fora.optim import build_optimizers, scheduled
from fora.selection import (all_layers, calibration_fingerprint, random_layers, select_layers,
                            selection_record)
from fora.stiefel import (cayley_fixed_point, cayley_step, effective_rank, project_tangent, qr_retract,
                          random_stiefel, stiefel_error)
from fora.training.config import TrainConfig
from fora.training.run import train

__version__ = "0.2.0"

__all__ = [
    # the method (the core)
    "FORA", "Defaults", "SOURCES",
    "LoRALinear", "inject_lora", "DEFAULT_TARGETS", "lora_modules", "adapters_disabled", "freeze_base",
    "stiefel_parameters", "euclidean_parameters", "count_trainable", "adapted_layers",
    "fisher_scores", "select_layers", "random_layers", "all_layers", "calibration_fingerprint",
    "selection_record",
    "random_stiefel", "project_tangent", "cayley_step", "cayley_fixed_point", "qr_retract", "stiefel_error",
    "effective_rank",
    "CayleyAdam", "cayley_adam_step", "CAYLEY_BETAS", "build_optimizers", "scheduled",
    # the entry points
    "CausalLM", "load_model", "load_tokenizer", "resolve_checkpoint", "TrainConfig", "train",
    "save_adapter", "load_adapter", "save_merged",
]
