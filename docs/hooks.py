"""mkdocs hooks (registered in mkdocs.yml `hooks:`): the CLI reference page is generated at build time from the
click commands (docs/gen_cli.py), never kept by hand. The page exists only in the build: a docs/reference/cli.md
on disk (from `python docs/gen_cli.py`) is replaced, not used."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File, Files

_spec = importlib.util.spec_from_file_location("caitdeploy_docs_gen_cli", Path(__file__).with_name("gen_cli.py"))
assert _spec is not None and _spec.loader is not None
gen_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_cli)


def on_files(files: Files, config, **kwargs) -> Files:
    old = files.get_file_from_path(gen_cli.PAGE)
    if old is not None:
        files.remove(old)
    files.append(File.generated(config, gen_cli.PAGE, content=gen_cli.markdown()))
    return files
