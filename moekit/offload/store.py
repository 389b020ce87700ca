"""Expert store: every routed expert of an HF checkpoint in a slow tier, one blob per expert.

Legend: L MoE layers, E experts per layer, D model dim, F expert hidden dim, H = 2F (GLU) or F.

Layout of a store directory (written by :func:`convert_checkpoint`)::

    index.json          format, version, config hash, dtype, per MoE layer: module name, decoder
                        layer, file, E, w_in [H, D], w_out [D, F], blob bytes, offsets, crc32s
    layer_000.bin ...   one file per MoE layer; expert e's blob at offsets[e] (4096-aligned):
                        w_in [H, D] (gate rows first) then w_out [D, F], row-major, moekit's
                        orientation (the layer's ``experts.w_in[e]`` / ``experts.w_out[e]``)

``index.json`` is written last (atomically), so a directory without it is an unfinished
conversion, never a store.

Tiers:

- :class:`DiskStore` reads one blob with one ``pread`` into memory it allocates for that blob
  (a torch tensor it hands over). ``page_cache`` decides what the OS may keep:

  - ``"keep"``: ordinary buffered reads; repeated reads may come from the page cache, which
    is RAM the expert budget does not count (fine for use, dishonest for a disk benchmark).
  - ``"drop"`` (honest, works on any file system with a page cache): the file is opened with
    ``POSIX_FADV_RANDOM`` (no read-ahead pulls neighbouring blobs in) and each read is
    followed by ``POSIX_FADV_DONTNEED`` on the blob's range, so the next read of any blob
    goes to the device. Chosen as the default for benchmarks because it needs no alignment
    and still lets the kernel do the I/O.
  - ``"direct"``: ``O_DIRECT``, the page cache is bypassed entirely. Needs 4096-aligned
    offsets, lengths and memory: blobs are padded to 4096 and read into the page-aligned part
    of a slightly larger torch tensor allocated for the read, then copied into the returned
    tensor (one memcpy, cheap next to the read; the returned tensor is exactly the blob's size). Refused with a clear error where the file system does
    not support it (tmpfs).

- :class:`RamStore`: every expert held in host memory (pinned when CUDA is present), read
  from a :class:`DiskStore` once; the slow tier of a GPU machine whose experts fit in RAM.

Both give ``read(layer, expert, device=None) -> (w_in_HD, w_out_DF)`` (tensors the caller
owns) and count the bytes they move (``bytes_read``, ``read_seconds``).

Errors: a missing, truncated or corrupt index or blob raises :class:`StoreError` naming the
file (and the layer, expert and offset); a store written for another model (config hash) is
refused with :class:`StoreMismatchError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["StoreError", "StoreMismatchError", "StoreIndex", "LayerEntry", "DiskStore", "RamStore",
           "convert_checkpoint", "write_store", "open_store", "ensure_store", "config_hash", "default_store_dir",
           "PAGE_CACHE_MODES", "INDEX_NAME"]

FORMAT = "moekit-expert-store"
VERSION = 1
INDEX_NAME = "index.json"
ALIGN = 4096
PAGE_CACHE_MODES = ("keep", "drop", "direct")
# config.json fields that do not change the model (written by whichever transformers saved it)
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")

_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                        torch.float8_e4m3fn, torch.float8_e5m2)}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class StoreError(RuntimeError):
    """A store (or the checkpoint it is converted from) is missing, truncated or corrupt."""


class StoreMismatchError(StoreError):
    """The store was written for another model."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ---- index ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerEntry:
    """One MoE layer of the store. ``layer`` is its ordinal among the model's MoE layers (the
    index the cache uses); ``module`` its qualified name in the patched model."""

    layer: int
    module: str
    decoder_layer: int
    file: str
    num_experts: int
    w_in_shape: tuple[int, int]    # [H, D]
    w_out_shape: tuple[int, int]   # [D, F]
    blob_bytes: int                # bytes of one expert's w_in + w_out
    offsets: tuple[int, ...]       # per expert, 4096-aligned
    crc32: tuple[int, ...]         # per expert, of its blob_bytes

    @property
    def w_in_bytes(self) -> int:
        return self.blob_bytes * (self.w_in_shape[0] * self.w_in_shape[1]) // \
            (self.w_in_shape[0] * self.w_in_shape[1] + self.w_out_shape[0] * self.w_out_shape[1])

    @property
    def file_bytes(self) -> int:
        """Size the layer file must have: up to the end of its last (padded) blob."""
        return max(self.offsets) + _align(self.blob_bytes)


