"""moekit.offload.store: conversion from real HF safetensors checkpoints, reads in every page-cache
mode equal the in-memory experts bit for bit, and every error names the file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from _offload_models import load_reference, save_model  # noqa: E402
from moekit import hf as H  # noqa: E402
from moekit.layer import moe_layers  # noqa: E402
from moekit.offload.store import (ALIGN, INDEX_NAME, DiskStore, RamStore, StoreError, StoreMismatchError,  # noqa: E402
                                  convert_checkpoint, default_store_dir, ensure_store, open_store)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_models")
    return {f: save_model(f, root / f, seed=i) for i, f in enumerate(("olmoe", "mixtral", "qwen2_moe"))}


def _experts_in_memory(model_dir, dtype=torch.float32):
    patched = H.patch_model(load_reference(model_dir, dtype), backend="loop")
    return [(n, l.experts.w_in.detach(), l.experts.w_out.detach()) for n, l in moe_layers(patched)]


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe"])
def test_convert_and_read_equal_in_memory(models, family, tmp_path):
    index = convert_checkpoint(models[family], tmp_path / "st", progress=False)
    want = _experts_in_memory(models[family])
    assert [e.module for e in index.layers] == [n for n, _, _ in want]
    assert index.dtype == "float32" and len(index.config_hash) == 64
    for entry, (_, w_in, w_out) in zip(index.layers, want):
        assert entry.w_in_shape == tuple(w_in.shape[1:]) and entry.w_out_shape == tuple(w_out.shape[1:])
        assert all(o % ALIGN == 0 for o in entry.offsets)
    for mode in ("keep", "drop", "direct"):
        with DiskStore(tmp_path / "st", page_cache=mode) as store:
            for l, (_, w_in, w_out) in enumerate(want):
                for e in range(w_in.shape[0]):
                    a, b = store.read(l, e)
                    assert torch.equal(a, w_in[e]) and torch.equal(b, w_out[e]), (mode, l, e)
            assert store.bytes_read == index.total_bytes
    ram = open_store(tmp_path / "st", model_dir=models[family], tier="ram")
    assert isinstance(ram, RamStore) and torch.equal(ram.read(0, 3)[1], want[0][2][3])


def test_fused_layout_and_bf16(models, tmp_path):
    """A checkpoint with fused gate_up_proj/down_proj keys (transformers' in-memory layout) in bf16."""
    from safetensors.torch import save_file

    ref = load_reference(models["olmoe"]).to(torch.bfloat16)
    src = tmp_path / "fused"
    src.mkdir()
    shutil.copy(models["olmoe"] / "config.json", src / "config.json")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    index = convert_checkpoint(src, tmp_path / "st", progress=False)
    assert index.dtype == "bfloat16"
    store = DiskStore(tmp_path / "st")
    for l, block in enumerate(m for _, m, _ in H._find_blocks(ref)):
        for e in (0, 5, 7):
            a, b = store.read(l, e)
            assert a.dtype == torch.bfloat16
            assert torch.equal(a, block.experts.gate_up_proj[e]) and torch.equal(b, block.experts.down_proj[e])


def test_progress_bar(models, tmp_path, capsys):
    convert_checkpoint(models["olmoe"], tmp_path / "st", progress=True)
    err = capsys.readouterr().err
    assert "expert store" in err and "24/24" in err  # 3 layers x 8 experts


def test_truncated_blob_file_names_file(models, tmp_path):
    convert_checkpoint(models["olmoe"], tmp_path / "st", progress=False)
    f = tmp_path / "st" / "layer_001.bin"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(StoreError, match=r"layer_001\.bin.*truncated"):
        DiskStore(tmp_path / "st")


def test_corrupt_blob_names_file(models, tmp_path):
    index = convert_checkpoint(models["olmoe"], tmp_path / "st", progress=False)
    f = tmp_path / "st" / "layer_002.bin"
    off = index.layers[2].offsets[5] + 17
    data = bytearray(f.read_bytes())
    data[off] ^= 0xFF
    f.write_bytes(bytes(data))
    store = DiskStore(tmp_path / "st")
    store.read(2, 4)  # its neighbour is fine
    with pytest.raises(StoreError, match=r"layer_002\.bin: corrupt blob: expert 5 of MoE layer 2"):
        store.read(2, 5)
    DiskStore(tmp_path / "st", verify=False).read(2, 5)  # verify=False: the caller's choice


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "field"])
def test_corrupt_index_names_file(models, tmp_path, damage):
    convert_checkpoint(models["olmoe"], tmp_path / "st", progress=False)
    idx = tmp_path / "st" / INDEX_NAME
    text = idx.read_text()
    if damage == "truncate":
        idx.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        idx.write_text("not json")
    elif damage == "missing":
        idx.unlink()
    else:
        d = json.loads(text)
        d["layers"][1]["blob_bytes"] += 4
        idx.write_text(json.dumps(d))
    with pytest.raises(StoreError, match=r"index\.json"):
        DiskStore(tmp_path / "st")


def test_store_for_another_model_refused(models, tmp_path):
    st = ensure_store(models["olmoe"], tmp_path / "st", progress=False)
    with pytest.raises(StoreMismatchError, match=r"another model"):
        ensure_store(models["mixtral"], st, progress=False)
    with pytest.raises(StoreMismatchError, match=r"index\.json.*another model"):
        open_store(st, model_dir=models["qwen2_moe"])
    assert ensure_store(models["olmoe"], st) == st  # the right model reuses it


def test_default_store_dir_next_to_model(models):
    d = default_store_dir(models["olmoe"])
    assert d.parent == models["olmoe"].resolve().parent and d.name == "olmoe.moekit-experts"


def test_truncated_checkpoint_names_file(models, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(models["olmoe"], src)
    f = src / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(StoreError, match=r"model\.safetensors"):
        convert_checkpoint(src, tmp_path / "st", progress=False)
    assert not (tmp_path / "st" / INDEX_NAME).exists()
