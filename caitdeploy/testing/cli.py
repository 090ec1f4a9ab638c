"""The CLI's error contract and the CLI under a memory limit, as the tests check them."""

from __future__ import annotations


def run_cli_limited(cases: dict[str, list[str]], cwd, address_space: int = 4 << 30, timeout: float = 600):
    """Each case's CLI args through the real CLI in ONE fresh process under RLIMIT_AS = `address_space` (imports
    paid once). Returns ({name: (exit code, stderr, seconds)}, peak RSS of that process in KiB (VmHWM))."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))
        from click.testing import CliRunner
        from caitdeploy.cli.main import main
        out = {{}}
        for name, args in {cases!r}.items():
            t0 = time.perf_counter()
            r = CliRunner().invoke(main, args)
            out[name] = [r.exit_code, r.stderr, time.perf_counter() - t0]
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (the pytest process)
        hwm = [int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
        print(json.dumps([out, hwm]))
    """)
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out, peak = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: tuple(v) for k, v in out.items()}, peak


def one_line_error(res, pattern: str | None = None, code: int = 2) -> str:
    """The error contract of every command: exit `code`, exactly one non-empty stderr line, starting with
    'error: ' (or, for exit 1, 'internal error'), no traceback; `pattern` searched in that line."""
    import re

    assert res.exit_code == code, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") or (code == 1 and lines[0].startswith("internal error")), lines[0]
    assert "Traceback" not in res.output
    if pattern is not None:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]