@dataclass(frozen=True)
class StoreIndex:
    config_hash: str
    dtype: str
    activation: str
    top_k: int
    layers: tuple[LayerEntry, ...]
    model_type: str = ""
    source: str = ""
    format: str = FORMAT
    version: int = VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def expert_bytes(self) -> list[int]:
        """Bytes of one expert, per MoE layer (what :class:`~moekit.offload.ExpertCache` takes)."""
        return [e.blob_bytes for e in self.layers]

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def total_bytes(self) -> int:
        return sum(e.blob_bytes * e.num_experts for e in self.layers)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1)

    @classmethod
    def load(cls, path: Path) -> "StoreIndex":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise StoreError(f"{path}: no expert-store index (not a store, or its conversion did not finish)") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the expert-store index: {exc}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: corrupt or truncated expert-store index ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StoreError(f"{path}: not a moekit expert-store index (format {d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("version") != VERSION:
            raise StoreError(f"{path}: expert-store version {d.get('version')!r}; this moekit reads version {VERSION}")
        try:
            layers = tuple(LayerEntry(layer=int(l["layer"]), module=str(l["module"]),
                                      decoder_layer=int(l["decoder_layer"]), file=str(l["file"]),
                                      num_experts=int(l["num_experts"]), w_in_shape=tuple(l["w_in_shape"]),
                                      w_out_shape=tuple(l["w_out_shape"]), blob_bytes=int(l["blob_bytes"]),
                                      offsets=tuple(int(o) for o in l["offsets"]),
                                      crc32=tuple(int(c) for c in l["crc32"]))
                           for l in d["layers"])
            index = cls(config_hash=str(d["config_hash"]), dtype=str(d["dtype"]), activation=str(d["activation"]),
                        top_k=int(d["top_k"]), layers=layers, model_type=str(d.get("model_type", "")),
                        source=str(d.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path}: corrupt expert-store index (bad or missing field: {exc!r})") from None
        index._validate(path)
        return index

    def _validate(self, path: Path) -> None:
        if self.dtype not in _DTYPES:
            raise StoreError(f"{path}: unknown dtype {self.dtype!r}")
        if not self.layers:
            raise StoreError(f"{path}: the index lists no MoE layer")
        esize = _DTYPES[self.dtype].itemsize
        for i, e in enumerate(self.layers):
            (H, D), (D2, Fh) = e.w_in_shape, e.w_out_shape
            want = (H * D + D2 * Fh) * esize
            if (e.layer != i or D != D2 or e.blob_bytes != want or len(e.offsets) != e.num_experts
                    or len(e.crc32) != e.num_experts or any(o % ALIGN for o in e.offsets)):
                raise StoreError(f"{path}: corrupt entry for MoE layer {i} ({e.file}): shapes, sizes or offsets "
                                 f"do not agree")


def config_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of the model's ``config.json`` (keys sorted; fields that only record who saved it
    left out): identifies the model a store was written for."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (is {model_dir} a Hugging Face model directory?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable or corrupt ({exc})") from None
    for k in _VOLATILE_CONFIG_KEYS:
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_store_dir(model_dir: str | os.PathLike) -> Path:
    """Where ``moekit run`` keeps a model's store when none is given: a folder next to the
    model directory, ``<model_dir>.moekit-experts``."""
    p = Path(model_dir).resolve()
    return p.parent / f"{p.name}.moekit-experts"


# ---- reading the checkpoint (conversion) ----------------------------------------------------------

