"""Model references: a local folder's revision follows its content, also in a long-lived process."""

from __future__ import annotations

import shutil

import lib.models.loading as loading
from lib.models.loading import folder_revision, resolve_model


def test_revision_follows_a_folder_rewritten_in_place(make_tiny, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(make_tiny("qwen3"), folder)
    first = resolve_model(str(folder)).revision
    hashed = []
    monkeypatch.setattr(loading, "sha256_file", lambda p: hashed.append(p) or "x" * 64)
    assert folder_revision(str(folder.resolve())) == first and not hashed, "an unchanged folder is re-hashed"
    monkeypatch.undo()
    # a worker that keeps running while someone re-saves the checkpoint under the same path
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    second = resolve_model(str(folder)).revision
    assert second != first, "a rewritten model folder kept its cached revision"
    weights.write_bytes(bytes(raw[:-1]) + bytes([raw[-1] ^ 0x01]))
    assert resolve_model(str(folder)).revision == first, "same bytes again must give the same revision"
