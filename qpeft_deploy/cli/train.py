"""``qpeft train`` and ``qpeft eval``."""

from __future__ import annotations

import json

import click

from qpeft_deploy.cli.options import base_option, overwrite_option, quiet_option
from qpeft_deploy.cli.signals import unwinds


def parse_targets(value: str) -> str | list[str]:
    """``all-linear`` | ``re:<regex>`` | comma-separated module names → attach()'s ``targets``."""
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [name.strip() for name in value.split(",") if name.strip()]


def parse_rank(value: str) -> int | str:
    """``full`` or a positive integer."""
    if value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an integer or 'full'") from None


@click.command("train")
@base_option
@click.option(
    "--task",
    required=True,
    help="rt | trec6 | sms | csv:<path with text,label columns>; image bases: fmnist-5to9 | fmnist-0to4 | mnist; "
    "causal LM bases (smollm2): rt | trec6 | sms as instructions | jsonl:<path> | csv:<path> with prompt,response",
)
@click.option(
    "--targets",
    default="all-linear",
    show_default=True,
    help="all-linear | comma-separated module names | re:<regex>",
)
@click.option("--rank", default="8", show_default=True, help="K per target, or 'full' for min(N, M)")
@click.option("--layers", default=1, show_default=True, type=int, help="circuit layers L")
@click.option("--alpha", default=1.0, show_default=True, type=float)
@click.option("--variant", default="pauli", show_default=True, type=click.Choice(["pauli", "taylor"]))
@click.option("--epochs", default=2, show_default=True, type=int)
@click.option("--lr", default=2e-2, show_default=True, type=float, help="learning rate of angles and λ")
@click.option("--head-lr", default=2e-2, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--max-examples", default=None, type=int, help="use the first N training examples")
@click.option("--max-test", default=None, type=int, help="evaluate on the first N test examples")
@click.option("--max-length", default=128, show_default=True, type=int, help="tokens per text")
@click.option("--prune-to", default=None, type=int, help="intrinsic rank to prune λ to during training")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--bits", default=None, type=int, help="quantise angles to b bits in the saved file")
@click.option(
    "--lambda-bits",
    default=None,
    type=click.IntRange(2, 8),
    help="store λ as b-bit codes with one scale per target (format version 3)",
)
@click.option(
    "--head-bits",
    default=None,
    type=click.IntRange(2, 8),
    help="store the head's weights as b-bit codes with one scale per row (format version 5)",
)
@click.option(
    "--qat/--no-qat",
    default=True,
    show_default=True,
    help="with --bits / --lambda-bits / --head-bits: train on those grids (straight-through) so the file reproduces "
    "the model",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1, None),
    help="torch threads (default: the free cores, CPU count less the 1-minute load average)",
)
@click.option("--no-eval", is_flag=True, help="skip the test-set evaluation")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="adapter file (.qpeft; refused before training if it exists, unless --overwrite)",
)
@overwrite_option
@quiet_option
@unwinds
def train_command(
    base: str,
    task: str,
    targets: str,
    rank: str,
    output: str,
    no_eval: bool,
    overwrite: bool,
    quiet: bool,
    **options,
) -> None:
    """Train an adapter (angles, λ and the task head) on a text- or image-classification task; on a causal LM
    (SmolLM2) an adapter on an instruction task, loss on the answer tokens, no head."""
    from qpeft_deploy.models import is_causal_base
    from qpeft_deploy.training.train import TrainSpec, train_adapter

    if is_causal_base(base):
        from qpeft_deploy.training.causal import train_causal_adapter as train_adapter

    spec = TrainSpec(base=base, task=task, targets=parse_targets(targets), rank=parse_rank(rank), **options)
    report = train_adapter(spec, output, evaluate=not no_eval, quiet=quiet, overwrite=overwrite)
    click.echo(json.dumps(report, indent=2))


@click.command("eval")
@base_option
@click.option(
    "--adapter", required=True, type=click.Path(), help="adapter (.qpeft file or PEFT-native folder)"
)
@click.option(
    "--task",
    required=True,
    help="rt | trec6 | sms | csv:<path> | fmnist-5to9 | fmnist-0to4 | mnist; causal LM bases: rt | trec6 | sms "
    "| jsonl:<path> | csv:<path> with prompt,response",
)
@click.option("--max-examples", default=None, type=int, help="evaluate on the first N test examples")
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option(
    "--max-new-tokens",
    default=None,
    type=click.IntRange(1, None),
    help="causal LM: tokens generated per answer (default: the longest reference answer's plus 2)",
)
@click.option("--force", is_flag=True, help="load even if the base fingerprint differs")
@quiet_option
def eval_command(
    base: str,
    adapter: str,
    task: str,
    max_examples: int | None,
    max_length: int,
    max_new_tokens: int | None,
    force: bool,
    quiet: bool,
) -> None:
    """Evaluate an adapter on a task's test split: accuracy and loss, or on a causal LM the exact-match accuracy
    of greedy answers and the held-out loss of the answer tokens."""
    from qpeft_deploy.models import is_causal_base
    from qpeft_deploy.training.train import evaluate_adapter

    options = {"max_examples": max_examples, "max_length": max_length, "force": force, "quiet": quiet}
    if is_causal_base(base):
        from qpeft_deploy.training.causal import evaluate_causal_adapter

        report = evaluate_causal_adapter(base, adapter, task, max_new_tokens=max_new_tokens, **options)
    else:
        report = evaluate_adapter(base, adapter, task, **options)
    click.echo(json.dumps(report, indent=2))
