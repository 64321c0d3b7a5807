"""distthink works from an installed wheel, outside the checkout: the package data (default config, SLURM
templates, accelerate configs, chat templates, bundled data) ships and is read from the package, test references
do not ship, and the repository's user-facing copies (configs/, slurm/) equal the packaged ones."""

import filecmp
import subprocess
import sys
import zipfile

import pytest
from _train_utils import ROOT, env

PACKAGED = ROOT / "distthink"


def test_repository_copies_equal_the_package_data():
    assert filecmp.cmp(ROOT / "configs" / "default.yaml", PACKAGED / "configs" / "default.yaml", shallow=False)
    for cfg in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        assert filecmp.cmp(cfg, PACKAGED / "configs" / "accelerate" / cfg.name, shallow=False), cfg.name
    templates = sorted(p.name for p in (PACKAGED / "launch" / "templates").iterdir())
    assert sorted(p.name for p in (ROOT / "slurm").iterdir()) == templates
    for name in templates:  # slurm/ links to the packaged files, so `sbatch slurm/sft.sbatch` runs them
        assert (ROOT / "slurm" / name).resolve() == (PACKAGED / "launch" / "templates" / name).resolve()


@pytest.mark.slow
def test_installed_wheel_renders_slurm_and_loads_its_defaults_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("distthink-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("distthink/configs/default.yaml", "distthink/configs/accelerate/multi_node.yaml",
                 "distthink/launch/templates/sft.sbatch", "distthink/launch/templates/launch.sh",
                 "distthink/templates/qwen3.jinja", "distthink/assets/sample_sft.jsonl"):
        assert data in names, data
    assert not [n for n in names if "references" in n or n.startswith("tests/")]
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # no configs/, slurm/ or distthink/ here
    elsewhere.mkdir()
    run_env = env(PYTHONPATH=str(site))
    probe = subprocess.run([sys.executable, "-c", "import distthink, distthink.config as c; print(distthink.__file__);"
                            "print(c.load_config().train.output_dir)"], cwd=elsewhere, env=run_env,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.splitlines()[0].startswith(str(site))  # the installed copy, not the checkout
    render = subprocess.run([sys.executable, "-m", "distthink", "slurm", "render", "--template", "sft",
                             "--nodes", "2"], cwd=elsewhere, env=run_env, capture_output=True, text=True,
                            timeout=120)
    assert render.returncode == 0, render.stderr[-3000:]
    assert "#SBATCH --nodes=2" in render.stdout and "inlined by `distthink slurm render`" in render.stdout
    assert f'DISTTHINK_ROOT:-{site / "distthink"}' in render.stdout  # relative configs resolve in the package
