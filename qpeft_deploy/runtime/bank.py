"""AdapterBank: one base task model serving many .qpeft adapters, chosen per request or per row.

The bank owns one task model (encoder, pooler) whose adaptable linear layers (PEFT's all-linear set) are
wrapped once in :class:`BankLinear` and whose classification head is replaced by :class:`BankHead`. Neither
holds adapter state. A call resolves each row's adapter, builds a :class:`CallPlan` and publishes it through a
ContextVar for the duration of that one forward, so concurrent calls (threads) each see only their own plan:
there is no global "active adapter". Loading or unloading never touches the model.

For row r with adapter a, every wrapped layer computes y = W x + U_a (α λ_a ⊙ (V_aᵀ x)) (docs/METHOD.md). A batch
that names one adapter uses one GEMM per factor; a mixed batch gathers each row's Vᵀ, α·λ and Uᵀ and runs one
batched matmul per factor (never a loop of forwards). A row whose adapter does not target a layer gets no
delta there.

Memory per loaded adapter: its factor parameters (angles), α·λ with the mask applied, and its head, as four
flat tensors (~20 KB for MiniLM all-linear K = 8). U and V are materialised from the angles on first use (all
targets of one size in one vmapped circuit apply) into an LRU cache with a byte budget.

Heads: each adapter has its own nn.Linear head with any label count. :class:`BankOutput` holds the logits as
one (rows × most labels) tensor padded with -inf, and each row's labels. A row naming ``None`` (or a call with
``adapter=None``) uses the bank's default adapter; without a default that is a ConfigError, because a row
without an adapter has no head to classify with.

Causal LMs: a bank on a ``*ForCausalLM`` (``AdapterBank.from_pretrained("smollm2")``) keeps the model's own LM
head and serves causal adapters (``extra["task_type"] = CAUSAL_LM``, or head-less) through :meth:`generate`:
prompts in the chat template, left-padded into one batch, one forward for the whole prompt batch and then one
forward per new token for the whole (mixed) batch, the KV cache reused across steps; the call's plan (the same
per-row deltas as classification) is published once for the whole loop. There a row naming None without a
default runs the base model. A classification adapter in a causal bank, or a causal one in a classification
bank, is refused on load (io/model_io.check_task).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.func import vmap

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.attach import ALL_LINEAR, CONFIG_ATTR, find_head, find_target_modules
from qpeft_deploy.core.factors import frame_fn, target_params
from qpeft_deploy.core.keys import weight_key
from qpeft_deploy.core.layer import linear_shape
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.fingerprint import check_base
from qpeft_deploy.io.model_io import check_task
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import (
    is_causal_base,
    is_causal_lm,
    load_causal_lm,
    load_task_model,
    load_tokenizer,
    resolve_base,
    tokenize,
)
from qpeft_deploy.runtime.generation import (
    Generation,
    answer,
    check_context,
    check_request,
    generator,
    next_tokens,
    prompt_ids,
    special_ids,
    until,
)

DEFAULT_CACHE_BYTES = 256 << 20
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Names = str | Sequence[str | None] | None  # one adapter for every row, or one per row (None: the default)

_PLAN: ContextVar[CallPlan | None] = ContextVar("qpeft_bank_plan", default=None)


def check_name(name: object) -> str:
    """An adapter name: 1-128 characters of letters, digits, '.', '_', '-', not starting with a symbol."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"invalid adapter name {str(name)[:60]!r}: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


# ------------------------------------------------------------------------------------ adapters in memory


@dataclass(frozen=True)
class _Target:
    """One adapted layer: shape, and where its parameters and λ sit in the adapter's flat tensors."""

    key: str
    n: int
    m: int
    k: int
    u: tuple[tuple[int, tuple[int, ...]], ...]  # (offset, shape) of each of U's parameter tensors
    v: tuple[tuple[int, tuple[int, ...]], ...]
    lam: int  # offset of this target's K values in the flat scale vector


