"""Hugging Face PEFT's LoRA adapter format <-> ftlab LoRA adapters, for the BERT encoder.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a
``transformers.BertModel`` base the tensors are named (checked against peft 0.21.2's
``get_peft_model_state_dict`` and ``save_pretrained``, which drop the adapter name ``default``)::

    base_model.model.encoder.layer.{i}.attention.self.query.lora_A.weight    [r, in]
    base_model.model.encoder.layer.{i}.attention.self.query.lora_B.weight    [out, r]

in torch's (out, in) layout, so ``lora_A.weight = lora_a.T`` and ``lora_B.weight = lora_b.T``.
The ftlab <-> HF module names (the same as `third_party.minilm`)::

    layer_{i}/attention/{query,key,value}  <->  encoder.layer.{i}.attention.self.{query,key,value}
    layer_{i}/attention/out                <->  encoder.layer.{i}.attention.output.dense
    layer_{i}/mlp/intermediate             <->  encoder.layer.{i}.intermediate.dense
    layer_{i}/mlp/output                   <->  encoder.layer.{i}.output.dense

PEFT's scale is ``lora_alpha / r`` (without ``use_rslora``), the same as ``ftlab.peft.lora``.

A PEFT ``target_modules`` list matches a module whose name equals an entry or ends in
``"." + entry``; so ``"output.dense"`` also selects ``attention.output.dense``, and ``"dense"``
also selects the pooler's ``pooler.dense``. :func:`export` checks that the ``target_modules`` it
writes select exactly the adapter's modules, the pooler's and the embeddings' included.

ftlab's encoder has no pooler: it returns hidden states, which ftlab pools itself (mean pooling
for sentence embeddings). An adapter written by PEFT with ``target_modules=["query", "value",
"dense"]`` holds LoRA weights for ``pooler.dense`` too, which cannot change any ftlab output;
:func:`import_` drops them with a `UserWarning` that names the modules, and lists them in the
returned config under ``"skipped_modules"``. Any other module ftlab lacks is refused.

Integrity: :func:`export` records a sha256 of every tensor in the safetensors metadata
(``ftlab.core.tensorfile``); :func:`import_` verifies them when present (files written by PEFT
have none and load unverified), and names the file when it is truncated or its JSON is bad.

Licence: the format is defined by huggingface/peft (Apache-2.0); no PEFT code is copied here, and
PEFT/torch are not imported (the optional interop test uses them to load what this writes).
"""

from __future__ import annotations

import json
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ftlab.core import partition, tensorfile

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "DEFAULT_BASE_MODEL",
    "peft_key",
    "to_state_dict",
    "from_state_dict",
    "export",
    "import_",
]


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_KEY_PREFIX = "base_model.model."

# ftlab module path below `layer_{i}/` -> HF module name below `encoder.layer.{i}.`.
_MODULES = {
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/out": "attention.output.dense",
    "mlp/intermediate": "intermediate.dense",
    "mlp/output": "output.dense",
}
_HF_TO_FTLAB = {v: k for k, v in _MODULES.items()}
# The shortest PEFT suffix per module; "output.dense" is ambiguous, see the module docstring.
_SUFFIX = {
    "attention/query": "query",
    "attention/key": "key",
    "attention/value": "value",
    "attention/out": "attention.output.dense",
    "mlp/intermediate": "intermediate.dense",
    "mlp/output": "output.dense",
}
_FTLAB_LEAF = re.compile(
    r"(?:(?P<prefix>.+)/)?layer_(?P<layer>\d+)/(?P<module>"
    + "|".join(_MODULES)
    + r")/lora_(?P<ab>a|b)"
)
_HF_KEY = re.compile(
    re.escape(_KEY_PREFIX)
    + r"encoder\.layer\.(?P<layer>\d+)\.(?P<module>"
    + "|".join(re.escape(v) for v in _MODULES.values())
    + r")\.lora_(?P<ab>A|B)\.weight"
)
_TASK_TYPES = (None, "FEATURE_EXTRACTION")
# Modules of a BertModel that ftlab's encoder does not have but that cannot change its outputs:
# the pooler maps the [CLS] state to `pooler_output`, which ftlab never computes.
_SKIPPABLE = ("pooler.dense",)
# Other BertModel modules a PEFT target_modules entry could select (LoRA wraps Linear and
# Embedding layers); export's check that target_modules selects nothing extra covers them all.
_OTHER_HF_MODULES = (
    "embeddings.word_embeddings",
    "embeddings.position_embeddings",
    "embeddings.token_type_embeddings",
    *_SKIPPABLE,
)
_SKIPPABLE_KEY = re.compile(
    re.escape(_KEY_PREFIX)
    + r"(?P<module>"
    + "|".join(re.escape(m) for m in _SKIPPABLE)
    + r")\.lora_(?P<ab>A|B)\.weight"
)

