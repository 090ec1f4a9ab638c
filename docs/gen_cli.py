"""The CLI reference (docs/reference/cli.md), generated from the click group `caitdeploy.cli.main:main`: for every
command its usage, help and every option (type, default, help). Never written by hand.

mkdocs calls `markdown()` at build time through docs/hooks.py (the page lives only in the build). To see the page
on disk: `python docs/gen_cli.py` writes docs/reference/cli.md (git-ignored), or `python docs/gen_cli.py -` prints
it. Importing the CLI needs only click: the commands import torch and friends lazily, when they run.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "cli.md"
PAGE = "reference/cli.md"  # its path under docs/


def _main():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # this checkout's caitdeploy, installed or not
    from caitdeploy.cli.main import main

    return main


def _escape(text: str) -> str:
    """Markdown-safe prose: what is between backticks stays code; elsewhere <, >, &, *, _ and | are literal."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        p = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        parts[i] = re.sub(r"([*_|\\\[\]])", r"\\\1", p)
    return "".join(parts)


def _cell(text: str) -> str:
    """One table cell: one line, a | inside code spans escaped too (Python-Markdown splits cells on it)."""
    return " ".join(_escape(text).split()).replace("`|`", "`\\|`")


def _help(text: str | None) -> str:
    if not text:
        return ""
    text = inspect.cleandoc(text).split("\f")[0]  # click: \f ends the help text
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if lines and lines[0].strip() == "\b":  # click: keep this paragraph's line breaks
            paragraphs.append("  \n".join(_escape(ln.strip()) for ln in lines[1:]))
        else:
            paragraphs.append(_escape(" ".join(ln.strip() for ln in lines)))
    return "\n\n".join(paragraphs)


def _unset(value) -> bool:
    return value is None or type(value).__name__ == "Sentinel" or callable(value)


def _type(param) -> str:
    import click

    if isinstance(param, click.Option) and param.is_flag and not param.count:
        return "flag"
    t = param.type
    if isinstance(t, click.Choice):
        return " \\| ".join(f"`{c}`" for c in t.choices)
    if isinstance(t, click.Path):
        kind = "file" if t.dir_okay is False else "folder" if t.file_okay is False else "path"
        return kind + (" (must exist)" if t.exists else "")
    if isinstance(t, (click.IntRange, click.FloatRange)):
        lo = "" if t.min is None else f"{t.min} ≤ "
        hi = "" if t.max is None else f" ≤ {t.max}"
        name = "integer" if isinstance(t, click.IntRange) else "float"
        return f"{lo}{name}{hi}"
    return t.name


def _default(param) -> str:
    import click

    if isinstance(param, click.Option) and param.is_flag and not param.count:
        return "on" if param.default is True else "off"
    d = param.default
    if _unset(d):
        return ""
    if isinstance(d, (list, tuple)):
        return ", ".join(f"`{x}`" for x in d) if d else ""
    return f"`{d}`"


def _names(param) -> str:
    names = list(param.opts) + [f"/ {o}" for o in param.secondary_opts]
    return " ".join(f"`{n}`" if not n.startswith("/ ") else f"/ `{n[2:]}`" for n in names)


def _command(cmd, ctx, level: int) -> list[str]:
    import click

    out = [f"{'#' * level} `{ctx.command_path}`", ""]
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    out += ["```", usage, "```", ""]
    h = _help(cmd.help)
    if h:
        out += [h, ""]
    args = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
    opts = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
    if args:
        out += ["| argument | type | required |", "|---|---|---|"]
        out += [f"| `{p.human_readable_name}` | {_type(p)} | {'yes' if p.required else 'no'} |" for p in args]
        out.append("")
    if opts:
        out += ["| option | type | default | help |", "|---|---|---|---|"]
        for p in opts:
            extra = []
            if p.required:
                extra.append("required")
            if p.multiple:
                extra.append("repeatable")
            if p.envvar:
                extra.append(f"env `{p.envvar}`")
            help_text = _cell(p.help or "") + (f" ({', '.join(extra)})" if extra else "")
            out.append(f"| {_names(p)} | {_type(p)} | {_default(p)} | {help_text.strip()} |")
        out.append("")
    if isinstance(cmd, click.Group):
        for name in cmd.commands:  # in the order main.py registers them, not sorted
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            out += _command(sub, sub_ctx, level + 1)
    return out


def markdown() -> str:
    import click

    main = _main()
    # as the command line makes them: the group's context_settings (help options -h and --help, the width)
    ctx = click.Context(main, info_name="caitdeploy", **main.context_settings)
    head = [
        "# CLI reference",
        "",
        "<!-- generated by docs/gen_cli.py from caitdeploy.cli.main:main at build time; do not edit -->",
        "",
        (
            "Every `caitdeploy` command with its usage, help and options, generated from the click commands "
            "themselves when the site is built (`docs/gen_cli.py`). `caitdeploy COMMAND --help` prints the same on a "
            "terminal."
        ),
        "",
    ]
    body = _command(main, ctx, 2)
    return "\n".join(head + body).rstrip("\n") + "\n"


if __name__ == "__main__":
    text = markdown()
    if sys.argv[1:] == ["-"]:
        sys.stdout.write(text)
    else:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
        print(f"wrote {OUT.relative_to(ROOT)}")