@dataclass(frozen=True)
class _Layout:
    """How an adapter's flat tensors split into targets; built once, shared by every adapter of that shape."""

    variant: str
    layers: int
    targets: tuple[_Target, ...]
    param_keys: tuple[str, ...]  # state keys of the factor parameters, in flat order
    lam_keys: tuple[str, ...]
    mask_keys: tuple[str, ...]


@dataclass(eq=False)
class _Adapter:
    """A loaded adapter: four flat tensors and its labels (hashed by identity; the LRU cache keys on it)."""

    name: str
    layout: _Layout
    params: torch.Tensor  # every factor parameter, fp32, in the layout's order
    scale: torch.Tensor  # α·λ·mask, fp32
    head_weight: torch.Tensor  # (labels, hidden)
    head_bias: torch.Tensor  # (labels,)
    labels: tuple[str, ...]

    def nbytes(self) -> int:
        """Bytes of tensor data this adapter keeps resident."""
        return sum(t.nbytes for t in (self.params, self.scale, self.head_weight, self.head_bias))


@dataclass(frozen=True)
class Frame:
    """One target's materialised factors: Vᵀ (K×M), α·λ (K) and Uᵀ (K×N), fp32."""

    vt: torch.Tensor
    scale: torch.Tensor
    ut: torch.Tensor


def _signature(file: AdapterFile) -> tuple:
    """What determines an adapter's layout: variant, circuit layers and every target's (key, N, M, K)."""
    config = file.config
    return config.variant, config.layers, tuple((key, *file.dims(key)) for key in config.targets)


def _layout(signature: tuple) -> _Layout:
    variant, layers, dims = signature
    targets, param_keys, lam_keys, mask_keys, offset, lam = [], [], [], [], 0, 0
    for key, n, m, k in dims:
        params, lam_key, mask_key = target_params(variant, key, (n, m, k), layers)
        spans = []
        for name, shape in params:
            spans.append((offset, tuple(shape)))
            param_keys.append(name)
            offset += math.prod(shape)
        half = len(spans) // 2  # U's parameter tensors, then V's
        targets.append(_Target(key, n, m, k, tuple(spans[:half]), tuple(spans[half:]), lam))
        lam_keys.append(lam_key)
        mask_keys.append(mask_key)
        lam += k
    return _Layout(variant, layers, tuple(targets), tuple(param_keys), tuple(lam_keys), tuple(mask_keys))


def _flat(file: AdapterFile, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor parameters, α·λ·mask) of a file as two flat fp32 tensors in the layout's order."""
    state = file.state
    params = torch.cat([state[k].reshape(-1) for k in layout.param_keys]).float()
    lam = torch.cat([state[k] for k in layout.lam_keys]).float()
    mask = torch.cat([state[k] for k in layout.mask_keys]).float()
    return params, file.config.alpha * lam * mask


# ------------------------------------------------------------------------------------ materialising U, V


@lru_cache(maxsize=64)
def _frame_fn(variant: str, dim: int, k: int, layers: int) -> Callable[..., torch.Tensor]:
    """One factor's parameters -> its frameᵀ (k×dim), vmapped over factors."""
    frame = frame_fn(variant, dim, k, layers)
    return vmap(lambda *params: frame(*params).T)


def _views(params: torch.Tensor, spans: tuple[tuple[int, tuple[int, ...]], ...]) -> list[torch.Tensor]:
    return [params[o : o + math.prod(s)].reshape(s) for o, s in spans]


@torch.no_grad()
def materialise(adapter: _Adapter) -> dict[str, Frame]:
    """Every target's (Vᵀ, α·λ, Uᵀ): all factors of one (size, rank) built by one vmapped call."""
    layout, jobs = adapter.layout, {}
    for t in layout.targets:
        for side, dim, spans in (("u", t.n, t.u), ("v", t.m, t.v)):
            jobs.setdefault((dim, t.k), []).append(((t.key, side), _views(adapter.params, spans)))
    built = {}
    for (dim, k), items in jobs.items():
        stacked = [torch.stack(parts) for parts in zip(*(params for _, params in items))]
        frames = _frame_fn(layout.variant, dim, k, layout.layers)(*stacked)
        built.update({name: frame for (name, _), frame in zip(items, frames)})
    return {
        t.key: Frame(built[t.key, "v"], adapter.scale[t.lam : t.lam + t.k], built[t.key, "u"])
        for t in layout.targets
    }


