"""``train.parallel: fsdp``: PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``) on student and teacher.

kdlm applies FSDP2 itself instead of going through accelerate's FSDP plugin, because the plugin falls back to plain
multi-CPU data parallelism on CPU: with ``fully_shard`` the code the CPU tests run (gloo) is the code a GPU run
(NCCL) executes. Every FSDP-specific decision is in this module; the loop calls the functions below and stays the
same for ``ddp``.

Units (an FSDP "unit" all-gathers its parameters before its forward and frees them after):

* **Student**: every decoder layer is a unit, and the :class:`~kdlm.models.DecoderOnly` wrapper is the *root* unit,
  holding the embeddings, final norm and output layer. The root keeps its parameters gathered from its forward to
  the end of the backward pass (``reshard_after_forward=False``), so the fused loss, which runs after the forward,
  reads the full output-layer weight: gathered **once per micro-batch**, never per chunk. The loss's gradient
  accumulates into that gathered parameter and FSDP's post-backward reduce-scatters it into the shard like any other
  gradient. With tied embeddings the input embedding and the output layer are one parameter of the root unit, so
  they stay one parameter (a unit that held only one of them would untie them). A LoRA student (peft) has the same
  units, its decoder layers found inside peft's wrapper (:func:`_bare`): a layer's unit holds its frozen base weights
  and its trainable adapters together, which FSDP2 allows (it shards each parameter on its own, so frozen and
  trainable ones can share a unit). Its checkpoints hold the adapters only (:func:`_state_dicts`).
* **Teacher** (frozen, forward only): every decoder layer is a unit and the backbone (``lm.base_model``: embeddings,
  final norm) is the root, all freed again after each forward. The callers run the backbone (``DecoderOnly``), so the
  root's hooks run; the output layer is outside the backbone: an untied one is a unit of its own, a tied one is
  pointed at the embedding's sharded parameter (one copy, still tied). :meth:`kdlm.models.OutputHead.of` gathers it
  (``DTensor.full_tensor``, once per micro-batch) and the gathered copy is freed after the loss.

Code that calls a sharded model outside these forward paths (sampling, held-out evaluation, DDK's perplexities,
writing the final student) runs inside :func:`full_parameters`, which gathers every unit of that model and frees
them afterwards.

Gradient scale: FSDP2 averages the reduce-scattered gradients over processes, as DDP averages its all-reduced ones,
so the loop's factor ``num_processes`` is the same under both (tested: 2 processes × batch b equal 1 process ×
batch 2b).
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from kdlm.config import ConfigError, TrainConfig
from kdlm.errors import CheckpointError
from kdlm.models import DecoderOnly

# Model -> its FSDP units (root first) and each unit's reshard_after_forward: what full_parameters gathers. Weak
# keys: a model that is dropped takes its entry with it.
_UNITS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Module, bool]]]" = weakref.WeakKeyDictionary()
# Teachers whose tied output layer sits outside the backbone unit: it must follow the embedding's parameter whenever
# FSDP swaps that (gathered <-> sharded).
_RETIE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def is_sharded(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` (a causal LM or the DecoderOnly student) was sharded by this module."""
    return module is not None and module in _UNITS


