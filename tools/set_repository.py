"""Point every Colab badge and setup cell at the GitHub repository the course is published under.

    python tools/set_repository.py your-name/diffusion-course   # writes tools/repository.txt, then rewrites
    python tools/set_repository.py                              # rewrites from tools/repository.txt

tools/repository.txt is the one place that names the repository: the README's and the notebooks' badges
and each notebook's setup cell (its REPOSITORY line) are rewritten from it, leaving outputs alone.
"""

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME_FILE = os.path.join(ROOT, "tools", "repository.txt")
BADGE = re.compile(r"(colab\.research\.google\.com/github/)[\w.-]+/[\w.-]+(/blob/)")
SETUP = re.compile(r'^(REPOSITORY = ")[^"]*(")', re.M)


def repository():
    """The owner/name in tools/repository.txt."""
    return open(NAME_FILE).read().strip()


def rewrite(text, name):
    """text with every badge link and REPOSITORY line naming name."""
    return SETUP.sub(rf"\g<1>{name}\g<2>", BADGE.sub(rf"\g<1>{name}\g<2>", text))


def main():
    if len(sys.argv) > 1:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", sys.argv[1]):
            raise SystemExit(f"{sys.argv[1]!r} is not owner/name, e.g. your-name/diffusion-course")
        with open(NAME_FILE, "w") as file:
            file.write(sys.argv[1] + "\n")
    name = repository()
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    open(readme, "w").write(rewrite(text, name))
    for path in sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb"))):
        nb = json.load(open(path))
        for cell in nb["cells"]:
            source = "".join(cell["source"])
            new = rewrite(source, name)
            if new != source:
                cell["source"] = new.splitlines(keepends=True)
        with open(path, "w") as file:
            json.dump(nb, file, indent=1, ensure_ascii=False)
            file.write("\n")
    print(f"badges and setup cells now point at https://github.com/{name}")


if __name__ == "__main__":
    main()
