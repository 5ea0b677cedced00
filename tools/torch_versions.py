"""Run the core test suite on other torch builds and Pythons: one fresh venv per (torch, Python) pair.

    python tools/torch_versions.py 2.3.0@3.11 2.4.0@3.11 2.13.0+cpu@3.11 2.13.0@3.11 2.15.0@3.13
    python tools/torch_versions.py 2.4.0@3.10 -- -x tests/test_settings.py   # arguments after -- go to pytest

Each SPEC is ``TORCH@PYTHON``. ``TORCH`` is a release (``2.4.0``: pip's choice for this platform, on
x86_64 Linux a CUDA wheel, which the suite runs on the CPU) or a release with a local label
(``2.13.0+cpu``: that exact build, e.g. PyTorch's CPU wheel). ``PYTHON`` is a version (``3.10``, found
as ``python3.10`` on PATH or under pyenv) or a path to an interpreter.

For every pair the tool makes a venv under ``--workdir`` (kept and reused, ``--fresh`` remakes it),
installs ``torch==TORCH`` and then this repository's committed tree (``git archive HEAD``, so edits
in the working copy do not leak into a run) with the ``test`` extra only, keeping that torch,
checks that ``import cagrad_clip`` works (below the floor in ``pyproject.toml`` the tree is
installed without dependencies and the import must fail with the floor's message), runs
``python -m pytest`` there and prints a Markdown table of the outcomes. pip's machine-wide
constraints (a cap on torch) and local wheel directories are switched off for the tool's own pip
calls (``PIP_CONFIG_FILE=/dev/null``) so that any release on the package index can be asked for;
nothing outside ``--workdir`` changes. Not in CI (each pair downloads a torch build and runs the suite: several minutes).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_WORDS = ("failed", "passed", "skipped", "xfailed", "xpassed", "error", "errors")


@dataclass
class Spec:
    torch: str
    python: str

    @classmethod
    def parse(cls, text: str) -> Spec:
        torch, sep, python = text.partition("@")
        if not sep or not re.fullmatch(r"\d+\.\d+(\.\d+)?(\+\w+)?", torch) or not python:
            raise argparse.ArgumentTypeError(f"{text!r} is not TORCH@PYTHON (e.g. 2.4.0@3.11, 2.13.0+cpu@3.11, 2.15.0@/usr/bin/python3.13)")
        return cls(torch, python)

    @property
    def slug(self) -> str:
        return f"torch{self.torch}-py{Path(self.python).name if os.sep in self.python else self.python}".replace("+", "_")


@dataclass
class Outcome:
    spec: Spec
    torch_version: str = "?"
    build: str = "?"
    python_version: str = "?"
    result: str = "?"
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    ok: bool = False


def find_python(version_or_path: str) -> str:
    """An interpreter for ``3.10`` (``python3.10`` on PATH if it runs, else pyenv's newest 3.10.x) or a given path."""
    if os.sep in version_or_path:
        return version_or_path
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which(f"python{version_or_path}")]
    candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version_or_path}.*", "bin", "python")), reverse=True)
    for candidate in candidates:
        # a pyenv shim is on PATH even when its version is not active, and then fails: try it
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit(f"no Python {version_or_path} found (neither python{version_or_path} on PATH nor under {root}/versions)")


def release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


def floor(src: Path) -> tuple[int, int]:
    """The torch floor the tree's pyproject.toml states (``torch>=X.Y``)."""
    match = re.search(r'"torch>=(\d+\.\d+)', (src / "pyproject.toml").read_text())
    if match is None:
        raise SystemExit(f"no torch>= requirement in {src / 'pyproject.toml'}")
    return release(match.group(1))


def pip_env(spec: Spec) -> dict[str, str]:
    """pip for ``spec``: a release without a local label comes from PyPI alone (no configuration files,
    ``PIP_CONFIG_FILE=/dev/null``, and no ``PIP_*`` index, find-links or constraint variables: a
    machine-wide torch cap, a local wheel directory or an extra index, where a local ``+cpu`` build would
    otherwise win, are all left out); a local build keeps the configuration."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if "+" not in spec.torch:
        env["PIP_CONFIG_FILE"] = os.devnull
        for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX"):
            env.pop(name, None)  # the same settings given as environment variables
    return env


def run(cmd: list[str], log, *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float) -> int:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    try:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log.write(f"\n[timed out after {timeout:.0f} s]\n")
        return -1


def snapshot(workdir: Path) -> tuple[Path, str]:
    """The committed tree (``git archive HEAD``) unpacked once per commit under ``workdir``."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    if dirty.strip():
        print(f"note: the working copy has uncommitted changes; the runs test commit {commit} only", file=sys.stderr)
    src = workdir / f"src-{commit}"
    if not src.exists():
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src, commit


def summarise(log_text: str) -> tuple[str, list[str]]:
    """pytest's final counts (``1086 passed, 160 skipped``) and the ids of failed or erroring tests."""
    counts = ""
    for line in reversed(log_text.splitlines()):
        if re.search(r"\d+ (" + "|".join(SUMMARY_WORDS) + r")\b", line) and " in " in line:
            counts = ", ".join(re.findall(r"\d+ (?:" + "|".join(SUMMARY_WORDS) + r")\b", line))
            break
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", log_text, flags=re.MULTILINE)
    return counts or "no pytest summary (see the log)", failures


