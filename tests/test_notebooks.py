"""Every notebook, executed in order by papermill at reduced size, then its checked cells re-run by nbval."""

import glob
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, write_images

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
# COURSE_NOTEBOOKS=05_training executes only the notebooks named (comma-separated; 06 and 07 need 05's model):
# CI's run at the lowest versions the requirements allow. Unset: all of them.
ONLY = {n.strip() + ("" if n.strip().endswith(".ipynb") else ".ipynb")
        for n in os.environ.get("COURSE_NOTEBOOKS", "").split(",") if n.strip()}
RUN = [name for name in NAMES if not ONLY or name in ONLY]
assert ONLY <= set(NAMES), f"COURSE_NOTEBOOKS names no notebook here: {sorted(ONLY - set(NAMES))}"


def reduced_parameters(tmp):
    """The CI sizes: a tiny model at 32 px for two epochs on generated images (full-size values stay in the notebooks)."""
    return dict(
        dataset_name=os.path.join(tmp, "data"),
        output_dir=os.path.join(tmp, "ddpm-test"),
        overwrite_output_dir=True,  # nbval re-runs 05 over the model that papermill's run saved
        image_size=32,
        block_out_channels=[32, 64],
        layers_per_block=1,
        train_batch_size=8,
        eval_batch_size=4,
        num_epochs=2,
        lr_warmup_steps=2,
        save_image_epochs=1,
        save_model_epochs=1,
        checkpointing_steps=4,
        logging_steps=1,
        mixed_precision="no",
        num_processes=1,
        eval_inference_steps=5,
        ddpm_steps=10,
        fast_samplers=[["ddim", 5], ["ddim", 3], ["dpm++", 5], ["dpm++", 3], ["sde-dpm++", 3], ["unipc", 3], ["euler", 3]],
        num_metric_images=4,
        bare_steps=3,
        time_tutorial_model=False,  # 03: a minute per run for one number
    )