# Fields that change what the adapter computes: they must hold exactly these values.
_REQUIRED = {
    "peft_type": ("LORA",),
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "exclude_modules": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),
    # Values that rewrite the base weights (pissa, olora, loftq, corda, ...) need a base model
    # ftlab does not have; true/false/gaussian only change the init, not what a trained adapter is.
    "init_lora_weights": (True, False, "gaussian"),
    "task_type": _TASK_TYPES,
}
# Fields read here, or without effect on the forward pass of a loaded adapter.
_ACCEPTED = {
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def peft_key(module: str, ab: str) -> str:
    """The PEFT tensor name of a LoRA factor of an ftlab BERT module.

    Args:
        module: ``layer_{i}/attention/query`` style path (optionally below a prefix such as
            ``encoder/``, which is dropped).
        ab: ``"a"`` or ``"b"``.

    Returns:
        The key in ``adapter_model.safetensors``.

    >>> peft_key("encoder/layer_0/attention/query", "a")
    'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight'
    """
    m = _FTLAB_LEAF.fullmatch(f"{module}/lora_{ab}")
    if m is None:
        raise ValueError(
            f"{module}: not a BERT encoder dense module; expected [prefix/]layer_<i>/<module> "
            f"with <module> one of {', '.join(_MODULES)}."
        )
    return _hf_key(int(m["layer"]), m["module"], ab)


def _hf_key(layer: int, module: str, ab: str) -> str:
    return f"{_KEY_PREFIX}encoder.layer.{layer}.{_MODULES[module]}.lora_{ab.upper()}.weight"


def _hf_module(layer: int, module: str) -> str:
    return f"encoder.layer.{layer}.{_MODULES[module]}"


def _peft_matches(target_modules: str | Sequence[str], name: str) -> bool:
    """PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists) without extras."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def _all_hf_modules(num_layers: int) -> list[str]:
    return [_hf_module(i, m) for i in range(num_layers) for m in _MODULES]


def _every_hf_module(num_layers: int) -> list[str]:
    """Every BertModel module PEFT's LoRA could wrap, the encoder's and the others."""
    return [*_OTHER_HF_MODULES[:3], *_all_hf_modules(num_layers), *_OTHER_HF_MODULES[3:]]


def _derive_target_modules(hf_modules: set[str], num_layers: int) -> list[str]:
    kinds = sorted({_HF_TO_FTLAB[n.split(".", 3)[3]] for n in hf_modules}, key=list(_MODULES).index)
    short = [_SUFFIX[k] for k in kinds]
    selected = {n for n in _every_hf_module(num_layers) if _peft_matches(short, n)}
    if selected == hf_modules:
        return short
    # Some layers only, or mlp/output without attention/out: list the exact module names.
    return sorted(hf_modules, key=_all_hf_modules(num_layers).index)


def to_state_dict(adapter: Mapping) -> dict[str, np.ndarray]:
    """Renames and transposes an ftlab BERT adapter into PEFT's tensors.

    Args:
        adapter: LoRA leaves only (``ftlab.peft.lora.adapter``), paths ``[prefix/]layer_{i}/...``
            with one prefix (``""`` for a `BertEncoder` tree, ``"encoder"`` for a classifier).

    Returns:
        ``{peft key: float32 array in torch layout}``.

    Raises:
        ValueError: a leaf is not a LoRA leaf of a BERT encoder dense module, or the leaves mix
            prefixes.

    >>> ad = {"layer_0": {"attention": {"query": {"lora_a": np.ones((4, 2)),
    ...                                           "lora_b": np.ones((2, 3))}}}}
    >>> {k.split("query.")[1]: v.shape for k, v in to_state_dict(ad).items()}
    {'lora_A.weight': (2, 4), 'lora_B.weight': (3, 2)}
    """
    flat = partition.flatten(adapter)
    if not flat:
        raise ValueError("peft_format: the adapter is empty; pass lora.adapter(params).")
    out, prefixes = {}, set()
    for name, leaf in flat.items():
        m = _FTLAB_LEAF.fullmatch(name)
        if m is None:
            raise ValueError(
                f"peft_format: leaf {name!r} has no place in a PEFT adapter for BertModel; "
                "expected [prefix/]layer_<i>/<module>/lora_(a|b) with <module> one of "
                f"{', '.join(_MODULES)}. (A LoRA'd classifier head cannot be exported; a new head "
                "is not an adapter.)"
            )
        prefixes.add(m["prefix"] or "")
        out[_hf_key(int(m["layer"]), m["module"], m["ab"])] = np.ascontiguousarray(
            np.asarray(leaf, dtype=np.float32).T
        )
    if len(prefixes) > 1:
        raise ValueError(
            f"peft_format: adapter leaves sit below different prefixes {sorted(prefixes)}; "
            "export one encoder's adapter at a time."
        )
    return out


def from_state_dict(state_dict: Mapping[str, Any], *, prefix: str = "") -> dict:
    """Inverse of :func:`to_state_dict`: PEFT tensors -> nested ftlab adapter (numpy, (in, out)).

    Args:
        state_dict: ``{peft key: array}`` as in ``adapter_model.safetensors``.
        prefix: Where the encoder sits in the ftlab tree: ``""`` for a `BertEncoder` tree (as
            `third_party.minilm.load` gives), ``"encoder"`` for a `BertClassifier`.

    Returns:
        The nested adapter tree.

    Raises:
        ValueError: naming any key that is not a LoRA factor of a BertModel encoder layer.
    """
    flat = {}
    for key, value in state_dict.items():
        m = _HF_KEY.fullmatch(key)
        if m is None:
            raise ValueError(
                f"peft_format: tensor {key!r} is not a LoRA factor of a BertModel encoder layer; "
                "expected base_model.model.encoder.layer.<i>.<module>.lora_(A|B).weight with "
                f"<module> one of {', '.join(_MODULES.values())}."
            )
        module = _HF_TO_FTLAB[m["module"]]
        path = f"layer_{int(m['layer'])}/{module}/lora_{m['ab'].lower()}"
        flat[f"{prefix.strip('/')}/{path}" if prefix.strip("/") else path] = np.ascontiguousarray(
            np.asarray(value, dtype=np.float32).T
        )
    return partition.unflatten(flat)


def export(
    path_dir: str | pathlib.Path,
    adapter: Mapping,
    *,
    rank: int,
    alpha: float,
    target_modules: str | Sequence[str] | None = None,
    base_model_name: str = DEFAULT_BASE_MODEL,
    task_type: str | None = None,
    lora_dropout: float = 0.0,
) -> dict:
    """Writes an ftlab BERT LoRA adapter as a HF PEFT adapter folder.

    ``peft.PeftModel.from_pretrained(transformers.BertModel..., path_dir)`` then computes what
    the ftlab encoder computes under ``lora.intercept(alpha=alpha, rank=rank)``.

    Args:
        path_dir: Output folder (created if missing).
        adapter: LoRA leaves of a `BertEncoder` (or, below ``encoder/``, a `BertClassifier`).
        rank: The LoRA rank r; checked against the tensors.
        alpha: The LoRA alpha (PEFT's ``lora_alpha``).
        target_modules: PEFT ``target_modules`` (a list of module-name suffixes, or a regex
            string). None derives them: ``["query", "value"]`` when suffixes select exactly the
            adapter's modules, else the exact module names.
        base_model_name: ``base_model_name_or_path`` recorded in the config.
        task_type: None or ``"FEATURE_EXTRACTION"`` (a bare `BertModel`).
        lora_dropout: The training-time dropout recorded in ``adapter_config.json`` (it does not
            change inference).

    Returns:
        The config dict written to ``adapter_config.json``.

    Raises:
        ValueError: the adapter does not fit a BertModel, its rank is not ``rank``, or
            ``target_modules`` would make PEFT place LoRA on other modules than the adapter's.

    >>> import tempfile
    >>> ad = {"layer_0": {"attention": {"value": {"lora_a": np.ones((4, 2), np.float32),
    ...                                           "lora_b": np.ones((2, 4), np.float32)}}}}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     cfg = export(tmp, ad, rank=2, alpha=4)
    ...     back, cfg2 = import_(tmp)
    >>> cfg["target_modules"], cfg2["rank"], back["layer_0"]["attention"]["value"]["lora_b"].shape
    (['value'], 2, (2, 4))
    """
    if task_type not in _TASK_TYPES:
        raise ValueError(
            f"peft_format.export: task_type={task_type!r}; a bare BertModel adapter has task_type "
            "None or 'FEATURE_EXTRACTION' (other task types wrap the model and rename the keys)."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha:
        raise ValueError(f"peft_format.export: alpha={alpha!r} must be a nonzero number.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"peft_format.export: rank={rank!r} must be an integer >= 1.")
    state_dict = to_state_dict(adapter)
    _check_tensors(state_dict, rank=rank, where="peft_format.export")
    hf_modules = _hf_modules(state_dict)
    num_layers = 1 + max(int(n.split(".")[2]) for n in hf_modules)
    derived = _derive_target_modules(hf_modules, num_layers)
    if target_modules is None:
        target_modules = derived
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        candidates = _every_hf_module(num_layers)
        selected = {n for n in candidates if _peft_matches(target_modules, n)}
        unselected = sorted(hf_modules - selected)
        extra = sorted(selected - hf_modules, key=candidates.index)
        if unselected or extra:
            what = (
                f"leaves out adapter modules {unselected[:4]} (PEFT would ignore their weights)"
                if unselected
                else f"also selects {extra[:4]}, which have no adapter weights"
            )
            raise ValueError(
                f"peft_format.export: target_modules={target_modules!r} {what}. PEFT matches a "
                "module whose name equals an entry or ends in '.' + entry. Use "
                f"target_modules={derived!r}, or pass None to derive it."
            )
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "r": int(rank),
        "lora_alpha": alpha if isinstance(alpha, int) else float(alpha),
        "target_modules": target_modules,
        "lora_dropout": float(lora_dropout),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    path_dir = pathlib.Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what PEFT's own files say; the sha256 entries are read by import_ only.
    tensorfile.save(path_dir / WEIGHTS_FILE, state_dict, metadata={"format": "pt"})
    (path_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def import_(path_dir: str | pathlib.Path, *, prefix: str = "") -> tuple[dict, dict]:
    """Reads a HF PEFT LoRA adapter folder for a BertModel into an ftlab adapter.

    Every field of ``adapter_config.json`` that changes what the adapter computes is checked, and
    any value ftlab's LoRA does not implement (``use_dora``, ``fan_in_fan_out``, ``use_rslora``,
    a non-empty ``rank_pattern``, ...) is refused with the field's name; unknown fields are
    accepted only when empty (null, false, {}, []).

    LoRA weights of the pooler (``pooler.dense``, selected by ``target_modules=[..., "dense"]``)
    cannot change ftlab's encoder, which has no pooler: they are dropped with a `UserWarning`
    naming them. The sha256 digests :func:`export` records are verified when present.

    Args:
        path_dir: The folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        prefix: Where the encoder sits in the ftlab tree (``""`` or ``"encoder"``).

    Returns:
        ``(adapter, config_dict)``: the nested adapter (numpy, ftlab (in, out) layout), and
        ``{"rank", "alpha", "targets", "target_modules", "lora_dropout", "task_type",
        "base_model_name_or_path", "skipped_modules"}`` where ``targets`` are
        ``ftlab.peft.lora.init`` regexes selecting exactly the adapter's modules and
        ``skipped_modules`` the PEFT modules dropped (``["pooler.dense"]`` or ``[]``).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: naming the config field or tensor that ftlab cannot represent, or the file
            that is not valid JSON, is truncated, or whose tensors no longer match the digests
            recorded in it (`ftlab.core.tensorfile.CorruptFileError`).
    """
    path_dir = pathlib.Path(path_dir)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path_dir / f).is_file():
            hint = ""
            if f == WEIGHTS_FILE:
                hint = " (adapter_model.bin is not read; re-save with safe_serialization=True)"
            raise FileNotFoundError(f"{path_dir / f} is missing{hint}.")
    where = str(path_dir / CONFIG_FILE)
    cfg = tensorfile.read_json(path_dir / CONFIG_FILE, what="PEFT adapter config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, got {cfg!r}.")
    for field, allowed in _REQUIRED.items():
        if field not in cfg:
            if field == "peft_type":
                raise ValueError(f"{where}: field 'peft_type' is missing; expected 'LORA'.")
            continue  # PEFT's default, which is allowed
        value = cfg[field]
        # Compare types too: JSON true must not pass for 1, nor false for 0.
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ValueError(
                f"{where}: field {field!r} is {value!r}, but ftlab's LoRA implements only "
                f"{' or '.join(json.dumps(a) for a in allowed)}; convert the adapter in PEFT "
                "first (e.g. merge it), or train it without this option."
            )
    for field, value in cfg.items():
        if field not in _REQUIRED and field not in _ACCEPTED and not _empty(value):
            raise ValueError(
                f"{where}: field {field!r} is {value!r}, which ftlab does not understand; refusing "
                "rather than guessing. Remove it if it does not affect the forward pass."
            )
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in cfg:
            raise ValueError(f"{where}: required field {field!r} is missing.")
    rank, alpha, target_modules = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: field 'r' is {rank!r}; expected an integer >= 1.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha == 0:
        raise ValueError(f"{where}: field 'lora_alpha' is {alpha!r}; expected a nonzero number.")
    if not (
        isinstance(target_modules, str)
        or (isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules))
    ):
        raise ValueError(
            f"{where}: field 'target_modules' is {target_modules!r}; expected a list of module "
            "names or a regex string."
        )

    # PEFT writes no digests; the ones export wrote are verified.
    state_dict, _ = tensorfile.load(path_dir / WEIGHTS_FILE, missing_digests="ignore")
    if not state_dict:
        raise ValueError(f"{path_dir / WEIGHTS_FILE}: holds no tensors.")
    skipped = sorted({m["module"] for k in state_dict if (m := _SKIPPABLE_KEY.fullmatch(k))})
    if skipped:
        warnings.warn(
            f"{path_dir / WEIGHTS_FILE}: skipping the LoRA weights of {skipped}: ftlab's BERT "
            "encoder has no pooler, and the pooler cannot change the hidden states it returns "
            "(nor their mean pooling). In PEFT, name the encoder's modules in target_modules "
            "(e.g. 'attention.output.dense', 'intermediate.dense', 'output.dense' instead of "
            "'dense') to leave the pooler out.",
            UserWarning,
            stacklevel=2,
        )
        state_dict = {k: v for k, v in state_dict.items() if not _SKIPPABLE_KEY.fullmatch(k)}
        if not state_dict:
            raise ValueError(
                f"{path_dir / WEIGHTS_FILE}: holds LoRA weights for {skipped} only, which ftlab's "
                "encoder does not have; there is no adapter left to load."
            )
    adapter = from_state_dict(state_dict, prefix=prefix)
    _check_tensors(state_dict, rank=rank, where=str(path_dir / WEIGHTS_FILE))
    hf_modules = _hf_modules(state_dict)
    missed = sorted(n for n in hf_modules if not _peft_matches(target_modules, n))
    if missed:
        raise ValueError(
            f"{where}: field 'target_modules' is {target_modules!r}, which does not select "
            f"{missed[:4]} although the file holds weights for them; PEFT would ignore those."
        )
    return adapter, {
        "rank": rank,
        "alpha": alpha,
        "targets": _ftlab_targets(hf_modules, prefix),
        "target_modules": target_modules,
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "task_type": cfg.get("task_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "skipped_modules": skipped,
    }


def _hf_modules(state_dict: Mapping[str, Any]) -> set[str]:
    """HF module names (``encoder.layer.0.attention.self.query``) holding a ``lora_A``."""
    return {k[len(_KEY_PREFIX) : -len(".lora_A.weight")] for k in state_dict if ".lora_A." in k}


def _ftlab_targets(hf_modules: set[str], prefix: str) -> list[str]:
    """One exact ``lora.init`` regex per module kind, e.g. ``layer_(0|1)/attention/query``."""
    layers: dict[str, list[int]] = {}
    for n in hf_modules:
        _, _, i, rest = n.split(".", 3)
        layers.setdefault(_HF_TO_FTLAB[rest], []).append(int(i))
    head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return [
        f"{head}layer_({'|'.join(str(i) for i in sorted(layers[k]))})/{k}"
        for k in _MODULES
        if k in layers
    ]


def _check_tensors(state_dict: Mapping[str, Any], *, rank: int, where: str) -> None:
    modules: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, ab = key.rsplit(".lora_", 1)
        modules.setdefault(module, {})[ab[0]] = np.shape(value)
    for module, shapes in sorted(modules.items()):
        if set(shapes) != {"A", "B"}:
            missing = ({"A", "B"} - set(shapes)).pop()
            raise ValueError(f"{where}: {module}.lora_{missing}.weight is missing.")
        a, b = shapes["A"], shapes["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ValueError(
                f"{where}: {module}: lora_A {a} and lora_B {b} must be [r, in] and [out, r]."
            )
        if a[0] != rank:
            raise ValueError(
                f"{where}: {module}.lora_A.weight has rank {a[0]} but the config says r={rank}; "
                "per-module ranks (rank_pattern) are not supported."
            )
