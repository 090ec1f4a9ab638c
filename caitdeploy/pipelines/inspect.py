"""`caitdeploy inspect` as a library: what a checkpoint, fused model, ONNX file or TensorRT engine is, and its
shapes, read header-first (`describe.describe_file` does the reading; this gives it the pipelines' shape)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InspectResult:
    """`info` is the dict `caitdeploy inspect` prints (and `--json` prints as JSON). Its strings may come from
    the file: print them through `errors.safe_text`, as the CLI does."""

    info: dict[str, Any]

    @property
    def kind(self) -> str:
        """checkpoint | fused | onnx | engine"""
        return str(self.info["kind"])

    def json(self) -> str:
        """The `--json` output: paths as text, NaN and Inf as null."""
        from caitdeploy.pipelines.common import _jsonable

        return json.dumps(_jsonable(self.info), indent=2)


def inspect(path: str | os.PathLike) -> InspectResult:
    """Describe the file at `path`; CaitError (one line, naming the file) for a missing, unknown or corrupt one."""
    from caitdeploy.formats.describe import describe_file

    return InspectResult(describe_file(path, header_check=engine_header_check))


def engine_header_check(engine_bytes: bytes, flavour: str | None = None) -> dict[str, Any]:
    """TensorRT's check of an engine header (`runtime.tensorrt.engine_header_check`), imported only when an engine
    is inspected: describing any other file imports neither TensorRT nor the runtimes."""
    from caitdeploy.runtime.tensorrt import engine_header_check as check

    return check(engine_bytes, flavour)