# 08 at reduced size: a few seconds of training per run, two samples of each class, two guidance scales.
REDUCED_08 = dict(train_minutes=0.05, samples_per_class=2, guidance_scales=[0, 3], sampler_steps=3, real_per_class=8)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run all notebooks once, in order (05 trains the model that 06 samples from); yield their outputs."""
    import papermill

    tmp = str(tmp_path_factory.mktemp("course"))
    for seed, name in enumerate(("blue_morpho", "cabbage_white", "monarch")):  # a learner's labelled folder: 05 and 08
        write_images(os.path.join(tmp, "data", name), 8, seed=seed)
    # Executed copies go to tmp/notebooks, beside links to helpers.py and images/, as in the repository:
    # papermill and nbval both run them with that folder as the working directory.
    os.makedirs(os.path.join(tmp, "notebooks"))
    for name in ("helpers.py", "images"):
        os.symlink(os.path.join(ROOT, name), os.path.join(tmp, name))
    values = reduced_parameters(tmp)
    results = {}
    for path in (os.path.join(ROOT, "notebooks", name) for name in RUN):
        declared = papermill.inspect_notebook(path)
        follows_05 = os.path.basename(path) in ("06_sampling.ipynb", "07_quality.ipynb", "08_conditioning.ipynb")
        params = {k: v for k, v in values.items() if k in declared and not (follows_05 and k in ("dataset_name", "output_dir"))}
        if os.path.basename(path) == "08_conditioning.ipynb":  # 05's model; the labelled folder 05 trained on
            params.update(REDUCED_08, dataset_name=values["dataset_name"])
        output = os.path.join(tmp, "notebooks", os.path.basename(path))
        try:
            papermill.execute_notebook(path, output, parameters=params, cwd=os.path.dirname(output),
                                       kernel_name="python3", progress_bar=False)
            results[os.path.basename(path)] = (output, None)
        except Exception as err:  # papermill keeps the traceback in the output notebook
            results[os.path.basename(path)] = (output, err)
    yield tmp, results


def test_the_course_has_eight_numbered_notebooks():
    assert NAMES == ["01_config.ipynb", "02_dataset.ipynb", "03_model.ipynb", "04_scheduler.ipynb",
                     "05_training.ipynb", "06_sampling.ipynb", "07_quality.ipynb", "08_conditioning.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_shows_a_clean_real_run(name):
    path = os.path.join(ROOT, "notebooks", name)
    assert os.path.getsize(path) <= 2_000_000, "at most 2 MB: lower the figures' dpi"
    nb = json.load(open(path))
    cells = nb["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill injects after it)"
    assert not any("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells)
    assert "widgets" not in nb["metadata"] and "papermill" not in nb["metadata"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "google.colab" in "".join(code[0]["source"]), "the first code cell installs on Colab only"
    assert "".join(code[0]["source"]).startswith("#@title"), "Colab shows the setup cell as a collapsed form"
    assert code[0]["metadata"].get("jupyter", {}).get("source_hidden") and code[0]["metadata"].get("cellView") == "form"
    assert "parameters" in code[1]["metadata"].get("tags", []) and 'preset = "quick"' in "".join(code[1]["source"])
    assert any("nbval-check-output" in c.get("metadata", {}).get("tags", []) for c in code), "nothing for nbval to check"
    shown = "".join("".join(c["source"]) for c in cells)
    for plumbing in ("NBVAL", "papermill", "figures_dir", "save_figure"):  # test plumbing stays out of the reader's view
        assert plumbing not in shown, f"{name} shows {plumbing!r} to the learner"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in code), "every code cell ran (tools/make_outputs.py)"
    assert not [o for o in outputs if o.get("output_type") == "error"], "an error output is committed"
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not [o for o in outputs if o.get("name") == "stderr" and "IProgress not found" in "".join(o["text"])]
    note = "".join(cells[1]["source"]) if cells[1]["cell_type"] == "markdown" else ""
    assert "outputs on this page" in note and "real run on 20" in note, "the run that made the outputs is named"
    assert len(note.splitlines()) == 1 and "../docs/committed-run.md" in note, "one line, linking to the run's details"
    printed = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
    machine_paths = re.findall(r"(?<![\w.~])/(?:home|work|tmp|root|Users|content|mnt|opt)/[^\s'\"]*", printed)
    assert not machine_paths, f"outputs print the paths of the machine that made them: {machine_paths[:3]}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_shows_the_source_that_runs(name):
    """Every show_source(f) output committed on the page is f's source in helpers.py now."""
    import helpers

    shown = 0
    for cell in json.load(open(os.path.join(ROOT, "notebooks", name)))["cells"]:
        names = re.findall(r"^show_source\((\w+)\)", "".join(cell["source"]), re.M) if cell["cell_type"] == "code" else []
        listings = ["".join(o["data"]["text/plain"]) for o in cell.get("outputs", []) if "text/html" in o.get("data", {})]
        assert len(listings) >= len(names), f"{name}: a show_source output is missing"
        for function, listing in zip(names, listings):
            assert listing.strip() == inspect.getsource(getattr(helpers, function)).strip(), (
                f"{name} shows an old {function}: regenerate it (tools/make_outputs.py --only {name[:2]})")
            shown += 1
    assert shown or name in ("01_config.ipynb", "04_scheduler.ipynb"), f"{name} shows no helper's source"


@pytest.mark.parametrize("name", RUN)
def test_notebook_runs_top_to_bottom_at_reduced_size(executed, name):
    output, error = executed[1][name]
    assert error is None, f"{name} failed; see {output}:\n{error}"


def test_sampling_and_quality_follow_05s_model_and_data_with_no_parameter_set(executed):
    """06 and 07 get no output_dir and no dataset_name: they find 05's run and the images it trained on."""
    text = {name: "".join("".join(o.get("text", "")) for c in json.load(open(executed[1][name][0]))["cells"]
                          for o in c.get("outputs", []))
            for name in ("06_sampling.ipynb", "07_quality.ipynb") if name in executed[1]}
    if not text:
        pytest.skip("COURSE_NOTEBOOKS leaves out 06 and 07")
    for name, printed in text.items():
        assert "model folder: ddpm-test" in printed and "loaded from: ddpm-test" in printed, name
    assert "real images: data" in text["07_quality.ipynb"]
    assert "24 real images" in text["07_quality.ipynb"]


def test_training_notebook_saved_a_loadable_pipeline_and_samples(executed):
    from diffusers import DDPMPipeline

    out = reduced_parameters(executed[0])["output_dir"]
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["0000.png", "0001.png"]
    pipeline = DDPMPipeline.from_pretrained(out)
    assert pipeline.unet.config.sample_size == 32


