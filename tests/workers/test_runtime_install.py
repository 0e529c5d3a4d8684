"""The worker image's install set, `lorafleet[train]` without dev extras, is enough to train on an NF4 base.

A fresh venv install is too slow for CI, so the test builds that environment from the dev venv: it
resolves the closure of distributions `lorafleet[train]` requires (recursively, honouring extras and
markers), links only those distributions' files into a directory, and runs Python without site-packages
(`-S`) on that directory plus this checkout. What a dev-only distribution (peft pulls in accelerate)
provides is then missing there, as it is in the image.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib.util, sys
import torch
assert importlib.util.find_spec("peft") is None, "the dev extra leaked into the runtime environment"
from lora_core import LoraConfig, apply_lora, is_quantized, load_base_model, prepare_for_training
from transformers import AutoTokenizer
import ray.train.torch, workers.loop, workers.ray_train  # what a Ray worker imports

path = sys.argv[1]
AutoTokenizer.from_pretrained(path)
model = load_base_model(path, quantization="nf4", compute_dtype=torch.float32, device="cpu")
assert is_quantized(model)
apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
prepare_for_training(model)
ids = torch.randint(3, 200, (1, 12))
model(input_ids=ids, labels=ids).loss.backward()
print("runtime install set trains an NF4 base")
"""


def runtime_install_set(pyproject: Path, extra: str) -> dict[str, metadata.Distribution]:
    """Installed distributions that `project[extra]` requires, transitively (keyed by canonical name).

    A requirement's own dependencies are followed with the extras it asks for; a dependency whose
    marker does not hold (another extra, another platform) is left out, as pip leaves it out.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    extras_seen: dict[str, set[str]] = {}
    found: dict[str, metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in extras_seen and set(req.extras) <= extras_seen[name]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here, so nothing in this environment can import it either
        extras = extras_seen.setdefault(name, set())
        extras.update(req.extras)
        found[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(sub)
    return found


def _link_site_packages(dists: dict[str, metadata.Distribution], site: Path) -> None:
    """A site-packages directory holding links to the top-level files of `dists` only."""
    site.mkdir()
    for dist in dists.values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            target = Path(str(dist.locate_file(top)))
            if target.exists() and not (site / top).exists():
                (site / top).symlink_to(target)


def _run_probe(site: Path, model_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    return subprocess.run(
        [sys.executable, "-S", "-c", _PROBE, str(model_dir)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_runtime_closure_follows_extras_and_leaves_out_dev_only_packages():
    dists = runtime_install_set(ROOT / "pyproject.toml", "train")
    assert {"torch", "transformers", "bitsandbytes", "ray"} <= dists.keys()
    assert "pytest" not in dists and "peft" not in dists and "moto" not in dists


@pytest.mark.slow
def test_train_extra_alone_loads_and_trains_an_nf4_base(tiny_model_dir, tmp_path):
    _link_site_packages(runtime_install_set(ROOT / "pyproject.toml", "train"), tmp_path / "site-packages")
    done = _run_probe(tmp_path / "site-packages", tiny_model_dir)
    assert done.returncode == 0, f"the train extra is not enough to train:\n{done.stderr[-3000:]}"
    assert "runtime install set trains an NF4 base" in done.stdout
