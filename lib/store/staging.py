"""Publishing a folder atomically: build it in a hidden temp folder beside the output,
fsync it, and rename it into place only when complete (an existing non-empty output is swapped
out only with `overwrite=True`); on any error the temp folder is removed and the output is left
untouched. Also the one check of an --output-dir before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from lib.core.errors import BadInputError
from lib.store.atomic import fsync_dir


def check_output_dir(output: str | os.PathLike, *, source: str | os.PathLike | None = None,
                     allow_nonempty: bool = True) -> Path:
    """The one check of an --output-dir, before anything is written: refuse an existing file, a
    non-empty folder unless `allow_nonempty`, and (for outputs built from a `source` folder) the
    source itself or a folder holding it. Returns the output path (resolved when `source` is given)."""
    out = Path(output)
    if source is not None:
        src, out = Path(source).resolve(), out.resolve()
        if out == src:
            raise BadInputError(f"--output-dir {output} is the source checkpoint {src}; the fold never overwrites its "
                                "source. Pick a new folder (e.g. runs/<id>/checkpoints/rotated)")
        if src.is_relative_to(out):
            raise BadInputError(f"--output-dir {output} contains the source checkpoint {src}; replacing it would "
                                "delete the source. Pick a folder outside it")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--output-dir {output} is a file; pass a folder (it is created if missing)")
    if not allow_nonempty and out.is_dir() and any(out.iterdir()):
        raise BadInputError(f"--output-dir {output} exists and is not empty; pass --overwrite to replace it, or pick "
                            "a new folder")
    return out


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temp folder beside `output`; on success rename it into place (swapping out an
    existing folder only when `overwrite`), on error remove it and leave `output` untouched."""
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-fold-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        publish_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`. An empty `out` is replaced; a non-empty one needs `overwrite` and is
    moved aside first (then deleted), so at every instant `out` is either old or new, complete."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            old = out.parent / f".old-fold-{out.name}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        else:
            raise BadInputError(f"--output-dir {out} appeared while folding and is not empty; pass --overwrite")
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_folder(target: str | os.PathLike, link: str | os.PathLike) -> Path:
    """Make `link` a symlink to the folder `target` (absolute), swapping an older link atomically
    (a temp link renamed over it). A real file or folder at `link` is refused, never replaced."""
    target, link = Path(target).resolve(), Path(link)
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return link
    elif link.exists():
        raise BadInputError(f"{link} exists and is not a link to {target}; move it away (it is not overwritten)")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".tmp-link-{link.name}-{uuid.uuid4().hex[:8]}"
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)
    fsync_dir(link.parent)
    return link