# HF checkpoint keys of routed experts, per MoE block prefix (the part before ".experts."):
# fused (transformers 5.x in memory, and moekit's own export of fused blocks)
_FUSED_KEY = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<name>gate_up_proj|down_proj)$")
# per expert (Hub checkpoints; transformers 5.x save_pretrained writes these)
_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<name>[A-Za-z0-9_]+)\.weight$")
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StoreError(f"{index}: corrupt safetensors index ({exc!r})") from None
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise StoreError(f"{model_dir}: no safetensors checkpoint (model.safetensors or an index)")
    return found


def _moe_layers_of(model_dir: Path):
    """[(module name, decoder layer, MoEConfig, HFSpec)] of the model's MoE blocks, read from
    the model built on the meta device (no weights): moekit.hf decides what is an MoE block."""
    import transformers

    from moekit import hf as H

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    out = []
    for name, block, family in H._find_blocks(model):
        cfg, spec = H._read_block(block, family, "loop")
        m = _DECODER_LAYER.search(name + ".")
        if m is None:
            raise StoreError(f"{model_dir}: MoE block {name} is not inside a numbered decoder layer (layers.N)")
        out.append((name, int(m.group(1)), cfg, spec))
    if not out:
        raise StoreError(f"{model_dir}: the model ({type(model).__name__}) has no MoE block moekit.hf supports")
    return out, config


class _Checkpoint:
    """The safetensors files of a checkpoint, opened lazily; tensors read by key."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self.key_file: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except FileNotFoundError:
                raise StoreError(f"{f}: checkpoint file missing") from None
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise StoreError(f"{f}: corrupt or truncated safetensors file ({exc})") from None
            self._open[f] = h
            for k in keys:
                self.key_file[k] = f

    def get(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        f = self.key_file[key]
        try:
            sl = self._open[f].get_slice(key)
            t = sl[index] if index is not None else sl[:]
        except Exception as exc:
            raise StoreError(f"{f}: cannot read tensor {key} ({exc}); the file is truncated or corrupt") from None
        return t

    def dtype(self, key: str) -> torch.dtype:
        f = self.key_file[key]
        d = self._open[f].get_slice(key).get_dtype()
        if d not in _SAFETENSORS_DTYPES:
            raise StoreError(f"{f}: tensor {key} has dtype {d}, which the expert store does not handle")
        return _SAFETENSORS_DTYPES[d]


def _expert_keys(ckpt: _Checkpoint, layers) -> list[dict]:
    """Per MoE layer, how to read expert e: {"kind": "fused", "gate_up", "down"} or
    {"kind": "per_expert", "gate", "up", "down": formats with {e}}."""
    from moekit import hf as H

    by_layer: dict[int, dict[str, set]] = {}
    for key in ckpt.key_file:
        m = _FUSED_KEY.match(key) or _PER_EXPERT_KEY.match(key)
        if m is None:
            continue
        d = _DECODER_LAYER.search(m.group("prefix") + ".")
        if d is None:
            continue
        by_layer.setdefault(int(d.group(1)), {}).setdefault(m.group("prefix"), set()).add(key)
    plans = []
    for name, dec, cfg, _ in layers:
        prefixes = by_layer.get(dec, {})
        if len(prefixes) != 1:
            where = f"{len(prefixes)} expert key prefixes ({sorted(prefixes)})" if prefixes else "no expert keys"
            raise StoreError(f"checkpoint {[str(f) for f in ckpt.files]}: MoE layer {name} (decoder layer {dec}) "
                             f"has {where}")
        prefix, keys = next(iter(prefixes.items()))
        fused = (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj")
        if all(k in keys for k in fused):
            plans.append({"kind": "fused", "gate_up": fused[0], "down": fused[1]})
            continue
        for g, u, dn in H._PER_EXPERT_NAMES.values():
            fmt = {n: f"{prefix}.experts.{{e}}.{n}.weight" for n in (g, u, dn)}
            if all(fmt[n].format(e=e) in keys for n in (g, u, dn) for e in range(cfg.num_experts)):
                plans.append({"kind": "per_expert", "gate": fmt[g], "up": fmt[u], "down": fmt[dn]})
                break
        else:
            raise StoreError(f"checkpoint {[str(f) for f in ckpt.files]}: cannot find all {cfg.num_experts} experts of "
                             f"{prefix} in a known layout (fused gate_up_proj/down_proj, or per expert "
                             f"{' / '.join('{' + ','.join(v) + '}' for v in H._PER_EXPERT_NAMES.values())})")
    return plans


def _read_expert(ckpt: _Checkpoint, plan: dict, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    if plan["kind"] == "fused":
        return ckpt.get(plan["gate_up"], e), ckpt.get(plan["down"], e)
    gate, up = ckpt.get(plan["gate"].format(e=e)), ckpt.get(plan["up"].format(e=e))
    return torch.cat([gate, up], 0), ckpt.get(plan["down"].format(e=e))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _write_layer(store_dir: Path, l: int, name: str, dec: int, cfg, dtype: torch.dtype, get_expert,
                 where: str, bar) -> "LayerEntry":
    """Write ``layer_{l}.bin``: expert e's ``get_expert(e) -> (w_in [H, D], w_out [D, F])`` blobs,
    shapes and dtype checked against ``cfg`` (a MoEConfig); returns the layer's index entry."""
    Fh, D, E = cfg.ffn_hidden_size, cfg.hidden_size, cfg.num_experts
    H = 2 * Fh if cfg.is_glu else Fh
    blob = (H * D + D * Fh) * dtype.itemsize
    stride = _align(blob)
    fname = f"layer_{l:03d}.bin"
    offsets, crcs = [], []
    with open(store_dir / fname, "wb") as f:
        for e in range(E):
            w_in, w_out = get_expert(e)
            for t, shape, what in ((w_in, (H, D), "w_in (gate rows, then up rows)"),
                                   (w_out, (D, Fh), "w_out (down)")):
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise StoreError(f"{where}: {name} expert {e} {what} has shape {tuple(t.shape)} {t.dtype}, "
                                     f"expected {shape} {dtype}")
            a, b = _as_bytes(w_in), _as_bytes(w_out)
            offsets.append(e * stride)
            crcs.append(zlib.crc32(b, zlib.crc32(a)))
            f.write(a)
            f.write(b)
            f.write(bytes(stride - blob))
            bar.update(1)
    return LayerEntry(layer=l, module=name, decoder_layer=dec, file=fname, num_experts=E, w_in_shape=(H, D),
                      w_out_shape=(D, Fh), blob_bytes=blob, offsets=tuple(offsets), crc32=tuple(crcs))


