"""Build the sdist and wheel, check their contents, and run the installed wheel.

The wheel is built from the sdist (``python -m build`` without a target), so a file
missing from the sdist also breaks the wheel. Both builds run with
``--no-isolation``, using the build backend of the current environment, so no network
access is needed. The wheel is then installed into a fresh virtual environment. That
environment reaches the heavy dependencies (torch, torchvision, numpy) of the test
environment through a ``.pth`` line naming its site-packages folder; ``.pth`` files
inside a folder added that way are not processed, so the editable install of the
development checkout stays invisible. The tests check that Python imports the package
from the new environment and that its console script runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import masked_diffusion

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(masked_diffusion.__file__).resolve().parent

pytestmark = pytest.mark.slow

# Files that the wheel must contain besides the Python modules.
WHEEL_DATA = [
    "masked_diffusion/py.typed",
    "masked_diffusion/data_files/mnist_5k.npz",
    "masked_diffusion/data_files/MNIST_LICENSE.md",
]
if (PACKAGE_DIR / "data_files" / "digit_classifier.pt").is_file():
    WHEEL_DATA.append("masked_diffusion/data_files/digit_classifier.pt")

# Paths (relative to the sdist's top folder) that the sdist must contain.
SDIST_FILES = [
    "pyproject.toml",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "src/masked_diffusion/__init__.py",
    "src/masked_diffusion/py.typed",
    "src/masked_diffusion/data_files/mnist_5k.npz",
    "tests/conftest.py",
    "tests/test_packaging.py",
    "tests/public_api.json",
    "configs/quickstart.yaml",
    "docs/conf.py",
    "docs/index.md",
]


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"python -m build failed:\n{completed.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(dist_dir: Path) -> Path:
    wheels = sorted(dist_dir.glob("masked_diffusion-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist_dir}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def sdist(dist_dir: Path) -> Path:
    archives = sorted(dist_dir.glob("masked_diffusion-*.tar.gz"))
    assert len(archives) == 1, f"expected one sdist in {dist_dir}, found {archives}"
    return archives[0]


@pytest.fixture(scope="module")
def venv_dir(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    created = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
    )
    assert created.returncode == 0, f"python -m venv failed:\n{created.stderr}"
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    dependencies = Path(torch_site_packages())
    (Path(purelib) / "test_dependencies.pth").write_text(f"{dependencies}\n")

    command = [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--disable-pip-version-check",
        str(wheel),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"pip install of the wheel failed:\n{completed.stderr}"
    return venv


def torch_site_packages() -> str:
    """The site-packages folder that contains torch in the test environment."""
    import torch

    return str(Path(torch.__file__).resolve().parents[1])


def _run_installed(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in the fresh environment, with no PYTHONPATH from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_wheel_contains_data_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in WHEEL_DATA if name not in names]
    assert not missing, f"{wheel.name} lacks {missing}"


def test_wheel_declares_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        entry_points = [name for name in archive.namelist() if name.endswith("entry_points.txt")]
        assert entry_points, f"{wheel.name} has no entry_points.txt"
        text = archive.read(entry_points[0]).decode()
    assert "masked-diffusion = masked_diffusion.cli:main" in text


def test_wheel_has_no_tests_or_docs(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    stray = [name for name in names if name.startswith(("tests/", "docs/", "examples/"))]
    assert not stray, f"{wheel.name} contains files outside the package: {stray[:5]}"


def test_sdist_contains_sources_tests_and_configs(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    top = names[0].split("/")[0]
    relative = {name.split("/", 1)[1] for name in names if "/" in name}
    missing = [name for name in SDIST_FILES if name not in relative]
    assert not missing, f"{sdist.name} (top folder {top}) lacks {missing}"


def test_sdist_excludes_build_outputs(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    stray = [name for name in names if "/docs/_build/" in name or "/.venv" in name]
    assert not stray, f"{sdist.name} contains build outputs: {stray[:5]}"


def test_installed_wheel_imported(venv_dir: Path, tmp_path: Path) -> None:
    code = "import masked_diffusion; print(masked_diffusion.__file__)"
    completed = _run_installed(venv_dir, [str(venv_dir / "bin" / "python"), "-c", code], tmp_path)
    assert completed.returncode == 0, completed.stderr
    location = Path(completed.stdout.strip()).resolve()
    assert venv_dir.resolve() in location.parents, (
        f"masked_diffusion was imported from {location}, not from the wheel installed in {venv_dir}"
    )


def test_installed_wheel_loads_bundled_data(venv_dir: Path, tmp_path: Path) -> None:
    code = (
        "from masked_diffusion import load_dataset; "
        "print(len(load_dataset('mnist-sample', 'train')), "
        "len(load_dataset('mnist-sample', 'heldout')))"
    )
    completed = _run_installed(venv_dir, [str(venv_dir / "bin" / "python"), "-c", code], tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["4500", "500"]


def test_installed_console_script_help(venv_dir: Path, tmp_path: Path) -> None:
    script = venv_dir / "bin" / "masked-diffusion"
    assert script.is_file(), f"pip did not install the console script at {script}"
    completed = _run_installed(venv_dir, [str(script), "--help"], tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "usage: masked-diffusion" in completed.stdout


def test_installed_module_entry_point_help(venv_dir: Path, tmp_path: Path) -> None:
    command = [str(venv_dir / "bin" / "python"), "-m", "masked_diffusion", "--help"]
    completed = _run_installed(venv_dir, command, tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "usage: masked-diffusion" in completed.stdout
