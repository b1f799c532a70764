"""Put the demo's tables into README.md and the docs pages, between their `NAME:begin` /
`NAME:end` marker comments, and the demo's picture of retrieved images into docs/, where the
README shows it.

    ./demo.sh && benchmarks/demo_settings.sh && benchmarks/objectives.sh && python scripts/refresh_readme.py

The tables and pictures are never made by hand. Each marker lives in one page:

    demo        runs/demo/eval.txt's closing lines (the demo's last screen), runs/demo/retrieval.png
                and runs/demo/eval.md's overall tables (evaluate.py in demo.sh)       -> README.md
    settings    runs/demo-settings/summary.md (benchmarks/demo_settings.sh)           -> docs/demo.md
    objectives  runs/objectives/summary.md (benchmarks/objectives.sh)                 -> docs/objectives.md

(The speed table, in docs/speed.md, is written by `python benchmarks/bench.py --out docs/speed.md`
itself.)
"""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"demo": ROOT / "runs" / "demo" / "eval.md",
           "settings": ROOT / "runs" / "demo-settings" / "summary.md",  # benchmarks/demo_settings.sh
           "objectives": ROOT / "runs" / "objectives" / "summary.md"}  # benchmarks/objectives.sh
PAGES = {"demo": ROOT / "README.md",  # the page that holds each section's markers
         "settings": ROOT / "docs" / "demo.md",
         "objectives": ROOT / "docs" / "objectives.md"}
PICTURES = {"demo": (ROOT / "runs" / "demo" / "retrieval.png", ROOT / "docs" / "demo-retrieval.png")}
# The console evaluate.py printed (demo.sh keeps it): the README shows its closing lines as printed.
SCREENS = {"demo": ROOT / "runs" / "demo" / "eval.txt"}
SCREEN_START = "In short"  # evaluate.in_short's first line
PICTURE_CAPTION = ("For a few unsafe captions of the test split, the top 3 images of the toy CLIP and of "
                   "Safe-CLIP (red frame: unsafe, green: safe); then a few unsafe images and their top 3 captions")


def splice(page, name, text, where):
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(page):
        raise SystemExit(f"error: {where} has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + text.strip() + "\n" + m.group(2), page)


def last_screen(path):
    """The closing lines of a console that evaluate.py printed, as a text block."""
    console = path.read_text()
    start = console.rfind(f"\n{SCREEN_START}")
    if start < 0:
        raise SystemExit(f"error: {path} has no line starting {SCREEN_START!r}: rerun ./demo.sh")
    return f"```text\n{console[start + 1:].rstrip()}\n```"


def atomic_copy(source, dest):
    dest.parent.mkdir(exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SOURCES), help="refresh one section only")
    args = parser.parse_args(argv)
    pages = {}  # path -> text, each page read once and written once
    for name, source in SOURCES.items():
        if args.only and name != args.only:
            continue
        if not source.exists():
            print(f"skipping {name}: {source} does not exist yet", file=sys.stderr)
            continue
        page = PAGES[name]
        where = page.relative_to(ROOT)
        if page not in pages:
            pages[page] = page.read_text()
        text = source.read_text()
        text = text.split("\n## R@1 (%) per category")[0]  # the page shows the overall tables
        text = re.sub(r"^# .*\n", "", text)  # under the page's own heading,
        text = re.sub(r"^## ", "#### ", text, flags=re.M)  # as sub-sections
        if name in PICTURES and PICTURES[name][0].exists():  # the picture goes above the tables
            picture, copy = PICTURES[name]
            atomic_copy(picture, copy)
            print(f"{name}: {picture.relative_to(ROOT)} -> {copy.relative_to(ROOT)}")
            link = Path(os.path.relpath(copy, page.parent)).as_posix()  # relative to the page that shows it
            text = f"![{PICTURE_CAPTION}]({link})\n\n{text.strip()}"
        if name in SCREENS and SCREENS[name].exists():  # the last screen goes above everything
            text = f"{last_screen(SCREENS[name])}\n\n{text.strip()}"
            print(f"{name}: {SCREENS[name].relative_to(ROOT)}'s closing lines -> {where}")
        pages[page] = splice(pages[page], name, text, where)
        print(f"{name}: {source.relative_to(ROOT)} -> {where}")
    for page, text in pages.items():
        tmp = page.with_name(f".{page.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, page)


if __name__ == "__main__":
    main()
