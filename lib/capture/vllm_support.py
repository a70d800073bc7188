"""What the vLLM backend can capture and whether vLLM is here: the validated version range, the
hook points with a vLLM counterpart (and which of them need tensor parallelism 1), the engine
options we accept, and prompt lengths against the engine's context. No vLLM import until
`require_vllm` is called; the CLI runs these checks before Prefect starts.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from lib.core.errors import BadInputError
from lib.store.shards import INPUT_SUFFIX

SUPPORTED_VLLM = ">=0.32,<0.33"  # the range validated by tests/vllm (keep the `vllm` extra in step)


VLLM_OPTION_KEYS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager",
                    "max_num_batched_tokens")  # the last is no CLI flag: tests use it to force chunked prefill


INSTALL_HINT = ("Install the `vllm` extra on a GPU host (pip install -e '.[vllm]', vLLM " + SUPPORTED_VLLM + "), "
                "or on CPU build the separate venv with `bash tests/vllm/setup_venv.sh` and run from the checkout "
                "with `PYTHONPATH=. .venv-vllm/bin/python -m flows capture --backend vllm ...`; or use --backend torch")


# Hook points with a vLLM counterpart. Block outputs, attention/MLP outputs and the final norm
# are the same tensors in both; o_proj/down_proj inputs too, but only unsharded (TP = 1).
_BLOCK = r"model\.layers\.\d+"


_SUPPORTED = [
    (re.compile(rf"^{_BLOCK}$"), "decoder block output (residual stream after the block)"),
    (re.compile(rf"^{_BLOCK}\.(self_attn|mlp)$"), "attention / MLP output"),
    (re.compile(rf"^{_BLOCK}\.(self_attn\.o_proj|mlp\.down_proj){re.escape(INPUT_SUFFIX)}$"), "o_proj / down_proj input"),
    (re.compile(r"^model\.norm$"), "final norm output"),
]


_SHARDED = re.compile(rf"^{_BLOCK}\.(self_attn\.o_proj|mlp\.down_proj){re.escape(INPUT_SUFFIX)}$")


def vllm_hook_problem(hook_point: str, tensor_parallel_size: int = 1) -> str | None:
    """None when `hook_point` (HF naming) can be captured by the vLLM backend, else the reason."""
    if tensor_parallel_size > 1 and _SHARDED.match(hook_point):
        return (f"under tensor parallelism ({tensor_parallel_size} ranks) the input of "
                f"{hook_point.removesuffix(INPUT_SUFFIX)} is split across ranks and rank 0 holds only a slice")
    if any(p.match(hook_point) for p, _ in _SUPPORTED):
        return None
    module = hook_point.removesuffix(INPUT_SUFFIX)
    leaf = module.rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"vLLM fuses q_proj/k_proj/v_proj into one qkv_proj, so {module} does not exist there"
    if leaf in ("gate_proj", "up_proj"):
        return f"vLLM fuses gate_proj/up_proj into one gate_up_proj, so {module} does not exist there"
    if "norm" in leaf:
        return (f"vLLM's fused add+RMSNorm takes and returns (hidden, residual) pairs and rewrites them in place, "
                f"so {hook_point} is not the tensor the torch backend stores")
    return f"{hook_point} has no validated vLLM counterpart"


def check_vllm_hook_points(hook_points: tuple[str, ...] | list[str], tensor_parallel_size: int = 1) -> None:
    """Raise BadInputError naming the first hook point the vLLM backend cannot capture faithfully."""
    for h in hook_points:
        problem = vllm_hook_problem(h, tensor_parallel_size)
        if problem:
            forms = "; ".join(f"{desc}: e.g. " + ex for (_, desc), ex in zip(_SUPPORTED, (
                "model.layers.3", "model.layers.3.mlp", "model.layers.3.mlp.down_proj:input", "model.norm"), strict=True))
            raise BadInputError(f"--layer {h!r} cannot be captured with --backend vllm: {problem}. "
                                f"The vLLM backend supports {forms}. Fix: pick one of those, or use --backend torch.")


def check_vllm_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate `spec.vllm_options` (keys as the CLI passes them); return them with defaults."""
    unknown = sorted(set(options) - set(VLLM_OPTION_KEYS))
    if unknown:
        raise BadInputError(f"vllm_options: unknown key(s) {unknown}; known: {list(VLLM_OPTION_KEYS)}")
    opts = {"tensor_parallel_size": 1, "gpu_memory_utilization": None, "max_model_len": None, "enforce_eager": True,
            "max_num_batched_tokens": None}
    opts.update({k: v for k, v in options.items() if v is not None})
    tp = opts["tensor_parallel_size"]
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise BadInputError(f"--vllm-tensor-parallel-size must be an integer >= 1, got {tp!r}")
    mem = opts["gpu_memory_utilization"]
    if mem is not None and not (isinstance(mem, int | float) and 0 < mem <= 1):
        raise BadInputError(f"--vllm-gpu-memory-utilization must be in (0, 1], got {mem!r}")
    mml = opts["max_model_len"]
    if mml is not None and (not isinstance(mml, int) or isinstance(mml, bool) or mml < 2):
        raise BadInputError(f"--vllm-max-model-len must be an integer >= 2, got {mml!r}")
    mbt = opts["max_num_batched_tokens"]
    if mbt is not None and (not isinstance(mbt, int) or isinstance(mbt, bool) or mbt < 1):
        raise BadInputError(f"vllm_options max_num_batched_tokens must be an integer >= 1, got {mbt!r}")
    if not opts["enforce_eager"]:
        raise BadInputError("--no-vllm-eager: vLLM's torch.compile / CUDA-graph path replays a graph traced before "
                            "our hooks exist, so they would not fire and nothing would be captured. "
                            "Fix: keep --vllm-eager (the default) for captures.")
    return opts