def _policies(cfg: TrainConfig) -> dict:
    """fully_shard's keyword arguments from the config: mixed precision and CPU offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict = {}
    if cfg.fsdp_param_dtype == "bfloat16":
        # Parameters gathered (and the forward/backward run) in bf16; gradients reduced in fp32; shards stay fp32.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        if not torch.cuda.is_available():
            # FSDP2's CPUOffloadPolicy copies each unit to the accelerator for its compute; it fails without one
            # ("Cannot access accelerator device when none is available"), and on CPU there is nothing to gain.
            raise ConfigError("train.fsdp_cpu_offload needs a GPU (it keeps the shards in CPU memory and moves each "
                              "unit to the GPU for its compute); on a CPU-only machine the parameters already live in "
                              "CPU memory: set train.fsdp_cpu_offload false")
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def _layers(lm: nn.Module) -> nn.ModuleList:
    from kdlm.models import _decoder_layers

    return _decoder_layers(lm)[1]


def _bare(lm: nn.Module) -> nn.Module:
    from kdlm.models import is_peft_model

    return lm.get_base_model() if is_peft_model(lm) else lm


def _shard(root: nn.Module, lm: nn.Module, cfg: TrainConfig, root_reshards: bool,
           layers_reshard: bool = True) -> list[tuple[nn.Module, bool]]:
    """fully_shard on each decoder layer of ``lm`` (freed after its forward when ``layers_reshard``), then on
    ``root``; the units, root first, with their reshard_after_forward."""
    from torch.distributed.fsdp import fully_shard

    kwargs = _policies(cfg)
    units = [(root, root_reshards)]
    for layer in _layers(lm):
        fully_shard(layer, reshard_after_forward=layers_reshard, **kwargs)
        units.append((layer, layers_reshard))
    fully_shard(root, reshard_after_forward=root_reshards, **kwargs)
    return units


def shard_student(student: DecoderOnly, cfg: TrainConfig, device: torch.device) -> DecoderOnly:
    """FSDP2 on the student: each decoder layer a unit, ``student`` (DecoderOnly) the root. In place; returns it.

    The root's parameters (embeddings, final norm, output layer) stay gathered from the forward to the backward,
    which is what lets the loss read the output layer after the forward. The root is initialised by one forward of a
    single token here, so that later calls of the bare model (sampling, evaluation) find the units already ordered
    under their root.
    """
    lm = _bare(student.lm)
    tied = _tied(lm)
    units = _shard(student, lm, cfg, root_reshards=False, layers_reshard=cfg.fsdp_reshard_after_forward)
    if tied and not _tied(lm):  # never expected: the tied pair is one parameter of the root unit
        raise RuntimeError("sharding untied the student's embeddings and output layer")
    _UNITS[student] = units
    _UNITS[student.lm] = units
    with torch.no_grad():
        student(torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, 1, dtype=torch.long, device=device))
    for unit, _ in units:  # layers kept after their forward (fsdp_reshard_after_forward false) too
        unit.reshard()
    return student


def shard_teacher(teacher: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """FSDP2 on the frozen teacher, forward only: each decoder layer a unit, the backbone the root, everything freed
    after each forward. The output layer: its own unit when untied; when tied, the embedding's sharded parameter. In
    place; returns ``teacher``."""
    from torch.distributed.fsdp import fully_shard

    tied = _tied(teacher)
    backbone = teacher.base_model
    units = _shard(backbone, teacher, cfg, root_reshards=True)
    head = teacher.get_output_embeddings()
    if tied:
        head.weight = teacher.get_input_embeddings().weight  # re-tie to the sharded embedding: one copy
        _RETIE.add(teacher)
    else:
        fully_shard(head, reshard_after_forward=True, **_policies(cfg))
        units.append((head, True))
    _UNITS[teacher] = units
    with torch.no_grad():
        backbone(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    return teacher


def release_freed_memory() -> bool:
    """Hand the memory Python and torch have freed back to the operating system: ``gc.collect()``, then glibc's
    ``malloc_trim(0)``, which returns every free page of the heap, not only its top. True where glibc did so.

    Why: the full models are loaded on every process before sharding (and the pruned student is copied from the
    teacher); their tensors are freed into glibc's heap, which keeps most of it as the process's resident memory, so
    without this a sharded process looked as big as an unsharded one. Measured on the demo, 2 processes under fsdp
    (``benchmarks/sharded.py``): resident memory at the first step 1.96 GB without, 0.85 GB with. Called once, after
    the models are prepared, under ddp too (there it frees pruning's transients)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim, the allocator decides
        return False
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def _tied(lm: nn.Module) -> bool:
    out = lm.get_output_embeddings()
    return out is not None and out.weight is lm.get_input_embeddings().weight


@contextmanager
def full_parameters(*models: Optional[nn.Module]) -> Iterator[None]:
    """Every parameter of ``models`` gathered, as plain tensors, for the duration of the block; sharded again after.

    For code that calls a sharded model outside the forward paths FSDP hooks (token sampling, held-out evaluation,
    DDK's perplexities, saving the final student). Models that are not sharded (``ddp``) pass through unchanged, so
    callers need no branch. Costs one all-gather of each model and its full size in memory while inside.
    """
    units = [unit for model in models if is_sharded(model) for unit in _UNITS[model]]
    if not units:
        yield
        return
    retie = [model for model in models if model in _RETIE]
    for module, _ in units:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    for lm in retie:  # the tied teacher's head follows the gathered embedding
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    try:
        yield
    finally:
        for module, reshard in units:
            module.set_reshard_after_forward(reshard, recurse=False)
            module.reshard()
        for lm in retie:
            lm.get_output_embeddings().weight = lm.get_input_embeddings().weight


def full_state_dict(lm: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The full (unsharded) state dict of a sharded model, on every process (a collective: all must call it), with
    tied entries sharing one tensor as in the model; None for a model that is not sharded (save it as it is).

    FSDP2's ``state_dict()`` always returns the shards (DTensors), even inside :func:`full_parameters`, hence this."""
    if not is_sharded(lm):
        return None
    from torch.distributed.tensor import DTensor

    gathered: dict[int, torch.Tensor] = {}
    full = {}
    for name, tensor in lm.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:
            value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            gathered[id(tensor)] = value.detach().cpu()
        full[name] = gathered[id(tensor)]
    return full


def _root(lm: nn.Module) -> nn.Module:
    return _UNITS[lm][0][0]


def _load_options(lm: nn.Module):
    """set_state_dict's options: a LoRA student (peft) loads its trainable parameters only, so not strict (the
    loaded keys are checked in :func:`load_sharded`); None (torch's defaults, strict) for a plain student."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from kdlm.models import is_peft_model

    return StateDictOptions(strict=False) if is_peft_model(lm) else None


def _state_dicts(lm: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and AdamW state dicts of a sharded student as DTensor shards, keyed by parameter name (DCP's layout).

    A LoRA student's model state is its trainable parameters only, the adapters, as under ddp (the frozen base
    weights are rebuilt from the config on resume). Filtered here by every name of each frozen parameter: torch's
    ``StateDictOptions(ignore_frozen_params=True)`` drops a tied pair's first name only and kept the frozen
    embedding as ``lm_head.weight`` (measured)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from kdlm.models import is_peft_model

    root = _root(lm)
    # accelerate wraps the optimizer
    model_state, optimizer_state = get_state_dict(root, getattr(optimizer, "optimizer", optimizer))
    if is_peft_model(lm):
        frozen = {name for name, param in root.named_parameters(remove_duplicate=False) if not param.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name not in frozen}
    return model_state, optimizer_state


def save_sharded(folder: Path, lm: nn.Module, optimizer) -> None:
    """Write the student's weights and AdamW state with torch.distributed.checkpoint: every process writes its own
    shards (``__<rank>_0.distcp``) and process 0 the ``.metadata``. A collective: every process calls it. A LoRA
    student: its adapters only (:func:`_state_dicts`)."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = _state_dicts(lm, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, lm: nn.Module, optimizer) -> None:
    """Read :func:`save_sharded`'s folder into the sharded student and its optimizer (each process its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optimizer_state = _state_dicts(lm, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    result = set_state_dict(_root(lm), getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                            optim_state_dict=state["optimizer"], options=_load_options(lm))
    # LoRA (not strict): only the frozen base weights may be absent, every trainable one came from the checkpoint
    trainable = {name for name, param in _root(lm).named_parameters() if param.requires_grad}
    if result.unexpected_keys or trainable & set(result.missing_keys):
        raise CheckpointError(f"{folder}: the sharded weights do not match the student: not in the checkpoint "
                              f"{sorted(trainable & set(result.missing_keys))[:5]}, unknown "
                              f"{list(result.unexpected_keys)[:5]}")


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of sharded parameters (DTensor gradients) to ``max_norm``; returns the norm
    before clipping, over all processes (the shards' norms combined, as for the full gradient)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def memory_report(student: nn.Module, teacher: Optional[nn.Module]) -> dict:
    """This process's parameter bytes against the full models' (summary.json ``sharding``), and whether the
    student's output layer is still its input embedding where the model ties them."""
    lm = _bare(student.lm)
    report = {"student_local_bytes": local_bytes(student)[0], "student_full_bytes": local_bytes(student)[1],
              "student_tied": _tied(lm)}
    if teacher is not None:
        report["teacher_local_bytes"], report["teacher_full_bytes"] = local_bytes(teacher)
        report["teacher_tied"] = _tied(teacher)
    return report


def local_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of this process's parameter shards, bytes of the full parameters) of ``module``: what sharding saves."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        size = param.element_size()
        full += param.numel() * size
        local += (param.to_local().numel() if isinstance(param, DTensor) else param.numel()) * size
    return local, full
