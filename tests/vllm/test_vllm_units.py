"""The vLLM backend's checks and the worker's split/stitch logic, without vLLM (main venv).

Run: .venv/bin/python -m pytest tests/vllm/test_vllm_units.py -q
(The parity tests against real vLLM engines are in test_vllm_parity.py.)
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from lib.capture.vllm_support import (
    check_prompt_lengths,
    check_vllm_hook_points,
    check_vllm_options,
    require_vllm,
    vllm_hook_problem,
)
from lib.capture.vllm_worker import RequestRows, residual_stream, split_rows
from lib.core.errors import BadInputError


def test_importing_the_backend_does_not_import_vllm():
    code = "import sys, lib.capture.vllm_backend, lib.capture.vllm_support, lib.capture.vllm_worker; assert 'vllm' not in sys.modules, 'eager vllm import'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees where it is not installed
    with pytest.raises(BadInputError, match=r"not installed.*pip install -e '\.\[vllm\]'.*setup_venv\.sh.*--backend torch"):
        require_vllm()


def test_broken_vllm_import_names_the_cause(monkeypatch, tmp_path):
    pkg = tmp_path / "vllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInputError, match="torchvision::nms.*uninstall those"):
        require_vllm()


@pytest.mark.parametrize("version, ok", [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.3", True),
                                         ("0.31.1", False), ("0.33.0", False), ("garbage", False)])
def test_vllm_version_outside_the_validated_range_is_refused(monkeypatch, version, ok):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))
    monkeypatch.delenv("TOURGUIDE_VLLM_ALLOW_UNTESTED", raising=False)
    if ok:
        assert require_vllm() == version
        return
    with pytest.raises(BadInputError, match=r"validated with vLLM >=0\.32,<0\.33"):
        require_vllm()
    monkeypatch.setenv("TOURGUIDE_VLLM_ALLOW_UNTESTED", "1")
    with pytest.warns(UserWarning, match="outside the validated range"):
        assert require_vllm() == version


@pytest.mark.parametrize("hook, reason", [
    ("model.layers.0", None), ("model.layers.17", None), ("model.layers.3.mlp", None),
    ("model.layers.3.self_attn", None), ("model.layers.3.mlp.down_proj:input", None),
    ("model.layers.3.self_attn.o_proj:input", None), ("model.norm", None),
    ("model.layers.3.self_attn.q_proj", "qkv_proj"), ("model.layers.3.self_attn.v_proj:input", "qkv_proj"),
    ("model.layers.3.mlp.gate_proj", "gate_up_proj"), ("model.layers.3.mlp.up_proj", "gate_up_proj"),
    ("model.layers.3.input_layernorm:input", "(hidden, residual)"),
    ("model.layers.3.post_attention_layernorm", "(hidden, residual)"),
    ("model.layers.3:input", "no validated vLLM counterpart"), ("model.embed_tokens", "no validated vLLM counterpart"),
    ("lm_head", "no validated vLLM counterpart"),
])
def test_hook_points_with_and_without_a_vllm_counterpart(hook, reason):
    problem = vllm_hook_problem(hook)
    assert problem is None if reason is None else reason in problem


def test_refused_hook_point_error_names_module_reason_and_fix():
    with pytest.raises(BadInputError, match=r"'model\.layers\.1\.self_attn\.k_proj'.*fuses q_proj/k_proj/v_proj.*--backend torch"):
        check_vllm_hook_points(["model.layers.1", "model.layers.1.self_attn.k_proj"])
    check_vllm_hook_points(["model.layers.1.mlp.down_proj:input"], tensor_parallel_size=1)
    with pytest.raises(BadInputError, match="split across ranks"):
        check_vllm_hook_points(["model.layers.1.mlp.down_proj:input"], tensor_parallel_size=2)
    check_vllm_hook_points(["model.layers.1", "model.norm"], tensor_parallel_size=4)


def test_vllm_options_defaults_and_errors():
    cli = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5, "max_model_len": None, "enforce_eager": True}
    opts = check_vllm_options(cli)
    assert opts["max_model_len"] is None and opts["gpu_memory_utilization"] == 0.5 and opts["enforce_eager"] is True
    assert check_vllm_options({})["tensor_parallel_size"] == 1
    for bad, match in [({"tensor_parallel_size": 0}, "tensor-parallel-size"), ({"gpu_memory_utilization": 1.5}, "memory-utilization"),
                       ({"max_model_len": 1}, "max-model-len"), ({"enforce_eager": False}, "keep --vllm-eager"),
                       ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"), ({"tp": 2}, "unknown key")]:
        with pytest.raises(BadInputError, match=match):
            check_vllm_options(bad)


def test_prompt_longer_than_max_model_len_names_sample_and_fix():
    item = types.SimpleNamespace(sample_id="generic_en.txt:3", token_ids=tuple(range(10)))
    check_prompt_lengths([item], 11)
    with pytest.raises(BadInputError, match=r"generic_en\.txt:3: 10 tokens.*--max-length 9"):
        check_prompt_lengths([item], 10)


def test_vllm_backend_refuses_fused_hook_before_any_engine(make_tiny, tmp_path):
    """Bad input fails before vLLM is imported or an engine starts, and writes no shard."""
    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import Sample

    spec = CaptureSpec(model=str(make_tiny("qwen3")), backend="vllm", hook_points=("model.layers.0.mlp.gate_proj",))
    with pytest.raises(BadInputError, match="gate_up_proj"):
        run_capture(spec, [Sample(0, "text:0", "Welcome to the Great Wall.")], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def test_split_rows_follows_query_start_loc():
    # Three requests (the middle one got no tokens this step) plus a padded slot.
    assert split_rows([0, 3, 3, 7, 7], ["a", "b", "c"]) == [("a", 0, 3), ("c", 3, 7)]
    with pytest.raises(RuntimeError, match="query_start_loc has 2 entries for 2 requests"):
        split_rows([0, 3], ["a", "b"])
    with pytest.raises(RuntimeError, match="not increasing"):
        split_rows([0, 3, 2], ["a", "b"])


def _chunk(lo: int, hi: int, offset: float = 0.0):
    pos = torch.arange(lo, hi)
    return pos, pos + 100, {"act/x": pos[:, None].double() + offset}


def test_request_rows_stitch_chunks_and_replace_recomputed_rows():
    rows = RequestRows()
    rows.append(*_chunk(0, 4))
    rows.append(*_chunk(4, 9))  # chunked prefill: the next piece
    out = rows.stacked()
    assert torch.equal(out["positions"], torch.arange(9)) and torch.equal(out["input_ids"], torch.arange(9) + 100)
    assert out["act/x"].shape == (9, 1) and rows.chunks == 2
    # Preempted and recomputed from position 2: the new rows replace positions >= 2.
    rows.append(*_chunk(2, 6, offset=0.5))
    out = rows.stacked()
    assert torch.equal(out["positions"], torch.arange(6))
    assert torch.equal(out["act/x"][:2, 0], torch.tensor([0.0, 1.0])) and torch.equal(out["act/x"][2:, 0], torch.arange(2, 6) + 0.5)


def test_residual_stream_is_hidden_plus_residual_as_a_new_tensor():
    h, r = torch.randn(5, 4), torch.randn(5, 4)
    s = residual_stream((h, r))
    assert torch.equal(s, h + r)
    h.zero_()  # what vLLM's next fused add+norm does to its inputs, in place
    assert not torch.equal(s, r)
    t = torch.randn(3, 2)
    c = residual_stream(t)
    assert torch.equal(c, t) and c.data_ptr() != t.data_ptr()


def test_worker_extension_names_cannot_clash_with_a_worker():
    """vLLM asserts the extension adds no attribute its worker already has: ours are prefixed."""
    from lib.capture.vllm_worker import CaptureWorkerExtension

    public = [a for a in dir(CaptureWorkerExtension) if not a.startswith("__")]
    assert public and all(a.startswith("tourguide_") for a in public), public
