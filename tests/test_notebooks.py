"""The notebooks execute top to bottom with a real Jupyter kernel (nbclient), at small settings.

Settings are injected papermill-style: a cell after the one tagged ``parameters`` sets
``SMALL = True`` and a temporary ``WORKDIR``. ``01_quickstart`` trains the two tiny runs there;
``02``, ``03`` and ``04`` read them, as a user would run the notebooks in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_quickstart.ipynb", "02_attention_analysis.ipynb", "03_probing.ipynb",
             "04_attributions_and_feature_maps.ipynb"]


def _kernel_name() -> str:
    """The kernel of the environment running the tests. With ipykernel importable, jupyter_client
    provides the native ``python3`` kernel on ``sys.executable`` without an installed kernelspec."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" not in specs:
        pytest.skip("no python3 Jupyter kernel (install the dev extras: ipykernel)")
    return "python3"


def execute(name: str, workdir: Path, timeout: int = 600) -> nbformat.NotebookNode:
    nb = nbformat.read(NB_DIR / name, as_version=4)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f"# injected-parameters\nSMALL = True\nWORKDIR = {str(workdir)!r}")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, injected)
    # the kernel starts in the notebooks' folder, as when a user opens them
    client = NotebookClient(nb, timeout=timeout, kernel_name=_kernel_name(),
                            resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    (workdir / f"executed_{name}").write_text(nbformat.writes(nb))  # kept for inspection on failure
    return nb


def _text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                parts.append(o["text"])
            elif "data" in o:
                parts.append(o["data"].get("text/plain", ""))
                parts.append(o["data"].get("text/html", ""))
                parts.append(o["data"].get("text/markdown", ""))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def quickstart(workdir):
    return execute(NOTEBOOKS[0], workdir)


def test_notebooks_are_committed_without_outputs_and_with_parameters():
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs: strip them"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "SMALL = False" in params[0].source, name
        src = "\n".join(c.source for c in code)
        assert "import analysis" in src or "from analysis" in src or name == NOTEBOOKS[0] and "rmae" in src


def test_01_quickstart(quickstart, workdir):
    text = _text(quickstart)
    for family in ("mae", "rmae"):
        assert (workdir / f"demo-{family}" / "config.yaml").is_file()
        assert (workdir / f"demo-{family}" / "checkpoints" / "latest.json").is_file()
    assert "SMALL=True" in text
    assert "rmae_vit_tiny_patch8, 32²/p8, depth 2" in text
    assert "instance mass per layer" in text
    assert f"rmae dashboard --runs {workdir}" in text
    assert _images(quickstart) >= 3  # losses, reconstructions, attention maps


def test_02_attention_analysis(quickstart, workdir):
    nb = execute(NOTEBOOKS[1], workdir)
    results = json.loads((workdir / "reports" / "attention" / "results.json").read_text())
    runs = {n for n, r in results["runs"].items() if r["role"] == "run"}
    controls = {n for n, r in results["runs"].items() if r["role"] == "control"}
    assert runs == {"demo-mae", "demo-rmae"} and results["n_images"] == 16
    assert controls == {"control:content-free", "control:local", "control:random-init", "control:oracle"}
    text = _text(nb)
    assert "16 images in" in text
    assert "instance_mass" in text and "attention_distance" in text
    assert "demo-rmae − demo-mae" in text and "checkpoint" in text  # the paired differences table, with its scope
    assert _images(nb) >= 4


def test_03_probing(quickstart, workdir):
    nb = execute(NOTEBOOKS[2], workdir)
    text = _text(nb)
    for probe in ("linear", "knn", "attentive", "dense"):
        assert probe in text
    assert "second linear probe: feature cache hit = True" in text
    assert "(image, object) pairs" in text
    assert "paste_only" in text and "fh" in text  # the baselines' columns
    assert list((workdir / "demo-rmae" / "analysis" / "probes").glob("*.json"))  # run_probe stored its results
    assert _images(nb) >= 3


def test_04_attributions_and_feature_maps(quickstart, workdir):
    nb = execute(NOTEBOOKS[3], workdir)
    text = _text(nb)
    for family in ("mae", "rmae"):
        assert (f"attribution targets of {family}: a linear head on the cls embedding fitted on 60 labelled images "
                f"of scenes:train:60 (7 classes)") in text
        assert (workdir / "reports" / "attributions" / f"attributions_{family}.png").stat().st_size > 5000
    assert "probe logit" in text and "logit of " in text and "(label)" in text and "cosine to the mean of" in text
    assert "feature PCA, layer 0: one PCA over 2 images × 2 runs" in text
    assert "feature PCA, layer 1: one PCA over" in text
    assert "embeddings: tsne of 16 images per run" in text
    assert f"rmae dashboard --runs {workdir}" in text
    assert _images(nb) >= 4  # two attribution figures, the PCA view, the embedding