def _write_index(store_dir: Path, index: "StoreIndex") -> None:
    tmp = store_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(index.to_json())
    os.replace(tmp, store_dir / INDEX_NAME)


def write_store(store_dir: str | os.PathLike, layers: Sequence, *, config_hash: str, source: str = "",
                model_type: str = "", progress: bool = False) -> "StoreIndex":
    """Write the store of an in-memory model that is no Hugging Face class (the demo's byte LM):
    ``layers`` is ``[(module name, decoder layer, MoELayer)]`` in MoE-layer order, each with
    in-memory :class:`~moekit.experts.GroupedExperts`; ``config_hash`` identifies the model (a
    :class:`DiskStore` opened with ``expect_config_hash`` refuses another). Same layout and
    checks as :func:`convert_checkpoint`."""
    from tqdm import tqdm

    store_dir = Path(store_dir)
    if not layers:
        raise ValueError("write_store needs at least one MoE layer")
    dtype = layers[0][2].experts.w_in.dtype
    store_dir.mkdir(parents=True, exist_ok=True)
    if (store_dir / INDEX_NAME).exists():
        (store_dir / INDEX_NAME).unlink()
    entries = []
    total = sum(layer.config.num_experts for _, _, layer in layers)
    with torch.no_grad(), tqdm(total=total, desc="expert store", unit="expert", file=sys.stderr,
                               disable=not progress) as bar:
        for l, (name, dec, layer) in enumerate(layers):
            ex = layer.experts
            entries.append(_write_layer(store_dir, l, name, int(dec), layer.config, dtype,
                                        lambda e, ex=ex: (ex.w_in[e].detach().cpu(), ex.w_out[e].detach().cpu()),
                                        f"model {source or '?'}", bar))
    cfg0 = layers[0][2].config
    index = StoreIndex(config_hash=config_hash, dtype=str(dtype).removeprefix("torch."), activation=cfg0.activation,
                       top_k=cfg0.top_k, layers=tuple(entries), model_type=model_type, source=source)
    _write_index(store_dir, index)
    return index


