"""lib.store.safetensors_io, the one safetensors I/O path, checked against the safetensors
library as an independent oracle: round trips of every dtype both ways, golden bytes,
determinism, header validation (every bad file is one the library refuses too), row slices,
the streaming writer and its raw byte-range copy, and hole 2 (a truncated checkpoint is refused
by `CheckpointReader`, naming the file and the tensor)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as pt_load_file
from safetensors.torch import save_file as pt_save_file

from lib.core.dtypes import ITEMSIZE, ST_DTYPES, torch_dtype_of
from lib.core.errors import BadInputError
from lib.fold.checkpoint_io import CheckpointReader, ShardedWriter, TensorEntry
from lib.store.safetensors_io import (
    header_bytes,
    load_tensors,
    read_header,
    read_rows,
    read_tensors,
    save_tensors,
    tensor_bytes,
    tensor_parts,
)
from lib.store.stream_writer import StreamWriter

ROOT = Path(__file__).resolve().parents[2]


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of `code` with varied bytes (every bit pattern of the raw bytes is a valid value)."""
    n = int(np.prod(shape)) * ITEMSIZE[code]
    if n == 0:
        return torch.zeros(shape, dtype=torch_dtype_of(code))
    raw = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))
    if code == "BOOL":
        raw = raw % 2
    return raw.view(torch_dtype_of(code)).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included, which torch.equal would not give)."""
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.reshape(-1).view(torch.uint8).numpy())


SHAPES = [(3, 5), (7,), (), (0, 4)]


def test_the_one_dtype_table_is_consistent():
    assert set(ST_DTYPES) == set(ITEMSIZE)
    for code in ST_DTYPES:
        assert torch_dtype_of(code).itemsize == ITEMSIZE[code], code


@pytest.mark.parametrize("code", sorted(ITEMSIZE))
def test_every_dtype_round_trips_with_the_library_both_ways(tmp_path, code):
    tensors = {f"t{i}": sample(code, s, i) for i, s in enumerate(SHAPES)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_tensors(ours, tensors, {"k": "v"})
    pt_save_file(tensors, str(theirs), metadata={"k": "v"})
    with safe_open(str(ours), framework="pt") as fh:  # the library reads what we wrote
        assert fh.metadata() == {"k": "v"}
        assert all(same(fh.get_tensor(k), t) for k, t in tensors.items())
    got, meta = load_tensors(theirs, framework="pt")  # we read what the library wrote
    assert meta == {"k": "v"} and set(got) == set(tensors)
    assert all(same(got[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("code", [c for c in sorted(ITEMSIZE) if c not in ("BF16", "F8_E4M3", "F8_E5M2")])
def test_numpy_round_trips_with_the_library_both_ways(tmp_path, code):
    arrays = {f"a{i}": sample(code, s, i).numpy() for i, s in enumerate(SHAPES)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_tensors(ours, arrays)
    np_save_file(arrays, str(theirs))
    for path in (ours, theirs):
        got = read_tensors(path)
        for k, a in arrays.items():
            assert got[k].dtype == a.dtype and got[k].shape == a.shape and got[k].tobytes() == a.tobytes(), (path, k)
    big_endian = {"x": np.arange(4, dtype=">f8")}  # stored little-endian, as the format says
    save_tensors(ours, big_endian)
    assert np.array_equal(pt_load_file(str(ours))["x"].numpy(), np.arange(4.0))


def test_numpy_cannot_hold_bfloat16_and_says_so(tmp_path):
    path = tmp_path / "b.safetensors"
    save_tensors(path, {"w": torch.ones(2, dtype=torch.bfloat16)})
    with pytest.raises(BadInputError, match=r"b.safetensors: tensor 'w' is BF16, which numpy cannot hold"):
        read_tensors(path)
    assert read_tensors(path, framework="pt")["w"].dtype == torch.bfloat16


def test_golden_bytes():
    parts = tensor_parts({"z": np.array([1, 2], np.int64), "a": np.array([1.5], np.float32)}, {"b": "2", "a": "é"})
    header = '{"__metadata__":{"a":"é","b":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
             '"z":{"dtype":"I64","shape":[2],"data_offsets":[4,20]}}'
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    assert b"".join(parts) == struct.pack("<Q", len(raw)) + raw + struct.pack("<f2q", 1.5, 1, 2)
    assert header_bytes([], None) == struct.pack("<Q", 8) + b"{}      "


def test_equal_inputs_give_equal_bytes_whatever_the_dict_order(tmp_path):
    t = {"b": torch.randn(3, 2), "a": torch.arange(4), "c": torch.zeros(0)}
    m = {"y": "1", "x": "2", "ü": "3"}
    one = save_tensors(tmp_path / "1.safetensors", t, m)
    two = save_tensors(tmp_path / "2.safetensors", dict(reversed(t.items())), dict(reversed(m.items())))
    assert one.read_bytes() == two.read_bytes()
    # Negative control: the comparison sees a one-character change of the metadata.
    three = save_tensors(tmp_path / "3.safetensors", t, {**m, "y": "2"})
    assert three.read_bytes() != one.read_bytes()


def test_views_are_zero_copy_for_contiguous_tensors():
    t = torch.randn(64, 64)
    a = np.random.default_rng(0).normal(size=(32, 8))
    _, av, tv = tensor_parts({"t": t, "a": a})  # name order: a, t
    assert np.frombuffer(tv, np.uint8).ctypes.data == t.data_ptr()
    assert np.frombuffer(av, np.uint8).ctypes.data == a.ctypes.data


# --- header validation: every file here is one the safetensors library refuses too --------------
def st_file(header: dict, data: bytes, raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = {"__metadata__": {"k": "v"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}


def variant(**entries) -> dict:
    return {**json.loads(json.dumps(GOOD)), **entries}


BAD = {  # id: (file bytes, what the message must name besides the file)
    "truncated-data": (st_file(GOOD, bytes(20)), ["tensor 'b'", "truncated"]),
    "trailing-bytes": (st_file(GOOD, bytes(30)), ["6 bytes follow the last tensor"]),
    "truncated-header": (st_file(GOOD, bytes(24))[:40], ["the header needs"]),
    "no-header": (b"\x10\x00\x00", ["too short"]),
    "header-length-huge": (struct.pack("<Q", 2**63) + b"{}", ["implausible"]),
    "overlap": (st_file(variant(b={"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}), bytes(24)),
                ["tensor 'b'", "overlaps tensor 'w'"]),
    "gap": (st_file(variant(b={"dtype": "I64", "shape": [1], "data_offsets": [24, 32]}), bytes(32)),
            ["tensor 'b'", "gap of 8 bytes"]),
    "offsets-reversed": (st_file(variant(b={"dtype": "I64", "shape": [1], "data_offsets": [24, 16]}), bytes(24)),
                         ["tensor 'b'", "data_offsets [24, 16]"]),
    "out-of-bounds": (st_file(variant(b={"dtype": "I64", "shape": [1], "data_offsets": [100, 108]}), bytes(24)),
                      ["tensor 'b'"]),
    "span-vs-shape": (st_file(variant(w={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}), bytes(24)),
                      ["tensor 'w'", "needs 24"]),
    "unknown-dtype": (st_file(variant(w={"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}), bytes(24)),
                      ["tensor 'w'", "'F128'"]),
    "negative-shape": (st_file(variant(w={"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}), bytes(24)),
                       ["tensor 'w'", "shape [-4]"]),
    "bool-shape": (st_file(variant(w={"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}), bytes(24)),
                   ["tensor 'w'", "shape"]),
    "entry-not-object": (st_file(variant(w=[1, 2]), bytes(24)), ["tensor 'w'", "not an object"]),
    "not-an-object": (st_file({}, b"", raw_header=b"[1, 2]"), ["JSON list, not an object"]),
    "not-json": (st_file({}, b"", raw_header=b"{'w': 1}"), ["not valid UTF-8 JSON"]),
    "not-utf8": (st_file({}, b"", raw_header=b'{"\xff": 1}'), ["not valid UTF-8 JSON"]),
    "duplicate-key": (st_file({}, bytes(24), raw_header=json.dumps(GOOD).encode()[:-1] + b',"w":'
                              + json.dumps(GOOD["w"]).encode() + b"}"), ["'w' appears twice"]),
    "metadata-not-strings": (st_file(variant(__metadata__={"k": 1}), bytes(24)), ["__metadata__", "strings"]),
    "metadata-not-object": (st_file(variant(__metadata__=["k"]), bytes(24)), ["__metadata__"]),
}


STRICTER = {"duplicate-key"}  # the library keeps one of the two entries; which one is not ours to guess


def test_the_good_file_is_good(tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(st_file(GOOD, bytes(24)))
    h = read_header(path)
    assert list(h.tensors) == ["w", "b"] and h.metadata == {"k": "v"} and h.file_size == 24 + h.data_start
    assert (h.tensors["b"].begin, h.tensors["b"].end) == (h.data_start + 16, h.data_start + 24)
    with safe_open(str(path), framework="pt") as fh:
        assert sorted(fh.keys()) == ["b", "w"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_headers_are_refused_naming_file_and_tensor(tmp_path, case):
    raw, needles = BAD[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(raw)
    if case not in STRICTER:
        with pytest.raises(Exception):  # oracle: the reference implementation refuses the file too
            with safe_open(str(path), framework="pt") as fh:
                [fh.get_tensor(k) for k in fh.keys()]
    for read in (read_header, lambda p: read_tensors(p, framework="pt"), lambda p: load_tensors(p)):
        with pytest.raises(BadInputError) as err:
            read(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: not a readable safetensors file: "), msg
        for needle in needles:
            assert needle in msg, (case, msg)


def test_missing_file_and_tensor_are_named(tmp_path):
    with pytest.raises(BadInputError, match=r"nope.safetensors: file not found"):
        read_header(tmp_path / "nope.safetensors")
    path = save_tensors(tmp_path / "x.safetensors", {"a": np.zeros(2)})
    with pytest.raises(BadInputError, match=r"x.safetensors: no tensor 'b' \(it holds \['a'\]\)"):
        read_tensors(path, ["b"])


# --- reading rows and the streaming writer ---------------------------------------------------------
@pytest.mark.parametrize("start,stop", [(0, 5), (1, 4), (3, 99), (5, 9), (4, 2), (-2, 5)])
def test_read_rows_reads_exactly_the_slice(tmp_path, start, stop):
    t = {"x": torch.randn(5, 3).to(torch.bfloat16), "y": torch.arange(10).reshape(5, 2)}
    path = save_tensors(tmp_path / "r.safetensors", t)
    x, y = read_rows(path, ["x", "y"], start, stop, framework="pt")
    assert same(x, t["x"][start:stop]) and same(y, t["y"][start:stop])
    (yn,) = read_rows(path, ["y"], start, stop)
    assert np.array_equal(yn, t["y"].numpy()[start:stop])


def _three(tmp_path, rows, order):
    """Tensors a (F32 [rows, 3]), b (BF16), c (empty I64), their reference file and layout."""
    t = {"a": torch.randn(rows, 3), "b": torch.randn(5).to(torch.bfloat16), "c": torch.zeros(0, dtype=torch.int64)}
    ref = save_tensors(tmp_path / "ref.safetensors", t, {"format": "pt"}, order=order)
    return t, ref, [(n, {"a": "F32", "b": "BF16", "c": "I64"}[n], tuple(t[n].shape)) for n in order]


def test_stream_writer_matches_save_tensors_and_copies_raw_ranges(tmp_path):
    t, ref, layout = _three(tmp_path, 4, ["b", "c", "a"])
    w = StreamWriter(tmp_path / "s.safetensors", layout, {"format": "pt"})
    assert not (tmp_path / "s.safetensors").exists()  # nothing under the final name until close
    with pytest.raises(RuntimeError, match="expected 'b' next, got 'a'"):
        w.write("a", t["a"])
    w.write("b", t["b"])
    w.copy_raw("c", read_header(ref))
    w.copy_raw("a", read_header(ref), "a")
    w.close()
    assert (tmp_path / "s.safetensors").read_bytes() == ref.read_bytes()
    w = StreamWriter(tmp_path / "t.safetensors", layout)
    with pytest.raises(RuntimeError, match="planned BF16"):
        w.copy_raw("b", read_header(ref), "a")
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors", "s.safetensors"]


def test_stream_writer_parts_give_the_same_bytes_and_refuse_what_does_not_fit(tmp_path):
    t, ref, layout = _three(tmp_path, 6, ["a", "c", "b"])
    w = StreamWriter(tmp_path / "s.safetensors", layout, {"format": "pt"})
    w.begin("a", "F32", (6, 3))
    for rows in (t["a"][:1], t["a"][1:1], t["a"][1:4], t["a"][4:]):  # uneven pieces, one empty
        w.write_part(tensor_bytes("a", rows)[2])
    w.begin("c", "I64", (0,))  # a zero-size tensor is complete at once
    w.write("b", t["b"])
    w.close()
    assert (tmp_path / "s.safetensors").read_bytes() == ref.read_bytes()

    w = StreamWriter(tmp_path / "u.safetensors", layout)
    w.begin("a", "F32", (6, 3))
    w.write_part(tensor_bytes("a", t["a"][:2])[2])
    with pytest.raises(RuntimeError, match="'c' started with 48 bytes of 'a' still unwritten"):
        w.begin("c", "I64", (0,))
    with pytest.raises(RuntimeError, match="60 bytes given, 48 left in 'a'"):
        w.write_part(tensor_bytes("a", t["a"][:5])[2])
    with pytest.raises(RuntimeError, match="never written"):  # a tensor cut short never closes
        w.close()
    w.abort()
    assert not (tmp_path / "u.safetensors").exists()


def test_a_source_cut_short_after_its_header_was_read_is_a_clear_error(tmp_path):
    ref = save_tensors(tmp_path / "ref.safetensors", {"a": torch.randn(64), "b": torch.randn(64)})
    header = read_header(ref)
    with open(ref, "r+b") as fh:
        fh.truncate(header.tensors["b"].begin + 10)
    with pytest.raises(BadInputError, match=r"ref.safetensors: tensor 'b': the file ended after 10 of 256 bytes"):
        read_tensors(header, ["b"])
    w = StreamWriter(tmp_path / "out.safetensors", [("b", "F32", (64,))])
    with pytest.raises(BadInputError, match=r"ref.safetensors: tensor 'b': the file ended after 10 of 256 bytes"):
        w.copy_raw("b", header)
    w.abort()
    assert read_tensors(header, ["a"])["a"].shape == (64,)  # what is still there reads fine


def test_the_module_imports_and_works_without_torch(tmp_path):
    """lib.capture.vllm_worker runs in vLLM's venv: the I/O module must not need torch to import."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from lib.store.safetensors_io import save_tensors, load_tensors\n"
            f"p = save_tensors({str(tmp_path / 'n.safetensors')!r}, {{'x': np.arange(3.0)}}, {{'k': 'v'}})\n"
            "t, m = load_tensors(p)\n"
            "assert t['x'].tolist() == [0.0, 1.0, 2.0] and m == {'k': 'v'}\n"
            "import importlib.util; assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --- hole 2: a truncated checkpoint is refused up front --------------------------------------------