class FactorCache:
    """LRU of materialised factors per adapter, holding at most ``budget`` bytes (0 turns it off)."""

    def __init__(self, budget: int):
        if not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"cache budget must be a number of bytes >= 0, got {budget!r}")
        self.budget, self.nbytes = budget, 0
        self._entries: OrderedDict[_Adapter, tuple[dict[str, Frame], int]] = OrderedDict()
        self._lock = threading.Lock()

    def frames(self, adapter: _Adapter) -> dict[str, Frame]:
        """The adapter's frames, materialised (and cached, evicting the least recently used) on a miss."""
        with self._lock:
            if adapter in self._entries:
                self._entries.move_to_end(adapter)
                return self._entries[adapter][0]
        frames = materialise(adapter)
        size = sum(f.vt.nbytes + f.ut.nbytes for f in frames.values())
        with self._lock:
            if size <= self.budget and adapter not in self._entries:
                self._entries[adapter] = (frames, size)
                self.nbytes += size
                while self.nbytes > self.budget:
                    self.nbytes -= self._entries.popitem(last=False)[1][1]
        return frames

    def drop(self, adapter: _Adapter) -> None:
        """Forget an adapter's frames (after unload or replacement)."""
        with self._lock:
            entry = self._entries.pop(adapter, None)
            self.nbytes -= entry[1] if entry else 0

    def __len__(self) -> int:
        return len(self._entries)


# ------------------------------------------------------------------------------------------- per-call plan


def _pad(t: torch.Tensor, k: int, value: float = 0.0) -> torch.Tensor:
    """Pad the first axis of ``t`` to length k (zero rank directions, or -inf logits for missing labels)."""
    if t.shape[0] == k:
        return t
    return nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, k - t.shape[0]), value=value)


@dataclass(frozen=True)
class LayerDelta:
    """ΔW x for the rows of one call: one frame shared by all rows, or one per row; rows=None means all rows.

    Per-row frames are stacked in :meth:`add_to`, layer by layer, so a mixed batch never holds more than one
    layer's stacked copy (and that copy is still in cache when the batched matmul reads it). A plan reused for
    many forwards (generation: one per token) stacks them once instead (``stacked``)."""

    rows: torch.Tensor | None
    frames: tuple[Frame, ...]
    stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Vᵀ, α·λ, Uᵀ): shared (K×M, K, K×N) or per row (R×K×M, R×1×K, R×K×N), K padded to the max."""
        if self.stacked is not None:
            return self.stacked
        if len(self.frames) == 1:
            return self.frames[0].vt, self.frames[0].scale, self.frames[0].ut
        k = max(f.vt.shape[0] for f in self.frames)
        return (
            torch.stack([_pad(f.vt, k) for f in self.frames]),
            torch.stack([_pad(f.scale, k) for f in self.frames]).unsqueeze(1),
            torch.stack([_pad(f.ut, k) for f in self.frames]),
        )

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + ΔW x, computed in fp32 on (rows, tokens, features) views of x and y."""
        batch = x.shape[0]
        h = x.float().reshape(batch, -1, x.shape[-1])
        if self.rows is not None:
            h = h[self.rows]
        vt, scale, ut = self.factors()
        delta = (((h @ vt.mT) * scale) @ ut).to(y.dtype)
        if self.rows is None:
            return y + delta.reshape(y.shape)
        return y.reshape(batch, -1, y.shape[-1]).index_add(0, self.rows, delta).reshape(y.shape)


