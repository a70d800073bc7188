"""Fuzzing the parsers that read files from strangers, with hypothesis: metadata.jsonl lines,
transforms.json (+ the tensor files it names), eval configs (JSON and TOML) and safetensors
headers (shards, legacy analysis, the fold's checkpoint reader, spec tensors), and tensor reads
(whole, by rows) and raw byte-range copies from files cut short or changed under the reader.

Contract: a parser returns, or raises one of our documented errors (lib.core.errors.TourGuideError
subclasses) — never another exception, a crash or a hang (each example runs under a SIGALRM
watchdog). Examples are derandomized for a reproducible CI; TOURGUIDE_FUZZ_EXAMPLES=5000 runs a
longer, random campaign. Bugs fuzzing found are kept as explicit @example regressions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import struct
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lib.core.errors import TourGuideError

N_EXAMPLES = int(os.environ.get("TOURGUIDE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=timedelta(seconds=10), database=None,
                derandomize="TOURGUIDE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
HANG_SECONDS = 20


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail (instead of hanging CI) when one parse takes longer than `seconds`."""
    def boom(*_: object) -> None:
        raise TimeoutError(f"parser hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def only_our_errors(fn, *args, **kwargs):
    """Call `fn`; a TourGuideError is fine (returns None), anything else fails the example."""
    with no_hang():
        try:
            return fn(*args, **kwargs)
        except TourGuideError:
            return None


# --- value strategies ------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=10)
NASTY_NAMES = ["", ".", "..", "a/b", "../x", "/etc/passwd", "x\x00y", "n" * 300, "ü" * 140, "sub", "sample_0000.safetensors",
               "metadata.jsonl", ".hidden", "\\x", "con", " ", "\n"]
DEEP = ["[" * 100_000, "{\"a\":" * 100_000, "[" * 100_000 + "]" * 100_000]


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


# --- 1. metadata.jsonl ----------------------------------------------------------------------------
def _valid_row() -> dict:
    return dict(shard="sample_0000.safetensors", sample_id="s0", sample_index=0, text_sha256="ab" * 32,
                token_start=0, token_end=3, n_tokens=3, truncated=False, layers=["model.layers.0"], dtype="float32",
                shapes={"input_ids": [3], "act/model.layers.0": [3, 4]}, sha256="cd" * 32, bytes=100, model="m",
                revision="r", tokenizer="m", backend="torch", capture_key="k", capture_version="1", logits=False)


@st.composite
def index_rows(draw):
    row = _valid_row()
    for key in draw(st.lists(st.sampled_from([*row, "extra", "unknown"]), max_size=2)):
        action = draw(st.sampled_from(["delete", "random", "name", "int", "shape"]))
        if action == "delete":
            row.pop(key, None)
        elif action == "name":
            row[key] = draw(st.sampled_from(NASTY_NAMES) | st.text(max_size=20))
        elif action == "int":
            row[key] = draw(st.integers(-(2**65), 2**65))
        elif action == "shape":
            row[key] = {draw(st.text(max_size=6)): draw(st.lists(st.integers(-3, 2**40), max_size=3) | json_values)}
        else:
            row[key] = draw(json_values)
    return row


index_lines = st.one_of(index_rows().map(_dumps), index_rows().map(_dumps), index_rows().map(_dumps),
                        json_values.map(_dumps), st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1")))


@pytest.fixture
def index_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sample_0000.safetensors").write_bytes(b"\0" * 100)
    return tmp_path


def check_index_bytes(folder: Path, raw: bytes) -> None:
    from lib.store.shards import ShardRecord, read_index
    from lib.store.validation import validate_indexes

    path = folder / "metadata.jsonl"
    path.write_bytes(raw)
    rows = only_our_errors(read_index, path)
    event(f"index accepted ({min(len(rows), 2)}+ rows)" if rows is not None else "index refused")
    if rows is None:
        return
    for r in rows:  # what parses must round-trip, and checking its shard must never raise
        assert ShardRecord.parse(json.loads(r.to_json()), "roundtrip") == r
    with no_hang():
        checks = validate_indexes([path], workers=1)
    assert len(checks) == len(rows)


@FUZZ
@given(lines=st.lists(index_lines, max_size=5), trailing_newline=st.booleans())
@example(lines=[_dumps({**_valid_row(), "shard": "x\x00y"})], trailing_newline=True)  # found: ValueError (NUL)
@example(lines=[_dumps({**_valid_row(), "shard": "n" * 300})], trailing_newline=True)  # found: OSError ENAMETOOLONG
@example(lines=[json.dumps({**_valid_row(), "shard": "\ud800.safetensors"})], trailing_newline=True)  # found: UnicodeEncodeError
@example(lines=[_dumps({**_valid_row(), "shard": "sub"})], trailing_newline=True)  # a folder, not a file
@example(lines=[_dumps({**_valid_row(), "bytes": 100})], trailing_newline=True)  # right size, wrong sha256
@example(lines=[DEEP[0]], trailing_newline=True)
@example(lines=["\ud800"], trailing_newline=False)
def test_fuzz_metadata_jsonl(index_dir, lines, trailing_newline):
    raw = "\n".join(lines) + ("\n" if trailing_newline else "")
    check_index_bytes(index_dir, raw.encode("utf-8", errors="surrogatepass"))


# --- 2. transforms.json -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_world(make_tiny, tmp_path_factory):
    """A run dir with good and bad tensor files for specs to name, and the model config."""
    from safetensors.numpy import save_file

    from lib.testing.random_transforms import random_head_permutation, random_rotation

    model = make_tiny("qwen3")
    cfg = json.loads((model / "config.json").read_text())
    run = tmp_path_factory.mktemp("fuzz-spec") / "run"
    (run / "ledgers").mkdir(parents=True)
    (run / "t").mkdir()
    tensors = {
        "rot": {"rotation": random_rotation(128, 0)}, "rot_nan": {"rotation": np.full((128, 128), np.nan)},
        "rot_int": {"rotation": np.eye(128, dtype=np.int64)}, "rot_vec": {"rotation": np.ones(128)},
        "rot_empty": {"rotation": np.zeros((0, 0))}, "rot_f32": {"rotation": np.eye(128, dtype=np.float32)},
        "rot_scaled": {"rotation": 2 * np.eye(128)}, "vo": {"rotation": np.stack([random_rotation(32, i) for i in range(2)])},
        "vo_bad": {"rotation": np.ones((2, 32, 32))}, "other_key": {"matrix": np.eye(128)},
        "heads": {"permutation": random_head_permutation(4, 2, 0)}, "heads_cross": {"permutation": np.array([0, 2, 1, 3])},
        "heads_kv_bad": {"permutation": np.arange(4), "kv_permutation": np.array([1, 1])},
        "mlp": {"permutation": np.random.default_rng(0).permutation(256)}, "perm_dup": {"permutation": np.zeros(256, np.int64)},
        "perm_huge": {"permutation": np.full(4, 2**62, np.int64)}, "perm_neg": {"permutation": -np.arange(4)},
        "perm_float": {"permutation": np.arange(4, dtype=np.float64)}, "perm_2d": {"permutation": np.zeros((2, 2), np.int64)},
    }
    for name, t in tensors.items():
        save_file(t, str(run / "t" / f"{name}.safetensors"))
    (run / "t" / "garbage.safetensors").write_bytes(np.random.default_rng(1).bytes(300))
    (run / "t" / "empty.safetensors").write_bytes(b"")
    (run / "t" / "dir.safetensors").mkdir()
    (run.parent / "outside.safetensors").write_bytes((run / "t" / "rot.safetensors").read_bytes())
    paths = [f"t/{n}.safetensors" for n in [*tensors, "garbage", "empty", "dir", "missing"]]
    paths += ["../outside.safetensors", "/etc/passwd", "t", "", ".", "\x00", "t/rot.safetensors\x00x", "n" * 300,
              "t/../t/rot.safetensors", str(run / "t" / "rot.safetensors")]
    return run, cfg, paths


@st.composite
def spec_docs(draw, paths):
    from lib.fold.spec import LAYER_PATH_KEYS

    path_values = st.sampled_from(paths) | st.none() | json_values
    doc = {}
    if draw(st.booleans()):
        doc["version"] = draw(st.sampled_from([1, 2, "1", True, None, 1.0, [1]]))
    if draw(st.booleans()):
        doc["model_type"] = draw(st.sampled_from(["qwen3", "llama", None, 5, ""]))
    if draw(st.booleans()):
        doc["residual_rotation_path"] = draw(path_values)
    layer = st.fixed_dictionaries(
        {"name": st.sampled_from(["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.-1",
                                  "model.layers.01", "layers.0", "", 7, None, "model.layers.0 "])},
        optional={"head_dim": st.sampled_from([32, 16, 0, -1, None, "32", True, 2**70, 32.0]),
                  **{k: path_values for k in LAYER_PATH_KEYS}, "shear_path": path_values, "note": json_values})
    doc["layers"] = draw(st.lists(layer, max_size=3) | json_values)
    for _ in range(draw(st.integers(0, 2))):
        doc[draw(st.text(max_size=10))] = draw(json_values)
    return doc


@FUZZ
@given(data=st.data(), allow_inexact=st.booleans(), allow_outside=st.booleans())
@example(data=None, allow_inexact=False, allow_outside=False)
def test_fuzz_transforms_json(spec_world, data, allow_inexact, allow_outside):
    from lib.fold.spec import read_spec
    from lib.fold.transform_set import WeightTransformSet

    run, cfg, paths = spec_world
    if data is None:  # the regressions: deep nesting, and a NUL byte in a path
        texts = [DEEP[0], DEEP[1], _dumps({"version": 1, "residual_rotation_path": "t/rot.safetensors\x00x", "layers": []})]
    else:
        texts = [data.draw(spec_docs(paths).map(_dumps) | st.text(max_size=60) | st.sampled_from(DEEP))]
    for text in texts:
        spec = run / "transforms.json"
        spec.write_text(text, encoding="utf-8", errors="surrogatepass")
        only_our_errors(read_spec, spec)
        ts = only_our_errors(WeightTransformSet.from_spec, spec, cfg, allow_inexact=allow_inexact,
                             allow_outside_paths=allow_outside)
        event("spec accepted" if ts is not None else "spec refused")
        if ts is not None and not allow_outside:  # what validated named only files inside the run
            doc = json.loads(text)
            named = [doc.get("residual_rotation_path")] + [e.get(k) for e in doc["layers"] for k in e if k.endswith("_path")]
            for rel in filter(None, named):
                assert (run / rel).resolve().is_relative_to(run.resolve()), rel


# --- 3. eval configs ---------------------------------------------------------------------------------
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(v)


def to_toml(doc: dict) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items() if v is not None)


@pytest.fixture(scope="module")
def config_world(make_tiny, tmp_path_factory):
    from safetensors.numpy import save_file

    from lib.store.runs import ScaffoldSpec, scaffold_run

    model = str(make_tiny("qwen3"))
    w = tmp_path_factory.mktemp("fuzz-config")
    scaffold_run(ScaffoldSpec(run_id="r1", runs_root=str(w / "runs")))
    save_file({"rotation": np.eye(128)}, str(w / "rot.safetensors"))
    base = {"run_id": "r1", "runs_root": str(w / "runs"), "teacher": {"path": model, "name": "teacher"},
            "variants": [{"name": "v", "path": model, "transports": [{"kind": "rotation", "path": str(w / "rot.safetensors")}]}],
            "metrics": ["logit_kl", "surprisal"], "dtype": "float32", "batch_size": 2, "max_length": 8, "layers": []}
    return w, base


@st.composite
def config_docs(draw, base):
    doc = json.loads(json.dumps(base))
    targets = [doc, doc["teacher"], doc["variants"][0], doc["variants"][0]["transports"][0]]
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(targets))
        key = draw(st.sampled_from([*where, "colour", "path", "name", "kind", "revision", "hf_home", "limit",
                                    "compute_dtype", "device", "description"]) | st.text(max_size=8))
        action = draw(st.sampled_from(["delete", "random", "name"]))
        if action == "delete":
            where.pop(key, None)
        elif action == "name":
            where[key] = draw(st.sampled_from(NASTY_NAMES + ["Qwen/Qwen3-0.6B", "~", "./x"]))
        else:
            where[key] = draw(json_values)
    return doc


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".json", ".toml"]), check_paths=st.booleans())
@example(data=None, suffix=".json", check_paths=True)
@example(data=None, suffix=".toml", check_paths=True)
def test_fuzz_eval_configs(config_world, data, suffix, check_paths):
    from lib.qa.eval_config import load_eval_config

    w, base = config_world
    if data is None:  # regressions: deep nesting in either syntax
        texts = [DEEP[0], DEEP[1]] if suffix == ".json" else ["a = " + DEEP[0], "a = " + "{b = " * 100_000]
    else:
        doc = data.draw(config_docs(base))
        texts = [data.draw(st.sampled_from([_dumps(doc) if suffix == ".json" else to_toml(doc)]) | st.text(max_size=60))]
    for text in texts:
        path = w / f"config{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        event("config accepted" if only_our_errors(load_eval_config, path, check_paths=check_paths) else "config refused")