def test_checkpoint_reader_refuses_a_model_safetensors_cut_short(make_tiny, tmp_path):
    """Regression (hole 2): the reader used to accept a model.safetensors whose data is cut short;
    the fold then failed after Prefect had started, with a raw SafetensorError."""
    model = tmp_path / "ckpt"
    shutil.copytree(make_tiny("qwen3"), model)
    weights = model / "model.safetensors"
    emb = read_header(weights).tensors["model.embed_tokens.weight"]
    with open(weights, "r+b") as fh:
        fh.truncate(emb.begin + emb.nbytes // 2)
    with pytest.raises(BadInputError) as err:
        CheckpointReader(model)
    msg = str(err.value)
    assert str(weights) in msg and "tensor 'model.embed_tokens.weight'" in msg and "truncated" in msg, msg


def test_checkpoint_read_and_raw_copy_after_the_file_shrank(make_tiny, tmp_path):
    model = tmp_path / "ckpt"
    shutil.copytree(make_tiny("qwen3"), model)
    reader = CheckpointReader(model)
    name = max(reader.entries.values(), key=lambda e: e.offset).name  # the last tensor in the file
    e = reader.entries[name]
    expected = reader.read(name)
    writer = ShardedWriter(tmp_path / "out", [TensorEntry(name, e.dtype, e.shape)])
    (tmp_path / "out").mkdir()
    with open(model / "model.safetensors", "r+b") as fh:
        fh.truncate(e.offset + 4)
    with pytest.raises(BadInputError, match=rf"model.safetensors: tensor '{name}': the file ended after 4 of"):
        reader.read(name)
    with pytest.raises(BadInputError, match=rf"model.safetensors: tensor '{name}': the file ended after 4 of"):
        writer.copy_raw(name, reader)
    writer.abort()
    assert list((tmp_path / "out").iterdir()) == []
    assert expected.numel() > 1


def test_file_sha256_identifies_content_now_that_bytes_are_deterministic(tmp_path):
    """Why lib.core.digests.tensor_digest could go: the same tensors and metadata written twice
    (in any dict order) hash the same, and any change to a tensor's bytes changes the hash."""
    q = np.random.default_rng(0).normal(size=(8, 8))
    meta = {"run_id": "r", "layer": "global"}
    one = save_tensors(tmp_path / "1.safetensors", {"rotation": q, "w": np.ones(2)}, meta)
    two = save_tensors(tmp_path / "2.safetensors", {"w": np.ones(2), "rotation": q}, dict(reversed(meta.items())))
    q2 = q.copy()
    q2[3, 3] = np.nextafter(q2[3, 3], 1)
    three = save_tensors(tmp_path / "3.safetensors", {"rotation": q2, "w": np.ones(2)}, meta)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (one, two, three)]
    assert digest[0] == digest[1] != digest[2]