def check(spec: Spec, src: Path, workdir: Path, args: argparse.Namespace) -> Outcome:
    outcome = Outcome(spec)
    venv = workdir / spec.slug
    log_path = workdir / "logs" / f"{spec.slug}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        if args.fresh and venv.exists():
            shutil.rmtree(venv)
        py = venv / "bin" / "python"
        if not py.exists() and run([find_python(spec.python), "-m", "venv", str(venv)], log, timeout=300) != 0:
            outcome.result = "venv failed"
            return outcome
        env = pip_env(spec)
        if run([str(py), "-m", "pip", "install", "--quiet", f"torch=={spec.torch}"], log, env=env, timeout=args.install_timeout) != 0:
            outcome.result = "torch install failed"
            return outcome
        # The torch just installed stays: a constraint keeps pip from "fixing" a release below the floor.
        pin = venv / "torch-constraint.txt"
        pin.write_text(f"torch=={spec.torch}\n")
        env = dict(env, PIP_CONSTRAINT=str(pin))
        below_floor = release(spec.torch) < floor(src)
        # Below the floor pip would refuse the package's own requirement: install it without dependencies,
        # to see the import refuse that torch.
        install = ["-e", str(src), "--no-deps"] if below_floor else ["-e", f"{src}[{args.extras}]"]
        if run([str(py), "-m", "pip", "install", "--quiet", *install], log, env=env, timeout=args.install_timeout) != 0:
            outcome.result = f"install of .[{args.extras}] failed"
            return outcome
        probe = subprocess.run(
            [str(py), "-c", "import platform, torch; print(torch.__version__, torch.version.cuda, platform.python_version())"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            version, cuda, python_version = probe.stdout.split()
            outcome.torch_version, outcome.python_version = version, python_version
            outcome.build = "CPU" if cuda == "None" else f"CUDA {cuda} wheel, on CPU"
        imported = subprocess.run([str(py), "-c", "import cagrad_clip"], capture_output=True, text=True, cwd=src)
        log.write(f"\n$ python -c 'import cagrad_clip'\n{imported.stderr}")
        if imported.returncode != 0 or below_floor:
            message = (imported.stderr.strip().splitlines() or ["imported (below the floor!)"])[-1]
            outcome.ok = below_floor and "needs torch>=" in message
            outcome.result = "refused at import: " + message.split(": ", 1)[-1].split(": ")[0][:120]  # the message's first clause
        else:
            env = dict(os.environ, PYTHONHASHSEED="0")
            pytest = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
            rc = run(pytest, log, env=env, cwd=src, timeout=args.test_timeout)
            log.flush()
            outcome.result, outcome.failures = summarise(log_path.read_text())
            outcome.ok = rc == 0
            if rc == -1:
                outcome.result = f"timed out after {args.test_timeout:.0f} s; {outcome.result}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def table(outcomes: list[Outcome], commit: str, extras: str) -> str:
    lines = [
        f'Core suite (`pip install -e ".[{extras}]"`, `python -m pytest`) at commit {commit}, '
        f"by `python tools/torch_versions.py {' '.join(f'{o.spec.torch}@{o.spec.python}' for o in outcomes)}`:",
        "",
        "| torch | build | Python | result | minutes | failed or erroring tests |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        failed = ", ".join(f"`{f}`" for f in o.failures[:3]) + (f" and {len(o.failures) - 3} more" if len(o.failures) > 3 else "")
        mark = "" if o.ok else " ✗"
        lines.append(f"| {o.torch_version} | {o.build} | {o.python_version} | {o.result}{mark} | {o.seconds / 60:.1f} | {failed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", type=Spec.parse, metavar="TORCH@PYTHON")
    parser.add_argument("--workdir", type=Path, default=Path("results/torch_versions"), help="venvs, logs and the tree snapshot")
    parser.add_argument("--extras", default="test", help="the package extras to install (default: test, the core suite)")
    parser.add_argument("--fresh", action="store_true", help="remake each venv instead of reusing it")
    parser.add_argument("--install-timeout", type=float, default=1800)
    parser.add_argument("--test-timeout", type=float, default=3600)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.pytest_args = argv[cut + 1 :]  # after `--`: passed to pytest (e.g. -- -x tests/test_settings.py)
    workdir = args.workdir.resolve()
    src, commit = snapshot(workdir)
    outcomes = []
    for spec in args.specs:
        print(f"[{time.strftime('%H:%M:%S')}] torch {spec.torch} on Python {spec.python} ...", flush=True)
        outcome = check(spec, src, workdir, args)
        print(f"    {outcome.result} ({outcome.seconds / 60:.1f} min; log {workdir / 'logs' / (spec.slug + '.log')})", flush=True)
        outcomes.append(outcome)
    report = table(outcomes, commit, args.extras)
    print("\n" + report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report + "\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
