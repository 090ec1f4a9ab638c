"""mkdocs hooks (registered in mkdocs.yml `hooks:`).

- The CLI reference page is generated at build time from the click commands (docs/gen_cli.py), never kept by
  hand. The page exists only in the build: a docs/reference/cli.md on disk (from `python docs/gen_cli.py`) is
  replaced, not used.
- The site loads nothing from another host. Mermaid: Material renders ```mermaid fences with `window.mermaid` and
  fetches it from unpkg.com only when it is undefined, so the build serves a pinned mermaid itself:
  docs/javascripts/mermaid.min.js (git-ignored, listed in mkdocs.yml `extra_javascript`), downloaded once from the
  npm registry, verified against the pins below, then reused while its sha256 matches. Fonts: Material links Google
  Fonts unless `theme.font` is false, which mkdocs.yml sets (the system fonts are used; checked here).
- The benchmark results page (docs/gen_results.py) is generated from benchmarks/results/, plots and JSON included.

To move to another mermaid: `npm view mermaid@X.Y.Z dist.integrity` gives MERMAID_INTEGRITY; delete the cached file,
build once with MERMAID_SHA256 = "" and copy the sha256 the error prints.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import logging
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


def _load(name: str):
    """A generator module beside this file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"caitdeploy_docs_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_cli = _load("gen_cli")
gen_results = _load("gen_results")

log = logging.getLogger("mkdocs.hooks.caitdeploy")

MERMAID_VERSION = "11.17.2"
MERMAID_URL = f"https://registry.npmjs.org/mermaid/-/mermaid-{MERMAID_VERSION}.tgz"
# the tarball's hash as the registry publishes it (`npm view mermaid@11.17.2 dist.integrity`)
MERMAID_INTEGRITY = "sha512-V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7LoaRQxULMa80/qt5gHO73aCleBBg=="
# package/dist/mermaid.min.js inside that tarball: how a cached copy is recognised
MERMAID_SHA256 = "581ed7d74bd9048d0e3a91363927d72ef22942d7722546b27f7cc29e35390eb8"
MERMAID_MEMBER = "package/dist/mermaid.min.js"
MERMAID_JS = "javascripts/mermaid.min.js"  # under docs/, as mkdocs.yml `extra_javascript` lists it
MAX_TARBALL = 64 << 20  # 11.17.2's tarball is 17 MiB
MAX_BUNDLE = 16 << 20  # its mermaid.min.js is 3.4 MiB
DOWNLOAD_TIMEOUT_S = 120


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(url: str, limit: int) -> bytes:
    """The body at `url`, at most `limit` bytes (more is an error, never truncated)."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            data = resp.read(limit + 1)
    except OSError as e:  # urllib.error.URLError, a timeout, a reset
        raise PluginError(
            f"mermaid {MERMAID_VERSION}: docs/{MERMAID_JS} is absent (or another version) and {url} could not be "
            f"read ({e}); build once where registry.npmjs.org is reachable and copy that file here"
        ) from e
    if len(data) > limit:
        raise PluginError(f"mermaid {MERMAID_VERSION}: {url} is larger than {limit} bytes; refusing it")
    return data


def _check_bundle(js: bytes) -> None:
    """One self-contained script that sets `globalThis.mermaid` (no ES module, no chunk loaded at run time), so a
    plain <script> tag defines what Material looks for."""
    head, tail = js[:200], js[-300:]
    if b"=(()=>{" not in head or b'globalThis["mermaid"]' not in tail or b"import(" in js:
        raise PluginError(
            f"mermaid {MERMAID_VERSION}: {MERMAID_MEMBER} is not a self-contained bundle defining globalThis.mermaid"
        )


def _fetch_mermaid() -> bytes:
    """mermaid.min.js from the pinned npm tarball, checked against MERMAID_INTEGRITY and MERMAID_SHA256."""
    tarball = _download(MERMAID_URL, MAX_TARBALL)
    algo, _, want = MERMAID_INTEGRITY.partition("-")
    got = base64.b64encode(hashlib.new(algo, tarball).digest()).decode()
    if got != want:
        raise PluginError(
            f"mermaid {MERMAID_VERSION}: {MERMAID_URL} does not match its pinned {algo} "
            f"(expected {MERMAID_INTEGRITY}, got {algo}-{got}); refusing it"
        )
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        try:
            member = tar.getmember(MERMAID_MEMBER)
        except KeyError:
            raise PluginError(f"mermaid {MERMAID_VERSION}: the tarball has no {MERMAID_MEMBER}") from None
        f = tar.extractfile(member) if member.isreg() and member.size <= MAX_BUNDLE else None
        if f is None:
            raise PluginError(f"mermaid {MERMAID_VERSION}: {MERMAID_MEMBER} is not a file of at most {MAX_BUNDLE} B")
        js = f.read()
    if _sha256(js) != MERMAID_SHA256:
        raise PluginError(
            f"mermaid {MERMAID_VERSION}: {MERMAID_MEMBER} has sha256 {_sha256(js)}, MERMAID_SHA256 in docs/hooks.py "
            f"says {MERMAID_SHA256 or '(unset)'}"
        )
    _check_bundle(js)
    return js


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file in the same folder: readers see the old file or the whole new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_mermaid(docs_dir: Path) -> Path:
    """docs_dir/javascripts/mermaid.min.js at the pinned version: the cached copy if its sha256 matches, else
    downloaded, verified and written (a copy of another version is replaced)."""
    path = docs_dir / MERMAID_JS
    if path.is_file() and _sha256(path.read_bytes()) == MERMAID_SHA256:
        log.info(f"mermaid {MERMAID_VERSION}: docs/{MERMAID_JS} (cached, sha256 verified)")
        return path
    if path.exists():
        log.info(f"docs/{MERMAID_JS} is not mermaid {MERMAID_VERSION}: replacing it")
    log.info(f"Downloading mermaid {MERMAID_VERSION} from the npm registry into docs/{MERMAID_JS}")
    _write_atomic(path, _fetch_mermaid())
    return path


def on_config(config: MkDocsConfig, **kwargs: object) -> MkDocsConfig:
    """Provide the local mermaid (and check mkdocs.yml loads it); no third-party fonts."""
    if MERMAID_JS not in [str(s) for s in config.extra_javascript]:
        raise PluginError(f"mkdocs.yml: extra_javascript must list {MERMAID_JS} (else Material loads it from unpkg)")
    ensure_mermaid(Path(config.docs_dir))
    if config.theme.get("font") is not False:
        raise PluginError("mkdocs.yml: theme.font must be false (else Material loads Google Fonts)")
    return config


def on_files(files: Files, config: MkDocsConfig, **kwargs: object) -> Files:
    """The generated pages: the CLI reference from the click commands (replacing any docs/reference/cli.md), and
    the benchmark results from benchmarks/results/ with their plots and raw JSON files."""
    for page, content in ((gen_cli.PAGE, gen_cli.markdown()), (gen_results.PAGE, gen_results.markdown())):
        old = files.get_file_from_path(page)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, page, content=content))
    for asset in gen_results.assets():
        files.append(File.generated(config, f"{gen_results.ASSETS}/{asset.name}", content=asset.read_bytes()))
    return files