def test_fuzz_harness_catches_foreign_exceptions():
    """Negative control: the contract check would flag a parser that leaks a plain exception."""
    with pytest.raises(ZeroDivisionError):
        only_our_errors(lambda: 1 / 0)
    assert only_our_errors(lambda: (_ for _ in ()).throw(TourGuideError("ours"))) is None


# --- 4. safetensors headers from strangers ------------------------------------------------------------
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


FLAWS = ["none", "none", "none", "dtype", "shape", "offsets", "entry", "metadata", "header_json", "header_bytes",
         "length_random", "length_off", "data_short", "data_long", "garbage"]


@st.composite
def safetensors_files(draw, flaws: list[str] = FLAWS, dtypes: list[str] = list(DTYPES)) -> bytes:
    """A well-formed file (1-3 tensors), then at most one flaw: so that most examples get past
    the header and reach the tensor code, and every flaw is tried on its own."""
    names = st.sampled_from(["act/model.layers.0", "act/model.layers.1", "input_ids", "logits", "act/", "x", "", "act/a:input"])
    flaw = draw(st.sampled_from(flaws))
    header, offset = {}, 0
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        dtype = draw(st.sampled_from(dtypes))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        n = DTYPES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    victim = draw(st.sampled_from(sorted(header)))
    if flaw == "dtype":
        header[victim]["dtype"] = draw(st.sampled_from(["X", "F128", "f32", 5, None]))
    elif flaw == "shape":
        header[victim]["shape"] = draw(st.sampled_from([[-1], [2**62, 2**62], "3", [1.5], None, [2**64]]))
    elif flaw == "offsets":
        header[victim]["data_offsets"] = draw(st.sampled_from([[5, 2], "x", [0], [0, 2**64], [-1, 0], None]))
    elif flaw == "entry":
        header[victim] = draw(st.sampled_from([{"dtype": "F32"}, [1, 2], None, "x", {}]))
    if draw(st.booleans()):
        header["__metadata__"] = {"sample_id": "s0"} if flaw != "metadata" else draw(st.sampled_from([{"a": 1}, [], "x", None]))
    raw_header = _dumps(header).encode()
    if flaw == "header_json":
        raw_header = _dumps(draw(json_values)).encode()
    elif flaw == "header_bytes":
        raw_header = draw(st.binary(max_size=40))
    raw_header += b" " * draw(st.integers(0, 8))
    length = len(raw_header)
    if flaw == "length_random":
        length = draw(st.integers(0, 2**64 - 1))
    elif flaw == "length_off":
        length = max(0, length + draw(st.integers(-16, 16)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.standard_normal(offset // 8 + 2).tobytes()[:offset]
    if flaw == "data_short":
        data = data[: draw(st.integers(0, max(offset - 1, 0)))]
    elif flaw == "data_long":
        data += draw(st.binary(min_size=1, max_size=16))
    if flaw == "garbage":
        return draw(st.binary(max_size=64))
    return struct.pack("<Q", length) + raw_header + data


def st_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(raw=safetensors_files())
@example(raw=st_bytes({"act/model.layers.0": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))  # found: RuntimeError
@example(raw=st_bytes({"act/model.layers.0": {"dtype": "F32", "shape": [3, 0], "data_offsets": [0, 0]}}))
@example(raw=st_bytes({"act/x": {"dtype": "U64", "shape": [1, 1], "data_offsets": [0, 8]}}, b"\xff" * 8))
@example(raw=struct.pack("<Q", 2) + b"[]")
@example(raw=struct.pack("<Q", 11) + b'{"a":[1,2]}')
def test_fuzz_safetensors_from_strangers(tmp_path, raw):
    from lib.fold.checkpoint_io import CheckpointReader
    from lib.fold.spec import read_spec_tensors
    from lib.store.analysis import summarize_activation_file
    from lib.store.shards import load_shard

    shard = tmp_path / "sample_0000.safetensors"
    shard.write_bytes(raw)
    event("shard loaded" if only_our_errors(load_shard, shard) else "shard refused")
    event("shard summarized" if only_our_errors(summarize_activation_file, shard) else "summary refused")
    only_our_errors(read_spec_tensors, shard, ("rotation",), ("kv_permutation",), "fuzz")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text('{"model_type": "qwen3"}')
    (ckpt / "model.safetensors").write_bytes(raw)
    event("checkpoint read" if only_our_errors(CheckpointReader, ckpt) else "checkpoint refused")


# --- 5. reading tensors and copying raw ranges, from files cut short or changed under the reader ----
def _copy_all(reader, out: Path) -> bool:
    """Copy every tensor of `reader` raw into sharded files under `out` (the fold's kernel copy)."""
    from lib.fold.checkpoint_io import ShardedWriter

    writer = ShardedWriter(out, list(reader.entries.values()), max_shard_bytes=64)
    try:
        for name in reader.entries:
            writer.copy_raw(name, reader)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return True


def _raw_bytes(t) -> bytes:
    import torch

    return bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


MUTATIONS = ["none", "truncate", "truncate", "flip", "grow", "delete"]


# Mostly well-formed files of the dtypes a checkpoint may hold, so that most examples reach the
# reads and copies; the flaws that leave the header parseable are still tried.
READABLE = safetensors_files(flaws=["none"] * 6 + ["data_short", "data_long", "length_off", "offsets", "shape"],
                             dtypes=["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3"])


@FUZZ
@given(raw=READABLE, mutation=st.sampled_from(MUTATIONS), where=st.floats(0, 1),
       rows=st.tuples(st.integers(-4, 8), st.integers(-4, 8)))
@example(raw=st_bytes({"a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}}, bytes(32)),
         mutation="truncate", where=0.9, rows=(1, 3))  # cut inside the data after the header was read
@example(raw=st_bytes({"a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}}, bytes(20)),
         mutation="none", where=0.0, rows=(0, 4))  # hole 2: data cut short before the reader opened it
def test_fuzz_tensor_reads_and_raw_copies(tmp_path, raw, mutation, where, rows):
    """Not only the header parse: read every tensor (whole and by rows) and copy it raw with
    os.copy_file_range, from fuzzed files, and again after the file was cut short, changed,
    grown or deleted under an open reader. Only our documented errors may escape, and an
    untouched file's raw copy must equal what reading it gives."""
    from lib.fold.checkpoint_io import CheckpointReader
    from lib.store.safetensors_io import read_rows, read_tensors

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text('{"model_type": "qwen3"}')
    weights = ckpt / "model.safetensors"
    weights.write_bytes(raw)
    for name in ("act/model.layers.0", "input_ids", "logits", "x"):
        for framework in ("np", "pt"):
            only_our_errors(read_rows, weights, [name], *rows, framework=framework)
    reader = only_our_errors(CheckpointReader, ckpt)
    event("checkpoint read" if reader is not None else "checkpoint refused")
    if reader is None:
        return
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with no_hang():
        _copy_all(reader, out)
        for name in reader.entries:
            copied = read_tensors(out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name],
                                  [name], framework="pt")[name]
            assert _raw_bytes(copied) == _raw_bytes(reader.read(name)), name
    size = len(raw)
    if mutation == "truncate":
        os.truncate(weights, int(where * size))
    elif mutation == "flip" and size:
        with open(weights, "r+b") as fh:
            fh.seek(min(int(where * size), size - 1))
            b = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([b[0] ^ 0xFF]))
    elif mutation == "grow":
        with open(weights, "ab") as fh:
            fh.write(b"\x00" * 17)
    elif mutation == "delete":
        weights.unlink()
    event(f"mutation {mutation}")
    for name in reader.entries:
        only_our_errors(reader.read, name)
        for framework in ("np", "pt"):
            only_our_errors(read_rows, reader.headers["model.safetensors"], [name], *rows, framework=framework)
    out2 = tmp_path / "out2"
    shutil.rmtree(out2, ignore_errors=True)
    out2.mkdir()
    copied = only_our_errors(_copy_all, reader, out2)
    event("copy after mutation: " + ("done" if copied else "refused"))
    assert not [p for p in out2.iterdir() if p.name.startswith(".tmp-")], "a copy left a temp file"
