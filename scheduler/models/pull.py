"""Pulling GGUF models from Hugging Face by name, as Ollama does:
``hf.co/{user}/{repo}`` with an optional ``:{quant}`` (``Q4_K_M``, any case) or
``:{file}``, and configured ``hf_repo`` models.

Files land in the same Hugging Face cache layout that ``huggingface_hub`` reads
(``models--{org}--{repo}/blobs/{etag}``, ``snapshots/{commit}/{file}``, ``refs/``),
so ``hf_hub_download(local_files_only=True)`` and the scanner find them. The
transfer is Corral's own, over the Hub's ``resolve`` URL: huggingface_hub 2.x
downloads into a per-process temporary file it deletes on failure, so it cannot
resume, and resuming a multi-gigabyte download matters more than reuse here. The
partial file is ``blobs/{etag}.corral-partial``; the next pull continues it with a
``Range`` request.

Progress is a stream of Ollama's status dicts (``pulling manifest``, ``pulling
{digest}`` with ``total``/``completed``, ``verifying sha256 digest``, ``writing
manifest``, ``success``); the Ollama port writes them as NDJSON and the CLI draws a bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.config.root import ModelConfig
from scheduler.discovery.found import SPLIT_RE, is_projector, quant_of
from scheduler.errors import CorralError

log = logging.getLogger(__name__)

_REF_RE = re.compile(
    r"^(?:https?://)?(?:hf\.co|huggingface\.co)/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)"
    r"(?::(?P<tag>[^:/\s][^:\s]*))?$"
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_QUANT = "Q4_K_M"  # what Ollama picks for hf.co/{user}/{repo} without a tag
_CHUNK = 1 << 20
PROGRESS_INTERVAL = 0.25


class PullFailed(CorralError):
    status = 502
    code = "pull_failed"
    type = "server_error"


class NothingToPull(CorralError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Ref:
    repo: str
    tag: str | None  # a quantization or a file name; None: the default quantization


def parse_ref(name: str) -> Ref | None:
    """``hf.co/{user}/{repo}[:{quant}|:{file}]`` (or huggingface.co/...); else None."""
    m = _REF_RE.match(name.strip())
    if m is None:
        return None
    tag = m.group("tag")
    return Ref(m.group("repo"), None if tag in (None, "latest") else tag)


@dataclass(frozen=True, slots=True)
class Choice:
    files: tuple[str, ...]  # the model (every shard of a split one, first shard first)
    mmproj: str | None
    tag: str  # what the pulled model's name ends with


def choose(files: list[str], tag: str | None) -> Choice:
    """The repo files a tag names. Pure; raises NothingToPull naming what there is."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    models = [f for f in ggufs if not is_projector(Path(f).name)]
    projectors = [f for f in ggufs if is_projector(Path(f).name)]
    if tag is not None and tag.lower().endswith(".gguf"):
        picked = [f for f in models if f.lower() == tag.lower()
                  or Path(f).name.lower() == tag.lower()]
        label = Path(tag).name
    else:
        want = (tag or DEFAULT_QUANT).upper()
        picked = [f for f in models if quant_of(Path(f).name) == want]
        if not picked and tag is None and models:
            picked = models[:1]  # no Q4_K_M: the repo's first model, as Ollama does
        label = quant_of(Path(picked[0]).name) or Path(picked[0]).name if picked else want
    if not picked:
        have = sorted({q for f in models if (q := quant_of(Path(f).name))})
        raise NothingToPull(
            f"no GGUF file for {tag or DEFAULT_QUANT!r} in the repo"
            + (f"; it has {', '.join(have)}" if have else "; it has no GGUF files"))
    first = picked[0]
    chosen = [first]
    m = SPLIT_RE.match(Path(first).name)
    if m is not None:
        stem, count = m.group("stem"), m.group("count")
        chosen = sorted(f for f in models if (s := SPLIT_RE.match(Path(f).name))
                        and s.group("stem") == stem and s.group("count") == count
                        and Path(f).parent == Path(first).parent)
    # A projector beside the model (prefer the f16 one llama.cpp's converters write).
    near = [p for p in projectors if Path(p).parent == Path(first).parent] or projectors
    near.sort(key=lambda p: ("f16" not in p.lower(), p))
    return Choice(tuple(chosen), near[0] if near else None, label)


@dataclass
class RemoteFile:
    name: str
    url: str
    size: int
    etag: str
    commit: str

    @property
    def digest(self) -> str:
        """The sha256 Ollama's lines show: the LFS etag when it is one, else a hash of
        the file's identity (small non-LFS files have a git etag)."""
        if _SHA256_RE.match(self.etag):
            return self.etag
        return hashlib.sha256(f"{self.url}@{self.etag}".encode()).hexdigest()


@dataclass
class Progress:
    """Written by the download thread, read by the event loop (plain int stores)."""

    completed: int = 0
    cancelled: bool = False