def layer_delta(frames: Sequence[Frame | None], stack: bool = False) -> LayerDelta | None:
    """The delta of one layer for rows whose frames are given (None: that row's adapter skips the layer);
    ``stack``: stack per-row frames now, for a plan that many forwards reuse."""
    present = [i for i, f in enumerate(frames) if f is not None]
    if not present:
        return None
    chosen = tuple(frames[i] for i in present)
    rows = None if len(present) == len(frames) else torch.tensor(present)
    delta = LayerDelta(rows, chosen[:1] if all(f is chosen[0] for f in chosen) else chosen)
    return LayerDelta(delta.rows, delta.frames, delta.factors()) if stack else delta


@dataclass(frozen=True)
class HeadPlan:
    """Each row's head: shared (C×H, C) or per row (R×C×H, R×C), padded to the most labels (bias -inf)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return x.float() @ self.weight.T + self.bias
        return (self.weight @ x.float().unsqueeze(-1)).squeeze(-1) + self.bias


def head_plan(rows: Sequence[_Adapter]) -> HeadPlan:
    """Stack (or share) the rows' heads, padding each to the largest label count."""
    if all(a is rows[0] for a in rows):
        return HeadPlan(rows[0].head_weight, rows[0].head_bias)
    c = max(len(a.labels) for a in rows)
    return HeadPlan(
        torch.stack([_pad(a.head_weight, c) for a in rows]),
        torch.stack([_pad(a.head_bias, c, float("-inf")) for a in rows]),
    )


@dataclass(frozen=True)
class CallPlan:
    """Everything one forward needs: the delta of each wrapped layer (absent: none) and the rows' heads."""

    layers: dict[nn.Module, LayerDelta]
    head: HeadPlan | None  # None: a causal LM's own head


class BankLinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus the delta the current call's plan gives it (none outside a call)."""

    def __init__(self, base: nn.Module, key: str):
        super().__init__()
        self.base, self.key = base, key
        self.out_features, self.in_features = linear_shape(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = _PLAN.get()
        delta = plan.layers.get(self) if plan is not None else None
        return y if delta is None else delta.add_to(x, y)

    def extra_repr(self) -> str:
        return f"key={self.key}"


class BankHead(nn.Module):
    """Stands in for the task head: applies each row's own head from the current call's plan."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = _PLAN.get()
        if plan is None or plan.head is None:
            raise ConfigError("a bank's model classifies only when called through its AdapterBank")
        return plan.head(x)


# ------------------------------------------------------------------------------------------- the bank


@dataclass
class Prediction:
    """One row's answer: the adapter used, the top label and a probability per label."""

    adapter: str
    label: str
    scores: dict[str, float]


@dataclass
class BankOutput:
    """Logits of a call (rows × most labels, -inf past each row's labels), each row's adapter and labels."""

    logits: torch.Tensor
    adapters: list[str]
    labels: list[tuple[str, ...]]

    def row(self, i: int) -> torch.Tensor:
        """Row i's logits over its own adapter's labels."""
        return self.logits[i, : len(self.labels[i])]

    def predictions(self) -> list[Prediction]:
        """Top label and softmax scores per row."""
        probs = torch.softmax(self.logits, dim=-1).tolist()
        return [
            Prediction(name, labels[max(range(len(labels)), key=p.__getitem__)], dict(zip(labels, p)))
            for name, labels, p in zip(self.adapters, self.labels, probs)
        ]


class AdapterBank:
    """One base task model, many adapters: ``load``/``unload``/``names``, and ``bank(inputs, adapter=...)``.

    Takes ownership of ``model`` (its linear layers are wrapped and its head replaced in place; a causal LM
    keeps its LM head). ``base`` (an HF folder, 'minilm' or 'smollm2') enables the fingerprint check on load;
    ``tokenizer`` enables :meth:`classify` (or, on a causal LM, :meth:`generate`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        base: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_length: int = 128,
    ):
        if hasattr(model, CONFIG_ATTR):
            raise ConfigError("the model has a Quantum-PEFT adapter attached; detach() it before banking it")
        self.causal = is_causal_lm(model)
        head = None if self.causal else find_head(model)
        if not self.causal and (head is None or not isinstance(model.get_submodule(head), nn.Linear)):
            raise ConfigError(
                f"{type(model).__name__}: the bank needs a task model with an nn.Linear head or a causal LM"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.head_name = head
        self.hidden = None if head is None else model.get_submodule(head).in_features
        self.base_dir = resolve_base(base) if base is not None else None
        self.base_name = base if base is not None else type(model).__name__
        self.cache = FactorCache(cache_bytes)
        self._layers = self._wrap_layers()
        if head is not None:
            setattr(model, head, BankHead(self.hidden))
        self._adapters: dict[str, _Adapter] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._digests: dict[str, bytes] = {}  # base digests that matched an adapter's
        self._default: str | None = None
        self._lock, self._tokenizer_lock = threading.Lock(), threading.Lock()

    @classmethod
    def from_pretrained(cls, base: str, **kwargs) -> AdapterBank:
        """A bank on the task model and tokenizer of ``base`` (an HF folder, 'minilm' or 'smollm2'): the causal
        LM of a causal-LM base (which serves :meth:`generate`), else the classification task model."""
        model = load_causal_lm(base) if is_causal_base(base) else load_task_model(base, {0: "unused"})
        return cls(model, load_tokenizer(base), base=base, **kwargs)

    def _wrap_layers(self) -> dict[str, BankLinear]:
        layers = {}
        for name in find_target_modules(self.model, ALL_LINEAR):
            key = weight_key(self.model, name)
            parent, _, child = name.rpartition(".")
            layers[key] = BankLinear(self.model.get_submodule(name), key)
            setattr(self.model.get_submodule(parent), child, layers[key])
        return layers

    # ------------------------------------------------------------------------------- load, unload, names

    def load(self, name: str, path: str | Path, *, force: bool = False) -> None:
        """Load (or atomically replace) adapter ``name`` from a .qpeft file or a PEFT-native folder; the base is
        never reloaded."""
        check_name(name)
        file = read_adapter(path)
        check_task(file.config, path, self.base_name, self.causal)
        self._check_base(file, path, force)
        adapter = self._adapter(name, file, path)
        with self._lock:
            old = self._adapters.get(name)
            self._adapters[name] = adapter
        if old is not None:
            self.cache.drop(old)

    def unload(self, name: str) -> None:
        """Forget adapter ``name`` (calls already running keep using it); clears the default if it was."""
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is not None and self._default == name:
                self._default = None
        if adapter is None:
            raise ConfigError(f"no adapter named {str(name)[:60]!r} is loaded")
        self.cache.drop(adapter)

    def names(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        with self._lock:
            return list(self._adapters)

    def labels(self, name: str) -> list[str]:
        """The label names of adapter ``name``."""
        with self._lock:
            return list(self._get(name).labels)

    def warm(self, name: str) -> None:
        """Materialise adapter ``name``'s U and V now (into the cache) instead of on its first call."""
        with self._lock:
            adapter = self._get(name)
        self.cache.frames(adapter)

    @property
    def default(self) -> str | None:
        """The adapter that rows naming None use (None: such rows are refused)."""
        return self._default

    @default.setter
    def default(self, name: str | None) -> None:
        with self._lock:
            if name is not None:
                self._get(name)
            self._default = name

    def memory(self) -> dict[str, int]:
        """Loaded adapters, their resident tensor bytes, and the U/V cache's entries and bytes."""
        with self._lock:
            adapters = list(self._adapters.values())
        return {
            "adapters": len(adapters),
            "adapter_bytes": sum(a.nbytes() for a in adapters),
            "cached_adapters": len(self.cache),
            "cache_bytes": self.cache.nbytes,
        }

    def _get(self, name: object) -> _Adapter:
        if name is None:
            if self._default is None:
                raise ConfigError("a row names no adapter and the bank has no default adapter")
            name = self._default
        adapter = self._adapters.get(name) if isinstance(name, str) else None
        if adapter is None:
            raise ConfigError(f"no adapter named {str(name)[:60]!r} is loaded")
        return adapter

    def _check_base(self, file: AdapterFile, path: str | Path, force: bool) -> None:
        """Check the file's base digests against this bank's base (digests that matched are remembered)."""
        if self.base_dir is None or file.fingerprint is None:
            return
        unseen = {k: d for k, d in file.fingerprint.items() if self._digests.get(k) != d}
        trained_on = file.config.trained_on()
        if unseen and check_base(unseen, self.base_dir, source=path, trained_on=trained_on, force=force):
            self._digests.update(unseen)

    def _adapter(self, name: str, file: AdapterFile, path: str | Path) -> _Adapter:
        """Check the file against this bank's model and pack it into flat tensors."""
        config, shapes = file.config, file.shapes
        for key in config.targets:
            layer = self._layers.get(key)
            if layer is None:
                raise ConfigError(f"{path}: targets {key}, not an adaptable linear layer of the base")
            if tuple(shapes.get(key, ())) != (layer.out_features, layer.in_features):
                raise ConfigError(
                    f"{path}: {key} is {shapes.get(key)} in the adapter, "
                    f"{(layer.out_features, layer.in_features)} in the base"
                )
        weight, bias, labels = self._head(file, path)
        signature = _signature(file)
        if signature not in self._layouts:
            self._layouts[signature] = _layout(signature)
        layout = self._layouts[signature]
        params, scale = _flat(file, layout)
        for what, tensor in (("factor parameters", params), ("λ", scale), ("head", weight), ("head", bias)):
            if not torch.isfinite(tensor).all():
                raise ConfigError(f"{path}: {what} contain NaN or Inf")
        return _Adapter(name, layout, params, scale, weight, bias, labels)

    def _head(
        self, file: AdapterFile, path: str | Path
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        config, prefix = file.config, f"{self.head_name}."
        if self.causal:  # the causal LM's own head serves every adapter
            return torch.zeros(0, 0), torch.zeros(0), ()
        if config.head != self.head_name or not config.id2label:
            raise ConfigError(
                f"{path}: has no classification head named {self.head_name!r} "
                "(the bank serves classifiers; re-save the adapter with its head)"
            )
        head = {k[len(prefix) :]: t for k, t in file.state.items() if k.startswith(prefix)}
        labels = tuple(config.labels())
        expected = {"weight": (len(labels), self.hidden), "bias": (len(labels),)}
        if {k: tuple(t.shape) for k, t in head.items()} != expected:
            raise ConfigError(
                f"{path}: head tensors {sorted(head)} do not fit {len(labels)} labels on "
                f"{self.hidden} features"
            )
        return head["weight"].float().contiguous(), head["bias"].float().contiguous(), labels

    # ------------------------------------------------------------------------------- calling

    def __call__(self, inputs: Mapping[str, torch.Tensor], adapter: Names = None) -> BankOutput:
        """Classify tokenized ``inputs``; ``adapter``: one name for all rows, or a name (or None) per row."""
        self._check_classifier()
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0:
            raise ConfigError("inputs must be tokenized tensors with a non-empty 2-D input_ids")
        rows = self._resolve(adapter, ids.shape[0])
        plan = self._plan(rows)
        token = _PLAN.set(plan)
        try:
            with torch.inference_mode():
                logits = self.model(**inputs).logits
        finally:
            _PLAN.reset(token)
        return BankOutput(logits, [a.name for a in rows], [a.labels for a in rows])

    def classify(self, texts: Sequence[str], adapter: Names = None) -> list[Prediction]:
        """Top label and scores for each text (texts are truncated to ``max_length`` tokens)."""
        self._check_classifier()
        if self.tokenizer is None:
            raise ConfigError("this bank has no tokenizer; pass one to AdapterBank(...) or call it on inputs")
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ConfigError("texts must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError("every text must be a string")
        with self._tokenizer_lock:  # a fast tokenizer must not be used by two threads at once
            inputs = tokenize(self.tokenizer, list(texts), self.max_length)
        return self(inputs, adapter).predictions()

    def _check_classifier(self) -> None:
        if self.causal:
            raise ConfigError(
                f"{self.base_name} is a causal language model: this bank generates (generate())"
            )

    def _resolve(self, adapter: Names, rows: int) -> list[_Adapter | None]:
        """Each row's adapter; on a causal LM a row naming None without a default is the base (None)."""
        names = [adapter] * rows if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(names) != rows:
            raise ConfigError(f"{len(names)} adapter names for a batch of {rows} rows")
        with self._lock:
            base = self.causal and self._default is None
            return [None if name is None and base else self._get(name) for name in names]

    def _plan(self, rows: list[_Adapter | None], stack: bool = False) -> CallPlan:
        frames = {a: self.cache.frames(a) for a in dict.fromkeys(rows) if a is not None}
        frames[None] = {}
        layers = {}
        for key, layer in self._layers.items():
            delta = layer_delta([frames[a].get(key) for a in rows], stack)
            if delta is not None:
                layers[layer] = delta
        return CallPlan(layers, None if self.causal else head_plan(rows))

    # ------------------------------------------------------------------------------- generating

    def generate(
        self,
        prompts: str | Sequence[str],
        adapter: Names = None,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Answer each prompt (a user turn of the chat template) with up to ``max_new_tokens`` tokens: greedy,
        or sampled at ``temperature`` > 0 with nucleus ``top_p`` from a generator seeded by ``seed``;
        ``adapter``: one name for all rows, or a name (or None) per row. Every input is checked first."""
        prompts, rows, ids = self._generation_inputs(prompts, adapter, max_new_tokens, temperature, top_p)
        token = _PLAN.set(self._plan(rows, stack=True))  # one plan for every step: stack per-row frames once
        try:
            with torch.inference_mode():
                new = self._decode(ids, max_new_tokens, temperature, top_p, generator(seed))
        finally:
            _PLAN.reset(token)
        _, eos = self._special_ids()
        with self._tokenizer_lock:
            texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]
        return [
            answer(None if a is None else a.name, tokens, text, eos)
            for a, tokens, text in zip(rows, new, texts)
        ]

    def _generation_inputs(
        self, prompts: object, adapter: Names, max_new_tokens: object, temperature: object, top_p: object
    ) -> tuple[list[str], list[_Adapter | None], list[list[int]]]:
        """(prompts, each row's adapter, each prompt's token ids), or ConfigError for any bad input."""
        if not self.causal:
            raise ConfigError(f"{self.base_name} is not a causal language model: this bank classifies")
        if self.tokenizer is None:
            raise ConfigError("this bank has no tokenizer; pass one to AdapterBank(...)")
        prompts = check_request(prompts, max_new_tokens, temperature, top_p)
        rows = self._resolve(adapter, len(prompts))
        with self._tokenizer_lock:
            ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        check_context(ids, max_new_tokens, getattr(self.model.config, "max_position_embeddings", None))
        return prompts, rows, ids

    def _special_ids(self) -> tuple[int, set[int]]:
        """(padding id, end-of-sequence ids): the generation config's, else the tokenizer's."""
        return special_ids(getattr(self.model, "generation_config", None), self.tokenizer)

    def _decode(
        self,
        ids: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
    ) -> list[list[int]]:
        """The new tokens of each row: the left-padded prompts in one forward, then one forward per token for
        the whole batch, reusing the KV cache; a finished row is padded until every row has finished."""
        from transformers import DynamicCache

        pad, eos = self._special_ids()
        width = max(map(len, ids))
        tokens = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, done = DynamicCache(), torch.zeros(len(ids), dtype=torch.bool)
        stop, new = torch.tensor(sorted(eos)), []
        for step in range(max_new_tokens):
            logits = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            tokens = next_tokens(logits.float(), temperature, top_p, generator).masked_fill(done, pad)
            new.append(tokens)
            done |= torch.isin(tokens, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            tokens, positions = tokens[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        steps = torch.stack(new, dim=1).tolist()
        return [until(row, eos) for row in steps]
