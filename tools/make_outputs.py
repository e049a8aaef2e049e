"""Regenerate the committed notebooks' outputs, and the figures in images/, from one real run.

    python tools/make_outputs.py --data path/to/butterfly/images

Runs every notebook with papermill in the course's order of dependence (05 trains the model that 06 and
07 sample from), with the photographs as a local folder, every notebook at the same preset (quick, or
--preset tutorial on a GPU), 06 and 07 on the model 05 saved. Each executed notebook is then cleaned
(papermill's injected cell and metadata, widget state and progress-bar widgets removed, so the parameters
cell keeps its defaults), given a one-line note at its top (the date, the time it took, a link to
docs/committed-run.md, which this script writes with the data, machine, versions and changed parameters),
and written over notebooks/NN_*.ipynb. Training outputs go to runs/ (ignored by git).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import time

import papermill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["05", "06", "07", "08", "01", "02", "03", "04"]  # 06, 07 and 08 need 05's model; 01 shows 05's grid
WIDGET = "application/vnd.jupyter.widget-view+json"
NOTE_TAG = "run-note"
MAX_BYTES = 2_000_000


def hardware(short=False):
    """The GPU's name, or the CPU's core count and model."""
    import torch

    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(0)} GPU"
    if short:
        return f"{os.cpu_count()}-core CPU, no GPU"
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    sys.path.insert(0, ROOT)
    import helpers

    bf16 = "bf16 autocast" if helpers.cpu_has_native_bf16() else "no native bf16, so float32"
    return f"a {os.cpu_count()}-core CPU ({model}; {bf16}), no GPU"


def versions():
    """torch, diffusers and accelerate versions, as one string."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "diffusers", "accelerate"))


def parameters_for(number, args, model_dir):
    """The papermill parameters of one notebook: only what differs from its committed defaults."""
    common = {"preset": args.preset}
    if number == "05":
        return {**common, "dataset_name": os.path.abspath(args.data), "output_dir": model_dir, "overwrite_output_dir": True}
    if number in ("06", "07"):
        return common  # their defaults: the model 05 trained last (notebooks/.last_run) and the data it recorded
    if number == "08":  # fine-tunes 05's model on the same images in class subfolders
        return {**common, "dataset_name": os.path.abspath(args.class_data), "overwrite_output_dir": True}
    return {**common, "dataset_name": os.path.abspath(args.data)}


def write_run_page(record):
    """docs/committed-run.md: what made each notebook's committed outputs (kept as JSON beside it)."""
    lines = ["# The committed run", "",
             "Every output in the notebooks and every figure in `images/` comes from this run of",
             "`python tools/make_outputs.py`, one notebook at a time, in the order below. Paths are from the",
             "repository's root; each notebook's parameters cell shows its defaults, and the run changed only these.", "",
             "| notebook | date | time it took | machine | versions | data | parameters changed |", "|---|---|---|---|---|---|---|"]
    for number in ORDER:
        if number in record:
            r = record[number]
            lines.append(f"| {r['notebook']} | {r['date']} | {r['minutes']:.1f} min | {r['hardware']} | {r['versions']} | "
                         f"{r['data']} | {r['changed']} |")
    lines += ["", "Regenerate with `python tools/make_outputs.py --data <folder> --class-data <folder of class subfolders>`",
              "(add `--preset tutorial` on a GPU).", ""]
    with open(os.path.join(ROOT, "docs", "committed-run.md"), "w") as file:
        file.write("\n".join(lines))


def save_figures(nb, images_dir, label):
    """Write the output image of every cell whose metadata names a figure to images_dir, footed with label."""
    import base64
    import io

    from PIL import Image, ImageDraw

    written = []
    for cell in nb["cells"]:
        name = cell.get("metadata", {}).get("figure")
        for output in cell.get("outputs", []) if name else []:
            for mime, ext in (("image/png", "png"), ("image/gif", "gif")):
                if mime not in output.get("data", {}):
                    continue
                data = base64.b64decode(output["data"][mime])
                path = os.path.join(images_dir, f"{name}.{ext}")
                if ext == "png":  # a grey footer naming the data, hardware, date and versions
                    image = Image.open(io.BytesIO(data)).convert("RGB")
                    footed = Image.new("RGB", (image.width, image.height + 16), "white")
                    footed.paste(image, (0, 0))
                    ImageDraw.Draw(footed).text((4, image.height + 2), label, fill=(110, 110, 110))
                    footed.save(path, optimize=True)
                else:
                    with open(path, "wb") as file:
                        file.write(data)
                written.append(os.path.basename(path))
    return written