def test_nbval_reproduces_the_checked_cells(executed):
    outputs = [executed[1][name][0] for name in RUN if executed[1][name][1] is None]
    assert len(outputs) == len(RUN), "a notebook failed to execute; see the test above"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-q", "-c", os.devnull, "--rootdir", executed[0], *outputs],
        cwd=os.path.join(executed[0], "notebooks"), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-6000:]
    cells = sum(c["cell_type"] == "code" for path in outputs for c in json.load(open(path))["cells"])
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == cells, run.stdout[-2000:]  # every cell ran, none skipped


def setup_cell(name):
    """The source of a committed notebook's first code cell (its Colab setup)."""
    return "".join(next(c for c in json.load(open(os.path.join(ROOT, "notebooks", name)))["cells"]
                        if c["cell_type"] == "code")["source"])


def test_every_badge_and_setup_cell_names_the_repository_of_tools_repository_txt():
    name = open(os.path.join(ROOT, "tools", "repository.txt")).read().strip()
    texts = [open(os.path.join(ROOT, "README.md")).read()] + [open(p).read() for p in NOTEBOOKS]
    badges = [m for text in texts for m in re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/", text)]
    assert len(badges) >= 2 * len(NOTEBOOKS) and set(badges) == {name}, set(badges)
    for notebook in NAMES:
        assert f'REPOSITORY = "{name}"' in setup_cell(notebook), notebook


def test_setup_cell_pointed_at_a_repository_that_does_not_exist_stops_naming_it(tmp_path, monkeypatch):
    """Run the setup cell as Colab would, cloning from a local folder that is not there (no network)."""
    source = setup_cell("05_training.ipynb").replace('COURSE = "/content/diffusion-course"', f'COURSE = "{tmp_path}/course"')
    source = re.sub(r'^REPOSITORY = "[^"]*"', 'REPOSITORY = "nobody/no-such-course"', source, flags=re.M)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    for key, value in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.file://{tmp_path}/missing/.insteadOf",
                       "GIT_CONFIG_VALUE_0": "https://github.com/", "GIT_TERMINAL_PROMPT": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError) as info:
        exec(compile(source, "setup cell", "exec"), {})
    message = str(info.value)
    assert "Setup could not clone https://github.com/nobody/no-such-course.git" in message
    assert "'nobody/no-such-course' does not exist" in message and "set REPOSITORY above" in message
    assert not os.path.exists(tmp_path / "course" / "helpers.py")


def test_make_outputs_saves_the_figures_that_cells_name_with_a_footer(tmp_path):
    import base64
    import io

    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_outputs

    png = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(png, format="PNG")
    encoded = base64.b64encode(png.getvalue()).decode()
    nb = {"cells": [
        {"cell_type": "code", "metadata": {"figure": "05_loss"}, "outputs": [{"data": {"image/png": encoded}}]},
        {"cell_type": "code", "metadata": {}, "outputs": [{"data": {"image/png": encoded}}]},  # names no figure
        {"cell_type": "markdown", "metadata": {}, "source": "text"},
    ]}
    assert make_outputs.save_figures(nb, str(tmp_path), "data; hardware; date") == ["05_loss.png"]
    saved = Image.open(tmp_path / "05_loss.png")
    assert saved.size == (40, 46) and saved.getpixel((20, 10)) == (255, 0, 0)  # the figure, a footer below it
    assert os.listdir(tmp_path) == ["05_loss.png"]


def test_the_front_page_shows_a_result_and_the_commands_first_and_links_the_rest():
    readme = open(os.path.join(ROOT, "README.md")).read()
    lines = readme.splitlines()
    assert len(readme.split()) <= 1200, "the front page stays short: details go to docs/"
    picture = next(i for i, line in enumerate(lines) if re.search(r"!\[[^\]]*\]\(images/[^)]+\.png\)", line))
    assert picture < 15 and os.path.isfile(os.path.join(ROOT, re.search(r"\((images/[^)]+)\)", lines[picture]).group(1)))
    assert next(i for i, line in enumerate(lines) if "pip install -r requirements.txt" in line) < 60
    assert next(i for i, line in enumerate(lines) if "python -m pytest" in line) < 60
    for page in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert os.path.isfile(os.path.join(ROOT, page)), page
    assert "{{" not in readme


def test_the_lessons_stay_short():
    """At most 860 words of notebook markdown a lesson on average: short explanations beside short cells."""
    words = sum(len("".join(c["source"]).split()) for path in NOTEBOOKS for c in json.load(open(path))["cells"]
                if c["cell_type"] == "markdown")
    assert words <= 860 * len(NOTEBOOKS), words
