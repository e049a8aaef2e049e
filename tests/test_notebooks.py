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
        dataset_name=os.path.join(tmp, "images"),
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
        fast_samplers=[["ddim", 5], ["ddim", 3], ["dpm++", 5], ["dpm++", 3], ["unipc", 3], ["euler", 3]],
        num_metric_images=4,
    )


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run all notebooks once, in order (05 trains the model that 06 samples from); yield their outputs."""
    import papermill

    tmp = str(tmp_path_factory.mktemp("course"))
    write_images(os.path.join(tmp, "images"), 24)
    # Executed copies go to tmp/notebooks, beside a link to helpers.py, as in the repository:
    # papermill and nbval both run them with that folder as the working directory.
    os.makedirs(os.path.join(tmp, "notebooks"))
    os.symlink(os.path.join(ROOT, "helpers.py"), os.path.join(tmp, "helpers.py"))
    values = reduced_parameters(tmp)
    results = {}
    for path in (os.path.join(ROOT, "notebooks", name) for name in RUN):
        declared = papermill.inspect_notebook(path)
        params = {k: v for k, v in values.items() if k in declared}
        output = os.path.join(tmp, "notebooks", os.path.basename(path))
        try:
            papermill.execute_notebook(path, output, parameters=params, cwd=os.path.dirname(output),
                                       kernel_name="python3", progress_bar=False)
            results[os.path.basename(path)] = (output, None)
        except Exception as err:  # papermill keeps the traceback in the output notebook
            results[os.path.basename(path)] = (output, err)
    yield tmp, results


def test_the_course_has_seven_numbered_notebooks():
    assert NAMES == ["01_config.ipynb", "02_dataset.ipynb", "03_model.ipynb", "04_scheduler.ipynb",
                     "05_training.ipynb", "06_sampling.ipynb", "07_quality.ipynb"]


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
    assert any("".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT") for c in code), "nothing for nbval to check"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in code), "every code cell ran (tools/make_outputs.py)"
    assert not [o for o in outputs if o.get("output_type") == "error"], "an error output is committed"
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not [o for o in outputs if o.get("name") == "stderr" and "IProgress not found" in "".join(o["text"])]
    note = "".join(cells[1]["source"]) if cells[1]["cell_type"] == "markdown" else ""
    assert "outputs on this page" in note and "real run on 20" in note, "the run that made the outputs is named"


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
    assert shown or name == "04_scheduler.ipynb", f"{name} shows no helper's source"


@pytest.mark.parametrize("name", RUN)
def test_notebook_runs_top_to_bottom_at_reduced_size(executed, name):
    output, error = executed[1][name]
    assert error is None, f"{name} failed; see {output}:\n{error}"


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


def test_training_notebook_runs_to_its_end_when_the_run_is_shorter_than_a_checkpoint(tmp_path):
    """A learner's short run (fewer steps than checkpointing_steps) has no checkpoint to resume: 05 says so."""
    import papermill

    write_images(str(tmp_path / "images"), 24)
    os.makedirs(tmp_path / "notebooks")
    os.symlink(os.path.join(ROOT, "helpers.py"), tmp_path / "helpers.py")
    params = dict(reduced_parameters(str(tmp_path)), num_epochs=1, checkpointing_steps=500)
    params = {k: v for k, v in params.items() if k in papermill.inspect_notebook(os.path.join(ROOT, "notebooks", "05_training.ipynb"))}
    output = str(tmp_path / "notebooks" / "05_training.ipynb")
    papermill.execute_notebook(os.path.join(ROOT, "notebooks", "05_training.ipynb"), output, parameters=params,
                               cwd=str(tmp_path / "notebooks"), kernel_name="python3", progress_bar=False)
    text = "".join("".join(o.get("text", "")) for c in json.load(open(output))["cells"] for o in c.get("outputs", []))
    assert "saved no checkpoint" in text and "checkpointing_steps=500" in text