def check_prompt_lengths(items: list[Any], max_model_len: int) -> None:
    """vLLM needs prompt + 1 sampled token <= max_model_len; say which sample is too long."""
    for it in items:
        if len(it.token_ids) >= max_model_len:
            raise BadInputError(
                f"sample {it.sample_id}: {len(it.token_ids)} tokens, but the vLLM engine's max_model_len is "
                f"{max_model_len} (a prompt needs at most max_model_len - 1 tokens). Fix: pass --max-length "
                f"{max_model_len - 1} or a larger --vllm-max-model-len (up to the model's context).")


def require_vllm(spec: Any = None, hook_points: tuple[str, ...] | None = None) -> str:
    """Import vLLM and check its version (and, when given, the spec's options and hook points).

    Returns the vLLM version. Raises BadInputError saying how to install the extra when vLLM
    is missing, broken or outside SUPPORTED_VLLM (unless TOURGUIDE_VLLM_ALLOW_UNTESTED=1).
    """
    if spec is not None:
        opts = check_vllm_options(spec.vllm_options)
        check_vllm_hook_points(hook_points if hook_points is not None else spec.hook_points, opts["tensor_parallel_size"])
    try:
        import vllm
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "vllm") and not str(exc.name).startswith("vllm."):
            raise BadInputError(f"vLLM is installed but cannot be imported: {exc}. {INSTALL_HINT}") from None
        raise BadInputError(f"--backend vllm: vLLM is not installed in this Python. {INSTALL_HINT}") from None
    except Exception as exc:  # a half-working install (e.g. a torchvision built for another torch)
        raise BadInputError(
            f"--backend vllm: `import vllm` failed ({exc.__class__.__name__}: {str(exc)[:200]}). If it names "
            f"torchvision/torchaudio/torchcodec, uninstall those from this venv (vLLM's CPU build does not need "
            f"them). {INSTALL_HINT}") from None
    version = str(getattr(vllm, "__version__", "0"))
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:  # "0.32.0+cpu" -> 0.32.0: local build tags do not change the API
        ok = SpecifierSet(SUPPORTED_VLLM).contains(Version(version).base_version, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        if os.environ.get("TOURGUIDE_VLLM_ALLOW_UNTESTED", "") in ("1", "true", "yes"):
            warnings.warn(f"vLLM {version} is outside the validated range {SUPPORTED_VLLM}; captures are still "
                          "checked for missing hooks, but run tests/vllm parity before trusting them", stacklevel=2)
        else:
            raise BadInputError(
                f"--backend vllm: vLLM {version} is installed, but the capture backend is validated with vLLM "
                f"{SUPPORTED_VLLM} (its hooks rely on that version's worker and model-runner internals; other "
                f"versions can silently skip them). Fix: pip install 'vllm{SUPPORTED_VLLM}', or set "
                f"TOURGUIDE_VLLM_ALLOW_UNTESTED=1 to try anyway.")
    return version
