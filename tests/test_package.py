"""The wheel: it ships the example recipes, so that `pip install prefopt` (not editable) then
`prefopt quickstart` works in an empty directory; `prefopt recipes` lists them; `prefopt --version`."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from prefopt import __version__
from prefopt.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_a_wheel_install_runs_the_quickstart_in_an_empty_directory(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("prefopt-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, transformers, ...) from this environment; prefopt itself only from the wheel
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([python, "-c", "import prefopt; print(prefopt.__file__)"], cwd=empty,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site)
    result = subprocess.run([venv / "bin" / "prefopt", "quickstart", "train.max_steps=4", "train.eval_every=2"],
                            cwd=empty, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rewards/accuracy" in result.stdout and (empty / "runs" / "quickstart" / "final").is_dir()
    listed = subprocess.run([venv / "bin" / "prefopt", "recipes"], cwd=empty, capture_output=True, text=True)
    assert "quickstart.yaml" in listed.stdout and "dpo/qwen2.5-0.5b.yaml" in listed.stdout


def test_version_and_recipe_list(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"prefopt {__version__}"
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "dpo/quickstart.yaml" in listing and "launch configs, not recipes" in listing and "zero3" in listing