def clean(path, note):
    """Strip papermill's and the widgets' traces from an executed notebook and put the run note on top."""
    nb = json.load(open(path))
    cells = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])
             and NOTE_TAG not in c.get("metadata", {}).get("tags", [])]
    for cell in cells:
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            cell["outputs"] = [o for o in cell["outputs"] if WIDGET not in o.get("data", {})]
            for output in cell["outputs"]:  # highlighted source: GitHub and Jupyter show the HTML
                if "text/html" in output.get("data", {}):
                    output["data"].pop("text/latex", None)
            errors = [o for o in cell["outputs"] if o.get("output_type") == "error"]
            if errors:
                raise RuntimeError(f"{path}: a cell failed: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    for key in ("papermill", "widgets"):
        nb["metadata"].pop(key, None)
    note_cell = {"cell_type": "markdown", "id": "run-note", "metadata": {"tags": [NOTE_TAG]}, "source": note}
    nb["cells"] = cells[:1] + [note_cell] + cells[1:]
    return nb


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a local folder of butterfly photographs")
    parser.add_argument("--data-label", default=None, help="how the note names the data (default: the folder's name)")
    parser.add_argument("--figure-label", default=None, help="names the data on the saved figures (default: the folder's name)")
    parser.add_argument("--preset", default="quick", help="05's preset: quick (a CPU) or tutorial (a GPU)")
    parser.add_argument("--class-data", default=None, help="08's data: the same images in one subfolder per class")
    parser.add_argument("--class-data-label", default=None, help="how the note names 08's data")
    parser.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. 01 02 (default: all)")
    args = parser.parse_args()

    model_dir = os.path.join(ROOT, "runs", f"ddpm-butterflies-{args.preset}")
    record_path = os.path.join(ROOT, "docs", "committed-run.json")
    record = json.load(open(record_path)) if os.path.isfile(record_path) else {}
    out_dir = os.path.join(ROOT, "runs", "executed")
    os.makedirs(out_dir, exist_ok=True)
    count = len(glob.glob(os.path.join(args.data, "**", "*.*"), recursive=True))
    data_label = args.data_label or f"the {count} images of a local folder `{os.path.basename(os.path.normpath(args.data))}`"
    class_label = args.class_data_label or f"the images of a local folder of class subfolders `{os.path.basename(os.path.normpath(args.class_data or '.'))}`"
    when = datetime.date.today().isoformat()
    if "08" in (args.only or ORDER) and not args.class_data:
        parser.error("08 needs --class-data: a folder of the same images in one subfolder per class")
    for number in args.only or ORDER:
        source = glob.glob(os.path.join(ROOT, "notebooks", f"{number}_*.ipynb"))[0]
        output = os.path.join(out_dir, os.path.basename(source))
        data_name = args.figure_label or os.path.basename(os.path.normpath(args.data))
        label = f"{data_name}{', by species' if number == '08' else ''}; {hardware(short=True)}; {when}; {versions()}"
        declared = papermill.inspect_notebook(source)
        params = {k: v for k, v in parameters_for(number, args, model_dir).items()
                  if k in declared and declared[k]["default"].strip("'\"") != str(v)}  # only what differs
        command = [sys.executable, "-m", "papermill", "-k", "python3", "--cwd", os.path.join(ROOT, "notebooks"),
                   "--no-progress-bar", source, output]
        for name, value in params.items():
            command += ["-p", name, str(value)]
        print(f"{os.path.basename(source)}: running", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        minutes = (time.perf_counter() - start) / 60
        changed = ", ".join(f"`{k}={os.path.relpath(v, ROOT) if isinstance(v, str) and os.path.isabs(v) else v!r}`"
                            for k, v in params.items()) or "none"
        on_gpu = "one " in hardware(short=True)
        note = (f"> **The outputs on this page** come from a real run on {when}: {minutes:.1f} min on "
                f"{'' if on_gpu else 'a '}{hardware(short=True)}{'' if on_gpu else ' (not yet timed on a GPU)'} "
                "([data, machine, settings](../docs/committed-run.md)).")
        record[number] = {"notebook": os.path.basename(source), "date": when, "minutes": minutes, "hardware": hardware(),
                          "versions": versions(), "data": class_label if number == "08" else data_label, "changed": changed}
        json.dump(record, open(record_path, "w"), indent=1)
        write_run_page(record)
        nb = clean(output, note)
        figures = save_figures(nb, os.path.join(ROOT, "images"), label)
        print(f"{os.path.basename(source)}: figures {', '.join(figures) or 'none'}", flush=True)
        with open(source, "w") as f:
            json.dump(nb, f, indent=1, ensure_ascii=False)
            f.write("\n")
        size = os.path.getsize(source)
        print(f"{os.path.basename(source)}: {size / 1e6:.2f} MB", flush=True)
        if size > MAX_BYTES:
            raise SystemExit(f"{source} is {size / 1e6:.1f} MB, over {MAX_BYTES / 1e6:.0f} MB: lower the figures' dpi.")


if __name__ == "__main__":
    main()