def convert_checkpoint(model_dir: str | os.PathLike, store_dir: str | os.PathLike, *,
                       progress: Optional[bool] = None) -> StoreIndex:
    """Write the per-expert store of the HF checkpoint in ``model_dir`` (config.json +
    safetensors, fused or per-expert keys) into ``store_dir``; returns its index.

    Reads one expert at a time (memory: one expert), checks every expert's shapes against the
    model's MoE blocks, and writes ``index.json`` last. ``progress``: a tqdm bar on stderr
    (default: when stderr is a terminal)."""
    from tqdm import tqdm

    model_dir, store_dir = Path(model_dir), Path(store_dir)
    chash = config_hash(model_dir)
    layers, hf_config = _moe_layers_of(model_dir)
    ckpt = _Checkpoint(_checkpoint_files(model_dir))
    plans = _expert_keys(ckpt, layers)
    first = plans[0]["gate_up"] if plans[0]["kind"] == "fused" else plans[0]["gate"].format(e=0)
    dtype = ckpt.dtype(first)
    store_dir.mkdir(parents=True, exist_ok=True)
    stale = store_dir / INDEX_NAME
    if stale.exists():
        stale.unlink()
    if progress is None:
        progress = sys.stderr.isatty()
    total = sum(cfg.num_experts for _, _, cfg, _ in layers)
    entries = []
    with tqdm(total=total, desc="expert store", unit="expert", file=sys.stderr, disable=not progress) as bar:
        for l, ((name, dec, cfg, _), plan) in enumerate(zip(layers, plans)):
            entries.append(_write_layer(store_dir, l, name, dec, cfg, dtype,
                                        lambda e, plan=plan: _read_expert(ckpt, plan, e),
                                        f"checkpoint {ckpt.files[0].parent}", bar))
    cfg0 = layers[0][2]
    index = StoreIndex(config_hash=chash, dtype=str(dtype).removeprefix("torch."), activation=cfg0.activation,
                       top_k=cfg0.top_k, layers=tuple(entries), model_type=str(getattr(hf_config, "model_type", "")),
                       source=str(model_dir.resolve()))
    _write_index(store_dir, index)
    return index


# ---- reading the store ---------------------------------------------------------------------------

