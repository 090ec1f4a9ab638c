"""Check the internal links of a built site: `python docs/check_links.py SITE_DIR [--list-external]`.

Every HTML file under SITE_DIR is parsed (html.parser); every `href` / `src` that is relative or site-absolute must
name a file of the site (a folder: its index.html), and its `#fragment` an element id of the target page. External
links (http, https, mailto, protocol-relative) are counted, and listed with --list-external, never fetched; a link
to localhost / a loopback address is an error (it works only on the writer's machine). One line per broken link
(page, link, why) and exit 1, else a one-line summary and exit 0. Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

LINK_ATTRS = frozenset({"href", "src"})
EXTERNAL_SCHEMES = frozenset({"http", "https", "mailto"})
IGNORED_SCHEMES = frozenset({"data", "javascript", "blob", "tel", "about"})  # nothing to resolve


@dataclass
class Page:
    """What one HTML file links to and which fragment targets it defines."""

    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in LINK_ATTRS:
                self.page.links.append(value.strip())
            elif name == "id" or (name == "name" and tag == "a"):
                self.page.ids.add(value)

    handle_startendtag = handle_starttag


def parse(path: Path) -> Page:
    parser = _Parser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.page


def is_loopback(host: str) -> bool:
    """localhost, *.localhost, 127.0.0.0/8, ::1 (and 0.0.0.0, which browsers send to this machine too)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


@dataclass
class Report:
    pages: int = 0
    internal: int = 0
    external: set[str] = field(default_factory=set)
    broken: list[tuple[str, str, str]] = field(default_factory=list)  # page, link, why


class Site:
    """The built site under `root`: pages parsed once, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._pages: dict[Path, Page] = {}

    def page(self, path: Path) -> Page:
        if path not in self._pages:
            self._pages[path] = parse(path)
        return self._pages[path]

    def html_files(self) -> Iterator[Path]:
        yield from sorted(p for p in self.root.rglob("*.html") if p.is_file())

    def target(self, page: Path, path: str) -> tuple[Path | None, str]:
        """The file a link's path names (None and why if there is none)."""
        base = self.root if path.startswith("/") else page.parent
        target = (base / unquote(path).lstrip("/")).resolve()
        if not target.is_relative_to(self.root):
            return None, "outside the site"
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            return None, f"no such file: {target.relative_to(self.root).as_posix()}"
        return target, ""

    def check_link(self, page: Path, link: str, report: Report) -> None:
        parts = urlsplit(link)
        scheme = parts.scheme.lower()
        where = page.relative_to(self.root).as_posix()
        if scheme in IGNORED_SCHEMES:
            return
        if scheme or parts.netloc:  # external, or protocol-relative //host/...
            if scheme not in EXTERNAL_SCHEMES | {""}:
                report.broken.append((where, link, f"unknown scheme {scheme}:"))
            elif parts.hostname and is_loopback(parts.hostname):
                report.broken.append((where, link, "points at this machine (localhost), not at a published page"))
            else:
                report.external.add(link)
            return
        report.internal += 1
        target = page
        if parts.path:
            found, why = self.target(page, parts.path)
            if found is None:
                report.broken.append((where, link, why))
                return
            target = found
        fragment = unquote(parts.fragment)
        if fragment and target.suffix == ".html" and fragment not in self.page(target).ids:
            name = target.relative_to(self.root).as_posix()
            report.broken.append((where, link, f"no element with id {fragment!r} in {name}"))

    def check(self) -> Report:
        report = Report()
        for path in self.html_files():
            report.pages += 1
            for link in self.page(path).links:
                self.check_link(path, link, report)
        return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("site_dir", type=Path, help="the built site (mkdocs build -d SITE_DIR)")
    ap.add_argument("--list-external", action="store_true", help="print every external link (not fetched)")
    args = ap.parse_args(argv)
    if not args.site_dir.is_dir():
        print(f"check_links: {args.site_dir} is not a folder", file=sys.stderr)
        return 2
    report = Site(args.site_dir).check()
    if args.list_external:
        for link in sorted(report.external):
            print(f"external (not fetched): {link}")
    for where, link, why in report.broken:
        print(f"{where}: {link}: {why}")
    if report.broken:
        print(f"check_links: {len(report.broken)} broken link(s) in {args.site_dir}", file=sys.stderr)
        return 1
    print(
        f"check_links: {report.pages} pages, {report.internal} internal links OK, "
        f"{len(report.external)} distinct external links (not fetched)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
