"""Put the demo's tables into README.md, between its `NAME:begin` / `NAME:end` marker comments,
and the demo's picture of retrieved images into docs/, where the README shows it.

    ./demo.sh && benchmarks/demo_settings.sh && benchmarks/objectives.sh && python scripts/refresh_readme.py

The README's tables and pictures are never made by hand: the demo's table is runs/demo/eval.md and
its picture runs/demo/retrieval.png, both written by evaluate.py in demo.sh; the table of the demo's
settings is runs/demo-settings/summary.md, written by benchmarks/demo_settings.sh; the objectives'
table is runs/objectives/summary.md, written by benchmarks/objectives.sh. (The speed table is written by
`python benchmarks/bench.py --out README.md` itself.)
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
PICTURES = {"demo": (ROOT / "runs" / "demo" / "retrieval.png", ROOT / "docs" / "demo-retrieval.png")}
PICTURE_CAPTION = ("For a few unsafe captions of the test split, the top 3 images of the toy CLIP and of "
                   "Safe-CLIP (red frame: unsafe, green: safe); then a few unsafe images and their top 3 captions")


def splice(readme, name, text):
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(readme):
        raise SystemExit(f"error: README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + text.strip() + "\n" + m.group(2), readme)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SOURCES), help="refresh one section only")
    args = parser.parse_args(argv)
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    for name, source in SOURCES.items():
        if args.only and name != args.only:
            continue
        if not source.exists():
            print(f"skipping {name}: {source} does not exist yet", file=sys.stderr)
            continue
        text = source.read_text()
        text = text.split("\n## R@1 (%) per category")[0]  # the README shows the overall tables
        text = re.sub(r"^# .*\n", "", text)  # under the README's own heading,
        text = re.sub(r"^## ", "#### ", text, flags=re.M)  # as sub-sections
        if name in PICTURES and PICTURES[name][0].exists():  # the picture goes above the tables
            picture, copy = PICTURES[name]
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(picture, copy.with_name(f".{copy.name}.tmp"))
            os.replace(copy.with_name(f".{copy.name}.tmp"), copy)
            print(f"{name}: {picture.relative_to(ROOT)} -> {copy.relative_to(ROOT)}")
            text = f"![{PICTURE_CAPTION}]({copy.relative_to(ROOT)})\n\n{text.strip()}"
        readme = splice(readme, name, text)
        print(f"{name}: {source.relative_to(ROOT)} -> README.md")
    tmp = readme_path.with_name(".README.md.tmp")
    tmp.write_text(readme)
    os.replace(tmp, readme_path)


if __name__ == "__main__":
    main()