class DiskStore:
    """Experts read from a store directory with ``pread`` (see the module docstring for
    ``page_cache``). ``verify``: check each blob's crc32 on every read (about 1.8 GB/s of one
    core here; off for I/O benchmarks that want the raw read). Thread-safe: reads may come
    from a prefetch thread."""

    def __init__(self, store_dir: str | os.PathLike, *, page_cache: str = "keep", verify: bool = True,
                 expect_config_hash: Optional[str] = None):
        if page_cache not in PAGE_CACHE_MODES:
            raise ValueError(f"page_cache must be one of {PAGE_CACHE_MODES}, got {page_cache!r}")
        self.dir = Path(store_dir)
        self.index = StoreIndex.load(self.dir / INDEX_NAME)
        if expect_config_hash is not None and expect_config_hash != self.index.config_hash:
            raise StoreMismatchError(
                f"{self.dir / INDEX_NAME}: this expert store was written for another model (config hash "
                f"{self.index.config_hash[:12]}..., source {self.index.source or '?'}); the model's is "
                f"{expect_config_hash[:12]}... Use another store directory or delete this one")
        self.page_cache, self.verify = page_cache, verify
        self.dtype = self.index.torch_dtype
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0
        self._lock = threading.Lock()
        self._files: list = []  # unbuffered file objects: Python closes them if close() is never called
        try:
            for e in self.index.layers:
                self._files.append(self._open(e))
        except BaseException:
            self.close()
            raise

    def _open(self, e: LayerEntry):
        path = self.dir / e.file
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if self.page_cache == "direct":
            if not hasattr(os, "O_DIRECT"):
                raise ValueError("page_cache='direct' needs O_DIRECT (Linux); use page_cache='drop'")
            flags |= os.O_DIRECT
        try:
            f = open(path, "rb", buffering=0, opener=lambda p, _: os.open(p, flags))
        except FileNotFoundError:
            raise StoreError(f"{path}: expert blob file of MoE layer {e.layer} is missing") from None
        except OSError as exc:
            if self.page_cache == "direct" and exc.errno == 22:
                raise StoreError(f"{path}: the file system refuses O_DIRECT (page_cache='direct'); "
                                 f"use page_cache='drop'") from None
            raise StoreError(f"{path}: cannot open ({exc})") from None
        fd = f.fileno()
        size = os.fstat(fd).st_size
        if size < e.file_bytes:
            f.close()
            raise StoreError(f"{path}: truncated expert blob file ({size} bytes, the index needs {e.file_bytes})")
        if self.page_cache == "drop":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return f

    @property
    def expert_bytes(self) -> list[int]:
        return self.index.expert_bytes

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _entry(self, layer: int, expert: int) -> LayerEntry:
        if not 0 <= layer < len(self.index.layers):
            raise ValueError(f"layer {layer} outside [0, {len(self.index.layers)})")
        e = self.index.layers[layer]
        if not 0 <= expert < e.num_experts:
            raise ValueError(f"expert {expert} outside [0, {e.num_experts}) in layer {layer}")
        return e

    def read(self, layer: int, expert: int, device: Optional[torch.device | str] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert`` of MoE layer ``layer``: ``(w_in [H, D], w_out [D, F])``, new tensors
        (views of one buffer) the caller owns; copied to ``device`` when given."""
        e = self._entry(layer, expert)
        fd = self._files[layer].fileno()
        off, n = e.offsets[expert], e.blob_bytes
        t0 = time.perf_counter()
        if self.page_cache == "direct":  # O_DIRECT: into the page-aligned part of a larger tensor
            stride = _align(n)
            raw = torch.empty(stride + ALIGN, dtype=torch.uint8)
            start = -raw.data_ptr() % ALIGN
            aligned = raw[start:start + stride]
            got = self._pread(fd, memoryview(aligned.numpy()), off, e)
            buf = aligned[:n].clone()
        else:
            buf = torch.empty(n, dtype=torch.uint8)
            got = self._pread(fd, memoryview(buf.numpy()), off, e)
            if self.page_cache == "drop":
                os.posix_fadvise(fd, off, _align(n), os.POSIX_FADV_DONTNEED)
        if got < n:
            raise StoreError(f"{self.dir / e.file}: truncated: expert {expert} of MoE layer {layer} at offset "
                             f"{off} needs {n} bytes, read {got}")
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += n
            self.reads += 1
            self.read_seconds += dt
        if self.verify:
            crc = zlib.crc32(memoryview(buf.numpy()))
            if crc != e.crc32[expert]:
                raise StoreError(f"{self.dir / e.file}: corrupt blob: expert {expert} of MoE layer {layer} at offset "
                                 f"{off} has crc32 {crc:#010x}, the index says {e.crc32[expert]:#010x}")
        return self._split(buf, e, device)

    def _pread(self, fd: int, mv: memoryview, off: int, e: LayerEntry) -> int:
        got = 0
        while got < len(mv):  # pread may return short on a signal or near the end of the file
            try:
                k = os.preadv(fd, [mv[got:]], off + got)
            except OSError as exc:
                raise StoreError(f"{self.dir / e.file}: read failed at offset {off + got} ({exc})") from None
            if k == 0:
                break
            got += k
        return got

    def _split(self, buf: torch.Tensor, e: LayerEntry, device) -> tuple[torch.Tensor, torch.Tensor]:
        n_in = e.w_in_bytes
        w_in = buf[:n_in].view(self.dtype).view(e.w_in_shape)
        w_out = buf[n_in:].view(self.dtype).view(e.w_out_shape)
        if device is not None and torch.device(device).type != "cpu":
            w_in, w_out = w_in.to(device, non_blocking=False), w_out.to(device, non_blocking=False)
        return w_in, w_out

    def verify_all(self, progress: bool = False) -> None:
        """Read every blob and check its crc32 (raises StoreError naming the first bad one)."""
        from tqdm import tqdm

        verify, self.verify = self.verify, True
        try:
            total = sum(e.num_experts for e in self.index.layers)
            with tqdm(total=total, desc="verify store", unit="expert", file=sys.stderr, disable=not progress) as bar:
                for e in self.index.layers:
                    for x in range(e.num_experts):
                        self.read(e.layer, x)
                        bar.update(1)
        finally:
            self.verify = verify


class RamStore:
    """Every expert held in host memory (pinned when ``pin`` and CUDA is available), read once
    from ``source``; ``read`` copies to ``device`` (none for CPU: the held tensors themselves,
    which the caller must not modify)."""

    def __init__(self, source: DiskStore, *, pin: Optional[bool] = None, progress: bool = False):
        from tqdm import tqdm

        self.index = source.index
        self.dtype = source.dtype
        pin = torch.cuda.is_available() if pin is None else pin
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0
        self._held: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        total = sum(e.num_experts for e in self.index.layers)
        with tqdm(total=total, desc="experts -> RAM", unit="expert", file=sys.stderr, disable=not progress) as bar:
            for e in self.index.layers:
                row = []
                for x in range(e.num_experts):
                    w_in, w_out = source.read(e.layer, x)
                    if pin:
                        w_in, w_out = w_in.pin_memory(), w_out.pin_memory()
                    row.append((w_in, w_out))
                    bar.update(1)
                self._held.append(row)

    @property
    def expert_bytes(self) -> list[int]:
        return self.index.expert_bytes

    def read(self, layer: int, expert: int, device: Optional[torch.device | str] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        w_in, w_out = self._held[layer][expert]
        if device is None or torch.device(device).type == "cpu":
            return w_in, w_out
        t0 = time.perf_counter()
        out = w_in.to(device, non_blocking=True), w_out.to(device, non_blocking=True)
        self.bytes_read += self.index.layers[layer].blob_bytes
        self.reads += 1
        self.read_seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self._held = []


def open_store(store_dir: str | os.PathLike, *, model_dir: Optional[str | os.PathLike] = None, tier: str = "disk",
               page_cache: str = "keep", verify: bool = True, progress: bool = False):
    """A :class:`DiskStore` (``tier="disk"``) or :class:`RamStore` (``tier="ram"``) over
    ``store_dir``; with ``model_dir``, refused unless it was written for that model."""
    if tier not in ("disk", "ram"):
        raise ValueError(f"tier must be 'disk' or 'ram', got {tier!r}")
    expect = config_hash(model_dir) if model_dir is not None else None
    disk = DiskStore(store_dir, page_cache=page_cache, verify=verify, expect_config_hash=expect)
    if tier == "disk":
        return disk
    try:
        return RamStore(disk, progress=progress)
    finally:
        disk.close()


def ensure_store(model_dir: str | os.PathLike, store_dir: Optional[str | os.PathLike] = None, *,
                 progress: Optional[bool] = None) -> Path:
    """The store directory of ``model_dir`` (default :func:`default_store_dir`), converted now
    if it has no index yet. An existing store for another model is refused, not overwritten."""
    store_dir = Path(store_dir) if store_dir is not None else default_store_dir(model_dir)
    index_path = store_dir / INDEX_NAME
    if index_path.exists():
        index = StoreIndex.load(index_path)
        want = config_hash(model_dir)
        if index.config_hash != want:
            raise StoreMismatchError(
                f"{index_path}: this expert store was written for another model (source {index.source or '?'}, "
                f"config hash {index.config_hash[:12]}..., {model_dir} has {want[:12]}...); pass another store "
                f"directory or delete this one")
        return store_dir
    convert_checkpoint(model_dir, store_dir, progress=progress)
    return store_dir