@dataclass
class Plan:
    name: str  # the model name to register: hf.co/{repo}:{tag}
    repo: str
    revision: str
    files: list[RemoteFile] = field(default_factory=list)
    mmproj: RemoteFile | None = None


def cache_dir() -> Path:
    from scheduler.models.sources import models_cache_dir

    return models_cache_dir() / "huggingface"


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT")


def _reach() -> None:
    """Blocking: one request to the Hub, failing at once when it is unreachable.
    huggingface_hub lists a repository with five retries and 15 s of backoff on a
    transport error: a non-streamed /api/pull of an unreachable name held its caller
    23 s. Through the Hub client's own session, so proxy settings hold."""
    from huggingface_hub import constants, get_session

    get_session().head(_endpoint() or constants.ENDPOINT, timeout=10)


def _repo_dir(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def plan(repo: str, tag: str | None, *, revision: str | None = None,
         hf_file: str | None = None, mmproj: str | None = None) -> Plan:
    """Blocking: list the repo (unless the file is named), then each file's size and
    etag. Raises NothingToPull or PullFailed."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    rev = revision or "main"
    try:
        if hf_file is not None:
            choice = Choice((hf_file,), mmproj, quant_of(Path(hf_file).name) or hf_file)
        else:
            _reach()
            files = HfApi(endpoint=_endpoint()).list_repo_files(repo, revision=rev)
            choice = choose(files, tag)
        out = Plan(f"hf.co/{repo}:{choice.tag}", repo, rev)
        for name in (*choice.files, *([choice.mmproj] if choice.mmproj else [])):
            url = hf_hub_url(repo, name, revision=rev, endpoint=_endpoint())
            meta = get_hf_file_metadata(url)
            if meta.size is None or meta.etag is None or meta.commit_hash is None:
                raise PullFailed(f"the Hub gave no size, etag or commit for {repo}/{name}")
            rf = RemoteFile(name, meta.location or url, meta.size, meta.etag, meta.commit_hash)
            if name == choice.mmproj:
                out.mmproj = rf
            else:
                out.files.append(rf)
        return out
    except RepositoryNotFoundError:
        raise NothingToPull(f"no repository {repo!r} on the Hub") from None
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 404:
            raise NothingToPull(f"{repo}: {e}") from None
        raise PullFailed(f"the Hub refused {repo}: {e}") from None
    except (NothingToPull, PullFailed):
        raise
    except Exception as e:  # the client's transport errors (its own exception tree)
        raise PullFailed(f"cannot reach the Hub for {repo}: {e}") from None


def blob_path(repo: str, rf: RemoteFile) -> Path:
    return _repo_dir(repo) / "blobs" / rf.etag


def partial_path(repo: str, rf: RemoteFile) -> Path:
    return _repo_dir(repo) / "blobs" / f"{rf.etag}.corral-partial"


def pointer_path(p: Plan, rf: RemoteFile) -> Path:
    return _repo_dir(p.repo) / "snapshots" / rf.commit / rf.name


def resume_point(p: Plan, rf: RemoteFile) -> int:
    """Blocking: bytes of ``rf`` already here (whole blob or partial file)."""
    for path in (blob_path(p.repo, rf), partial_path(p.repo, rf)):
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            if size <= rf.size:
                return size
    return 0


def download(p: Plan, rf: RemoteFile, progress: Progress) -> Path:
    """Blocking: the file into the cache's blob, resuming a partial one; returns the
    blob. Stops (keeping the partial file) when ``progress.cancelled`` is set."""
    from huggingface_hub.utils import (  # type: ignore[attr-defined]
        build_hf_headers,
        get_session,
    )

    blob = blob_path(p.repo, rf)
    if blob.is_file() and blob.stat().st_size == rf.size:
        progress.completed = rf.size
        return blob
    part = partial_path(p.repo, rf)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > rf.size:
        part.unlink()
        have = 0
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
        log.info("pull %s/%s: resuming at %d of %d bytes", p.repo, rf.name, have, rf.size)
    progress.completed = have
    try:
        # huggingface_hub's own client: its proxies and headers, and it drops the
        # token on a redirect to another host (the CDN).
        with get_session().stream("GET", rf.url, headers=headers, follow_redirects=True,
                                  timeout=30.0) as resp:
            if resp.status_code == 200 and have:
                have = progress.completed = 0  # the server ignored Range: start over
            elif resp.status_code not in (200, 206):
                raise PullFailed(f"download of {p.repo}/{rf.name}: HTTP {resp.status_code}")
            with part.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                # As received (no re-chunking): what arrived before a break is kept.
                for chunk in resp.iter_bytes():
                    if progress.cancelled:
                        raise PullFailed(f"download of {p.repo}/{rf.name} cancelled")
                    f.write(chunk)
                    progress.completed += len(chunk)
    except PullFailed:
        raise
    except Exception as e:  # the client's transport errors (its own exception tree)
        raise PullFailed(
            f"download of {p.repo}/{rf.name} broke off at {progress.completed} of "
            f"{rf.size} bytes ({e}); pull again to resume") from None
    if part.stat().st_size != rf.size:
        raise PullFailed(
            f"download of {p.repo}/{rf.name} ended at {part.stat().st_size} of {rf.size} "
            "bytes; pull again to resume")
    return part


def verify_and_store(p: Plan, rf: RemoteFile, downloaded: Path) -> Path:
    """Blocking: check size and (for LFS files) sha256, then move the blob into place
    and link it from the snapshot, as huggingface_hub lays its cache out."""
    blob = blob_path(p.repo, rf)
    if downloaded != blob:
        size = downloaded.stat().st_size
        if size != rf.size:
            raise PullFailed(f"{p.repo}/{rf.name}: {size} bytes, the Hub says {rf.size}")
        if _SHA256_RE.match(rf.etag):
            h = hashlib.sha256()
            with downloaded.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            if h.hexdigest() != rf.etag:
                downloaded.unlink()
                raise PullFailed(f"{p.repo}/{rf.name}: sha256 mismatch; the partial "
                                 "file was removed, pull again")
        downloaded.replace(blob)
    pointer = pointer_path(p, rf)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        pointer.unlink(missing_ok=True)  # a dangling link
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    refs = _repo_dir(p.repo) / "refs" / p.revision
    if not re.fullmatch(r"[0-9a-f]{40}", p.revision):
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(rf.commit)
    return pointer


def model_for(p: Plan) -> ModelConfig:
    """The ``hf.co/...`` model a pull serves, over the downloaded files. Pinned to the
    commit pulled: a launch then finds its files without asking the Hub again."""
    first = p.files[0]
    return ModelConfig(
        name=p.name, hf_repo=p.repo, hf_file=first.name, hf_revision=first.commit,
        mmproj=p.mmproj.name if p.mmproj else None, origin="pulled",
    )


def remove_files(model: ModelConfig, others: Iterable[ModelConfig] = ()) -> None:
    """Blocking: a pulled model's files (snapshot links and the blobs they point at;
    every part of a split model, the projector) out of Corral's cache, but those that
    ``others`` (the models still offered) use."""
    if model.hf_repo is None or model.hf_file is None or model.hf_revision is None:
        return
    used = {(o.hf_repo, f) for o in others for f in (o.hf_file, o.mmproj) if f}
    snap = _repo_dir(model.hf_repo) / "snapshots" / model.hf_revision
    names = [model.hf_file, *([model.mmproj] if model.mmproj else [])]
    m = SPLIT_RE.match(Path(model.hf_file).name)
    if m is not None:
        names += [str(Path(model.hf_file).parent / Path(p.name)) for p in
                  (snap / model.hf_file).parent.glob(f"{m.group('stem')}-*-of-"
                                                      f"{m.group('count')}.gguf")]
    for name in dict.fromkeys(names):
        if (model.hf_repo, name) in used:
            continue
        link = snap / name
        with contextlib.suppress(OSError):
            blob = link.resolve()
            link.unlink()
            if blob.is_relative_to(_repo_dir(model.hf_repo)):
                blob.unlink()


Status = dict[str, object]


async def steps(make_plan: Callable[[], Plan]) -> AsyncGenerator[Status | Plan, None]:
    """Ollama's pull status lines while pulling; the finished Plan last (not a line).

    Blocking work runs in threads; closing the iterator (a client that went away)
    stops the transfer and keeps the partial file for the next pull."""
    yield {"status": "pulling manifest"}
    p = await asyncio.to_thread(make_plan)
    done: list[tuple[RemoteFile, Path]] = []
    for rf in [*p.files, *([p.mmproj] if p.mmproj else [])]:
        progress = Progress(await asyncio.to_thread(resume_point, p, rf))
        line: Status = {"status": f"pulling {rf.digest[:12]}", "digest": f"sha256:{rf.digest}",
                        "total": rf.size}
        task = asyncio.ensure_future(asyncio.to_thread(download, p, rf, progress))
        try:
            while not task.done():
                yield {**line, "completed": progress.completed}
                await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
            path = task.result()
        finally:
            if not task.done():
                progress.cancelled = True
                # The thread notices within one chunk; wait so the file is closed.
                await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # its "cancelled" PullFailed: expected, retrieved
        yield {**line, "completed": rf.size}
        done.append((rf, path))
    yield {"status": "verifying sha256 digest"}
    for rf, path in done:
        await asyncio.to_thread(verify_and_store, p, rf, path)
    yield {"status": "writing manifest"}
    yield p
    yield {"status": "success"}
