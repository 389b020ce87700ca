"""Routing traces: the one reader/writer shared by the planner and the runtime's recorder.

Legend: L MoE layers, T tokens, K top-k, E experts.

A :class:`RoutingTrace` holds, per MoE layer, the ``[T, K]`` expert ids each token was
routed to (``-1`` = empty/dropped slot) and optionally the router weights.

Formats read by :func:`read_trace` (autodetected from the file's first bytes):

* **moekit trace** (``.npz``; written by :meth:`RoutingTrace.save`): a zip written with
  ``np.savez_compressed`` holding

  - ``format``: the string ``"moekit-trace"``
  - ``version``: the integer ``1``
  - ``meta_json``: a JSON string with ``num_experts``, ``top_k``, ``num_layers``,
    ``aligned``, ``has_weights`` and the free-form ``meta`` dict (model, layer_names,
    expert_bytes (a list per layer), source, ...)
  - ``topk_ids_{l}`` for each layer ``l``: int32 ``[T_l, K]``
  - ``topk_weights_{l}`` (only when weights are present): float32 ``[T_l, K]``

* **route_trace v1 CSV** (BigMoeOnEdge): ``#`` header lines (``n_layer``, ``n_expert``,
  ``n_expert_used``, per layer ``expert_bytes``), then rows
  ``turn,phase,step,layer,slot,expert,weight,...``. A token is ``(turn, phase, step)``;
  tokens align across layers by that key (a token missing in a layer gets ``-1`` ids).
* **Mixtral JSON** (HD-MoE): ``{"0": [[e1, e2], ...], "1": ...}``, one top-k list per
  token and layer, tokens aligned across layers by index.

A file that does not parse raises :class:`TraceFormatError` (a ``ValueError``) naming the
file, the line where known, and the reason.

This module is numpy-only (the planner never imports torch).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["RoutingTrace", "TraceFormatError", "read_trace", "concat_traces",
           "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "moekit-trace"
FORMAT_VERSION = 1


class TraceFormatError(ValueError):
    """A trace file that does not parse: names the file, the line (where known) and the reason."""

    def __init__(self, path, reason: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {reason}")


@dataclass
class RoutingTrace:
    """Per-layer top-k routing of a token stream.

    ``topk_ids[l]`` is int32 ``[T_l, K]`` (``-1`` = empty/dropped slot);
    ``topk_weights[l]`` float32 ``[T_l, K]`` or ``topk_weights is None``.
    ``meta`` is free-form (model, layer_names, expert_bytes, source, ...). Set
    ``meta["aligned"] = False`` when the same row index does not denote the same token in
    every layer.
    """

    topk_ids: list[np.ndarray]
    topk_weights: list[np.ndarray] | None
    num_experts: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.topk_ids, (list, tuple)) or len(self.topk_ids) == 0:
            raise ValueError("topk_ids must be a non-empty list of [T, K] arrays (one per MoE layer)")
        ids = []
        for l, a in enumerate(self.topk_ids):
            a = np.asarray(a)
            if a.ndim != 2:
                raise ValueError(f"topk_ids[{l}] must be 2-D [T, K], got shape {a.shape}")
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"topk_ids[{l}] must hold integers, got {a.dtype}")
            ids.append(a.astype(np.int32, copy=False))
        ks = {a.shape[1] for a in ids}
        if len(ks) != 1:
            raise ValueError(f"all layers must have the same top-k, got {sorted(ks)}")
        self.topk_ids = ids
        if int(self.num_experts) <= 0:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        self.num_experts = int(self.num_experts)
        for l, a in enumerate(ids):
            if a.size and (a.max() >= self.num_experts or a.min() < -1):
                raise ValueError(f"topk_ids[{l}] holds ids outside [-1, {self.num_experts - 1}]")
        if self.topk_weights is not None:
            if len(self.topk_weights) != len(ids):
                raise ValueError("topk_weights must have one array per layer")
            ws = []
            for l, (w, a) in enumerate(zip(self.topk_weights, ids)):
                w = np.asarray(w, dtype=np.float32)
                if w.shape != a.shape:
                    raise ValueError(f"topk_weights[{l}] shape {w.shape} != topk_ids shape {a.shape}")
                ws.append(w)
            self.topk_weights = ws
        self.meta = dict(self.meta or {})

    # --- properties -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.topk_ids)

    @property
    def top_k(self) -> int:
        return int(self.topk_ids[0].shape[1])

    @property
    def num_tokens(self) -> list[int]:
        return [int(a.shape[0]) for a in self.topk_ids]

    @property
    def aligned(self) -> bool:
        """True when row t of every layer is the same token (same T everywhere and the source says so)."""
        return len(set(self.num_tokens)) == 1 and bool(self.meta.get("aligned", True))

    def layers(self, idx) -> "RoutingTrace":
        """A trace restricted to the given layer indices (a slice or a list)."""
        if isinstance(idx, slice):
            idx = list(range(self.num_layers))[idx]
        idx = list(idx)
        meta = dict(self.meta)
        for key in ("expert_bytes", "layer_names", "dense_bytes"):
            if isinstance(meta.get(key), list) and len(meta[key]) == self.num_layers:
                meta[key] = [meta[key][i] for i in idx]
        return RoutingTrace([self.topk_ids[i] for i in idx],
                            None if self.topk_weights is None else [self.topk_weights[i] for i in idx],
                            self.num_experts, meta)

    def tokens(self, start: int, stop: int) -> "RoutingTrace":
        """Rows [start, stop) of every layer (meaningful for aligned traces)."""
        return RoutingTrace([a[start:stop] for a in self.topk_ids],
                            None if self.topk_weights is None else [w[start:stop] for w in self.topk_weights],
                            self.num_experts, dict(self.meta))

    # --- writing ----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write moekit's own ``.npz`` format (see the module docstring)."""
        header = {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_layers": self.num_layers,
            "aligned": self.aligned,
            "has_weights": self.topk_weights is not None,
            "meta": to_jsonable(self.meta),
        }
        arrays = {
            "format": np.array(FORMAT_NAME),
            "version": np.array(FORMAT_VERSION, dtype=np.int64),
            "meta_json": np.array(json.dumps(header)),
        }
        for l, a in enumerate(self.topk_ids):
            arrays[f"topk_ids_{l}"] = a.astype(np.int32)
            if self.topk_weights is not None:
                arrays[f"topk_weights_{l}"] = self.topk_weights[l].astype(np.float32)
        path = os.fspath(path)
        with open(path, "wb") as f:  # a file object: numpy does not append ".npz"
            np.savez_compressed(f, **arrays)


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# --- reading ---------------------------------------------------------------------------
def read_trace(path) -> RoutingTrace:
    """Read a trace file, autodetecting moekit ``.npz``, route_trace v1 CSV or Mixtral JSON."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    if path.is_dir():
        raise TraceFormatError(path, "is a directory, not a trace file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] == b"PK":
        return _read_npz(path)
    stripped = head.lstrip()
    if stripped[:1] in (b"{",):
        return _read_mixtral_json(path)
    if stripped.startswith(b"#") or stripped.startswith(b"turn,"):
        return _read_route_csv(path)
    if not head.strip():
        raise TraceFormatError(path, "empty file", line=1)
    raise TraceFormatError(path, "unrecognised trace format (expected a moekit .npz, a route_trace v1 CSV "
                                 "or a Mixtral JSON object)", line=1)


def _read_npz(path: Path) -> RoutingTrace:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt zip
        raise TraceFormatError(path, f"not a readable .npz: {exc}") from None
    with z:
        if "format" not in z.files or str(z["format"]) != FORMAT_NAME:
            raise TraceFormatError(path, f"an .npz without format={FORMAT_NAME!r}: not a moekit trace")
        try:
            version = int(z["version"])
        except Exception:
            raise TraceFormatError(path, "missing or bad 'version'") from None
        if version != FORMAT_VERSION:
            raise TraceFormatError(path, f"unsupported moekit trace version {version} "
                                         f"(this reader supports version {FORMAT_VERSION})")
        try:
            header = json.loads(str(z["meta_json"]))
            L = int(header["num_layers"])
            E = int(header["num_experts"])
        except Exception as exc:
            raise TraceFormatError(path, f"bad meta_json: {exc}") from None
        ids, ws = [], []
        has_w = bool(header.get("has_weights", "topk_weights_0" in z.files))
        for l in range(L):
            key = f"topk_ids_{l}"
            if key not in z.files:
                raise TraceFormatError(path, f"missing array {key} (num_layers={L})")
            ids.append(np.asarray(z[key], dtype=np.int32))
            if has_w:
                wk = f"topk_weights_{l}"
                if wk not in z.files:
                    raise TraceFormatError(path, f"missing array {wk}")
                ws.append(np.asarray(z[wk], dtype=np.float32))
    meta = dict(header.get("meta") or {})
    meta["aligned"] = bool(header.get("aligned", meta.get("aligned", True)))
    meta.setdefault("source", str(path))
    meta.setdefault("format", "moekit-trace v1")
    try:
        return RoutingTrace(ids, ws if has_w else None, E, meta)
    except (ValueError, TypeError) as exc:
        raise TraceFormatError(path, str(exc)) from None


def _read_mixtral_json(path: Path) -> RoutingTrace:
    text = path.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    if not isinstance(obj, dict) or not obj:
        raise TraceFormatError(path, "expected a non-empty JSON object {\"0\": [[e1, e2], ...], ...}", line=1)
    try:
        keys = sorted(obj, key=lambda k: int(k))
    except ValueError:
        bad = next(k for k in obj if not re.fullmatch(r"-?\d+", str(k)))
        raise TraceFormatError(path, f"layer key {bad!r} is not an integer", line=_find_line(text, f'"{bad}"')) from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise TraceFormatError(path, f"layer keys must be 0..{len(keys) - 1}, got {keys[:5]}...", line=1)
    ids = []
    for k in keys:
        rows = obj[k]
        try:
            a = np.asarray(rows)
            if a.ndim != 2 or a.shape[0] == 0:
                raise ValueError(f"expected a non-empty list of equal-length expert-id lists, got shape {a.shape}")
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"expert ids must be integers, got {a.dtype}")
            if a.min() < -1:
                raise ValueError(f"negative expert id {int(a.min())}")
        except ValueError as exc:
            raise TraceFormatError(path, f"layer {k}: {exc}", line=_find_line(text, f'"{k}"')) from None
        ids.append(a.astype(np.int32))
    E = int(max(int(a.max()) for a in ids)) + 1
    model = "Mixtral-8x7B" if E == 8 and ids[0].shape[1] == 2 else None
    meta = {"source": str(path), "format": "mixtral-json", "aligned": True}
    if model:
        meta["model"] = model
    try:
        return RoutingTrace(ids, None, E, meta)
    except (ValueError, TypeError) as exc:
        raise TraceFormatError(path, str(exc)) from None


def _find_line(text: str, needle: str) -> int | None:
    i = text.find(needle)
    return None if i < 0 else text.count("\n", 0, i) + 1


_KV = re.compile(r"(\w+)=(\S+)")
_CSV_COLS = ("turn", "phase", "step", "layer", "slot", "expert")


def _read_route_csv(path: Path) -> RoutingTrace:
    hdr: dict[str, str] = {}
    layer_bytes: dict[int, int] = {}
    dense_bytes: dict[int, int] = {}
    columns = None
    rows: list[tuple[int, int, int, int, int, int, float]] = []
    version_ok = False
    with open(path, "r", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s:
                continue
            if s.startswith("#"):
                body = s[1:].strip()
                if body.startswith("route_trace"):
                    if body.split()[1:2] != ["v1"]:
                        raise TraceFormatError(path, f"unsupported route_trace version {body!r} (expected v1)", lineno)
                    version_ok = True
                    continue
                kv = dict(_KV.findall(body))
                if "layer" in kv and "expert_bytes" in kv:
                    try:
                        layer_bytes[int(kv["layer"])] = int(kv["expert_bytes"])
                        if "dense_bytes" in kv:
                            dense_bytes[int(kv["layer"])] = int(kv["dense_bytes"])
                    except ValueError:
                        raise TraceFormatError(path, f"bad layer header {body!r}", lineno) from None
                else:
                    hdr.update(kv)
                continue
            if columns is None:
                columns = [c.strip() for c in s.split(",")]
                missing = [c for c in _CSV_COLS if c not in columns]
                if missing:
                    raise TraceFormatError(path, f"header row lacks column(s) {missing}; got {columns}", lineno)
                idx = [columns.index(c) for c in _CSV_COLS]
                widx = columns.index("weight") if "weight" in columns else None
                ncol = len(columns)
                continue
            parts = s.split(",")
            if len(parts) != ncol:
                raise TraceFormatError(path, f"expected {ncol} fields, got {len(parts)}", lineno)
            try:
                vals = tuple(int(parts[i]) for i in idx)
                w = float(parts[widx]) if widx is not None else float("nan")
            except ValueError:
                raise TraceFormatError(path, f"non-numeric field in {s!r}", lineno) from None
            rows.append(vals + (w,))
            if vals[3] < 0 or vals[4] < 0 or vals[5] < -1:
                raise TraceFormatError(path, f"negative layer/slot/expert in {s!r}", lineno)
    if columns is None or not rows:
        raise TraceFormatError(path, "no data rows (expected a 'turn,phase,step,layer,slot,expert,...' header and rows)")
    if not version_ok:
        raise TraceFormatError(path, "missing '# route_trace v1' header line", 1)
    a = np.asarray([r[:6] for r in rows], dtype=np.int64)
    wts = np.asarray([r[6] for r in rows], dtype=np.float32)
    try:
        L = int(hdr["n_layer"]) if "n_layer" in hdr else int(a[:, 3].max()) + 1
        E = int(hdr["n_expert"]) if "n_expert" in hdr else int(a[:, 5].max()) + 1
        K = int(hdr["n_expert_used"]) if "n_expert_used" in hdr else int(a[:, 4].max()) + 1
    except ValueError as exc:
        raise TraceFormatError(path, f"bad header value: {exc}", 2) from None
    for col, lim, name in ((3, L, "layer"), (4, K, "slot"), (5, E, "expert")):
        bad = np.nonzero(a[:, col] >= lim)[0]
        if bad.size:
            raise TraceFormatError(path, f"{name} {int(a[bad[0], col])} >= {lim} from the header",
                                   _data_line(path, int(bad[0])))
    # tokens: (turn, phase, step) in order of first appearance
    key = a[:, 0] * (1 << 40) + a[:, 1] * (1 << 32) + a[:, 2]
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    tok = rank[inv]
    T = uniq.size
    ids = np.full((L, T, K), -1, dtype=np.int32)
    ws = np.zeros((L, T, K), dtype=np.float32)
    ids[a[:, 3], tok, a[:, 4]] = a[:, 5]
    ws[a[:, 3], tok, a[:, 4]] = np.nan_to_num(wts)
    meta = {
        "source": str(path), "format": "route_trace v1", "aligned": True,
        "model": hdr.get("model"), "arch": hdr.get("arch"),
        # per token (in row order): 0 prefill, 1 decode; and the step column (cache replay needs both)
        "phase": a[first[order], 1].astype(int).tolist(), "step": a[first[order], 2].astype(int).tolist(),
    }
    if layer_bytes:
        meta["expert_bytes"] = [int(layer_bytes.get(l, 0)) for l in range(L)]
    if dense_bytes:
        meta["dense_bytes"] = [int(dense_bytes.get(l, 0)) for l in range(L)]
    return RoutingTrace([ids[l] for l in range(L)], [ws[l] for l in range(L)] if widx is not None else None, E, meta)


def _data_line(path: Path, row: int) -> int | None:
    """1-based file line of the row-th data row (for error messages)."""
    seen = -1
    with open(path) as f:
        header_seen = False
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if not header_seen:
                header_seen = True
                continue
            seen += 1
            if seen == row:
                return lineno
    return None


def concat_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """Concatenate traces of the same model along the token axis (aligned stays aligned)."""
    if not traces:
        raise ValueError("concat_traces needs at least one trace")
    if len(traces) == 1:
        return traces[0]
    t0 = traces[0]
    for t in traces[1:]:
        if t.num_layers != t0.num_layers or t.num_experts != t0.num_experts or t.top_k != t0.top_k:
            raise ValueError(
                f"traces differ in shape: layers {t.num_layers} vs {t0.num_layers}, experts "
                f"{t.num_experts} vs {t0.num_experts}, top-k {t.top_k} vs {t0.top_k}")
    ids = [np.concatenate([t.topk_ids[l] for t in traces]) for l in range(t0.num_layers)]
    ws = None
    if all(t.topk_weights is not None for t in traces):
        ws = [np.concatenate([t.topk_weights[l] for t in traces]) for l in range(t0.num_layers)]
    meta = dict(t0.meta)
    meta["source"] = [t.meta.get("source") for t in traces]
    meta["aligned"] = all(t.aligned for t in traces)
    return RoutingTrace(ids, ws, t0.num_experts, meta)
