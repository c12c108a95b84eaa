"""BENCHMARKS.md and the README's plots, regenerated from benchmarks/results/*.json (no benchmark is rerun).

Plots (matplotlib, PNG, under benchmarks/results/), each naming the peer measured in the same run and the machine
(``machine.cpu_model`` of its JSON):
  filesize.png  .qpeft file bytes vs PEFT LoRA r=8 / r=2 adapter_model.safetensors   (filesize.json)
  accuracy.png  test accuracy vs trainable parameters, LoRA r=8 as the peer           (accuracy.json)
  onnx.png      ONNX Runtime latency by export mode, ORT LoRA r=8 as the peer         (onnx.json)
  merge.png     qpeft merge time vs copying the checkpoint and PEFT merge + save      (merge.json)
  swap.png      adapter swap / request latency, AdapterBank vs PEFT LoRA r=8          (swap.json)
  vision.png    ViT accuracy vs trainable parameters (LoRA r=8 peer), ONNX latency    (vision.json)
A plot whose JSON is missing or unreadable is skipped, and BENCHMARKS.md says so.

    python -m benchmarks.report
writes BENCHMARKS.md (repository root) and the PNGs.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "BENCHMARKS.md"
# (results name, section title, what the script measures); scripts run in this order by ``python -m benchmarks``
SECTIONS = [
    ("filesize", "File size", "`.qpeft` bytes vs PEFT LoRA adapter files on the same MiniLM targets."),
    (
        "accuracy",
        "Accuracy",
        "Quantum-PEFT vs PEFT LoRA r=8, head-only and full fine-tuning on RT / TREC-6 / SMS.",
    ),
    (
        "accuracy_tuned",
        "Accuracy per byte, rates tuned on validation",
        (
            "Every method's learning rates picked on a held-out split; RT / TREC-6 / SMS and the ViT task; "
            "LoRA r=8 and r=2, head-only; the shipped file's accuracy against its bytes."
        ),
    ),
    ("quant", "Angle quantisation", "Accuracy change per angle bit-width of one trained adapter."),
    ("circuit", "Circuit apply cost", "Per-token cost of circuit vs dense-U mode vs the base matmul."),
    (
        "train_speed",
        "Training step time",
        (
            "Quantum-PEFT (K=8, full rank) vs PEFT LoRA r=8 per training step, MiniLM (1,024 and 4,096 token rows "
            "per step) and the ViT, 1 and 2 threads."
        ),
    ),
    (
        "llm",
        "LLM (SmolLM2-135M-Instruct)",
        "Quantum-PEFT vs PEFT LoRA r=8 and the untuned model on instruction tasks; bank generation vs merged.",
    ),
    ("onnx", "ONNX Runtime latency", "Export modes vs merged weights and ORT's own LoRA adapters."),
    (
        "onnx_llm",
        "Edge LLM: ONNX decoders (SmolLM2)",
        "Prefill and decode speed of the decoder export modes vs merged and ORT's LoRA; quality per precision.",
    ),
    ("merge", "Merge", "`qpeft merge` vs copying the checkpoint and PEFT merge + save."),
    (
        "scale",
        "Serving at scale: Ray Serve",
        (
            "A local Ray Serve deployment (2 replicas, 100 adapters by multiplexed id, 8 client threads): "
            "every answer checked; one replica killed mid-run."
        ),
    ),
    ("swap", "Runtime adapter swap", "AdapterBank vs PEFT LoRA `load_adapter` / `set_adapter`."),
    (
        "vision",
        "Vision (ViT, Fashion-MNIST 5-9)",
        "Quantum-PEFT vs PEFT LoRA r=8 and head-only on the shipped small ViT; ONNX merged vs runtime latency.",
    ),
    (
        "robustness_files",
        "Robustness: corrupted adapter files",
        "Mutated `.qpeft` files: each refused with a one-line FormatError or loading to bit-identical logits.",
    ),
    (
        "robustness_kills",
        "Robustness: killed writers",
        "SIGKILL at random moments of every writing command: inputs intact, old or new output whole.",
    ),
    (
        "robustness_serve",
        "Robustness: poisoned requests",
        "A real server under 8 client threads with 1% poisoned requests: every valid answer checked.",
    ),
    (
        "robustness_ort",
        "Robustness: adapter reloads under load",
        "One swappable ORT session, 8 threads running while adapters are reloaded: no false errors.",
    ),
]
PEER_COLOUR, OURS_COLOUR, REF_COLOUR = "#d62728", "#1f77b4", "#7f7f7f"


def load(name: str, folder: Path = RESULTS_DIR) -> dict | None:
    """The parsed results/<name>.json, or None when it is missing or not valid JSON."""
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def machine_label(data: dict) -> str:
    """'AMD EPYC, 2 cores, load 5.8' from a results JSON's ``machine`` entry."""
    m = data.get("machine") or {}
    load_avg = (m.get("load_average_1_5_15min") or [None])[0]
    parts = [m.get("cpu_model", "unknown CPU"), f"{m.get('cpu_count', '?')} cores"]
    if load_avg is not None:
        parts.append(f"load {load_avg:.1f}")
    return ", ".join(parts)


def run_date(data: dict, path: Path) -> str:
    """'written 2026-12-06 08:11 UTC' from the JSON's ``date_utc`` (benchmarks.common.write_results records
    it); for a JSON from before that, the date git last committed it, said so. Never the file's mtime: a
    checkout or copy resets it."""
    try:
        when = datetime.datetime.fromisoformat(str(data["date_utc"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        pass
    else:
        if when.tzinfo is not None:
            return f"written {when.astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    try:
        committed = subprocess.run(
            ["git", "log", "-1", "--format=%cI", "--", path.name],
            check=False,
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        when = datetime.datetime.fromisoformat(committed)
    except (OSError, ValueError, subprocess.SubprocessError):
        return "(run date not recorded)"
    return f"committed {when.astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (run date not recorded)"


def _finish(fig, path: Path, title: str, data: dict) -> None:
    fig.suptitle(f"{title}\nmachine: {machine_label(data)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _file_precision(row: dict) -> str:
    """How a file-size row stores angles, λ and head: 'fp32', '4-bit', '6-bit + 3-bit λ + 8-bit head'."""
    angles = "fp32" if row["bits"] == 32 else f"{row['bits']}-bit"
    lam = f" + {row['lambda_bits']}-bit λ" if row.get("lambda_bits") else ""
    return angles + lam + (f" + {row['head_bits']}-bit head" if row.get("head_bits") else "")


def plot_filesize(data: dict, path: Path) -> str:
    """Bars of .qpeft bytes (4-bit angles, fp16 λ/head, head + fingerprint; fp32; λ codes), LoRA as the peer."""
    lora = data["lora_bytes"]
    rows = [
        r
        for r in data["rows"]
        if r["head"] and r["fingerprint"] and (r["bits"] in (4, 32) or r.get("lambda_bits"))
    ]
    labels = [f"LoRA r={r[1:]} (peer)" for r in lora] + [
        f"qpeft K={r['K']} L={r['L']} {_file_precision(r)}" for r in rows
    ]
    sizes = list(lora.values()) + [r["bytes"] for r in rows]
    colours = [PEER_COLOUR] * len(lora) + [OURS_COLOUR] * len(rows)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.6))
    ax.barh(labels, sizes, color=colours)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("file bytes (log)")
    for y, size in enumerate(sizes):
        ratio = lora["r8"] / size
        ax.text(
            size,
            y,
            f" {size:,} B" + (f"  ({ratio:.0f}× < LoRA r=8)" if ratio > 1.5 else ""),
            va="center",
            fontsize=7,
        )
    ax.set_xlim(right=max(sizes) * 20)
    _finish(fig, path, "MiniLM all-linear adapter file size: .qpeft vs PEFT LoRA (peer, same run)", data)
    return "PEFT LoRA r=8 / r=2 adapter_model.safetensors, same 37 targets + head, measured in the same run"


def _shipped(cell: dict) -> tuple[int, float]:
    """(file bytes, mean accuracy) of what a method ships: the compact .qpeft file and the accuracy measured
    from it (Quantum-PEFT), the fp32 adapter_model.safetensors (LoRA), the fp32 head or checkpoint (others)."""
    if cell["kind"] == "qpeft" and cell.get("compact_file_accuracy_mean") is not None:
        return cell["file_bytes"]["compact"], cell["compact_file_accuracy_mean"]
    return cell["file_bytes"]["fp32"], cell["accuracy_mean"]


def pareto(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points no other point beats on both file bytes (fewer) and accuracy (higher), by bytes."""
    front: list[tuple[int, float]] = []
    for size, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((size, accuracy))
    return front


def plot_accuracy(data: dict, path: Path) -> str:
    """Per task: mean accuracy of the shipped file vs its bytes (log x), the Pareto front, LoRA r=8 the peer."""
    tasks = list(dict.fromkeys(c["task"] for c in data["cells"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(9.0, 5.2 * len(tasks)), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = [c for c in data["cells"] if c["task"] == task]
        for c in cells:
            colour = (
                PEER_COLOUR if c["kind"] == "lora" else OURS_COLOUR if c["kind"] == "qpeft" else REF_COLOUR
            )
            size, accuracy = _shipped(c)
            std = 100 * c["accuracy_std"] if c["accuracy_std"] is not None else None
            ax.errorbar(size, 100 * accuracy, yerr=std, fmt="o", color=colour, capsize=3)
            ax.annotate(
                c["method"], (size, 100 * accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        front = pareto([_shipped(c) for c in cells])
        ax.step(
            [b for b, _ in front],
            [100 * a for _, a in front],
            where="post",
            color="k",
            lw=0.8,
            label="Pareto front",
        )
        peer = next((c for c in cells if c["method"] == "lora-r8"), None)
        if peer is not None:
            ax.axhline(
                100 * peer["accuracy_mean"] - 1, color=PEER_COLOUR, ls=":", lw=1, label="LoRA r=8 − 1 point"
            )
            ax.axvline(
                peer["file_bytes"]["fp32"] / 100, color=REF_COLOUR, ls="--", lw=1, label="100× below LoRA r=8"
            )
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("file bytes (log): compact .qpeft, LoRA fp32 adapter_model.safetensors")
        ax.set_ylabel("test accuracy % of that file")
        seeds = len(data["settings"]["seeds"])
        ax.set_title(f"{task} ({seeds} seed{'s' if seeds > 1 else ''})", fontsize=9)
        ax.margins(x=0.25, y=0.15)
    s = data["settings"]
    title = (
        "Accuracy vs file bytes, all-linear (MiniLM; the ViT on fmnist-5to9); peer: PEFT LoRA r=8 (same run)"
    )
    if data.get("reduced"):
        title += (
            f"\nREDUCED RUN: {s['train_examples']:,} train / {s['test_examples']:,} test, {s['epochs']} epoch(s), "
            f"{len(s['seeds'])} seed(s), not the full study"
        )
    _finish(fig, path, title, data)
    return "PEFT LoRA r=8 (all-linear, SEQ_CLS), trained with the same loop, data and seeds in the same run"


def plot_onnx(data: dict, path: Path) -> str:
    """Per input shape: ms per export mode, ORT LoRA r=8 as the peer, merged as the reference."""
    shapes = list(data["ms"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        times = data["ms"][shape]
        names = list(times)
        colours = [
            PEER_COLOUR if "LoRA" in n else REF_COLOUR if n == "merged" else OURS_COLOUR for n in names
        ]
        ax.barh(names, list(times.values()), color=colours)
        ax.invert_yaxis()
        for y, (name, ms) in enumerate(times.items()):
            ax.text(ms, y, f" {ms:.1f} ms", va="center", fontsize=7)
        ax.set_xlim(right=max(times.values()) * 1.3)
        ax.set_xlabel("ms per run (median)")
        ax.set_title(f"batch × tokens = {shape.replace('x', '×')}", fontsize=9)
    threads = data.get("ort_threads")
    title = "ONNX Runtime latency by export mode (MiniLM); peer: ORT LoRA r=8 adapter (same run)"
    _finish(fig, path, title + (f", {threads} ORT thread" if threads else ""), data)
    return "ONNX Runtime's own LoRA r=8 adapter (MatMul(MatMul(x, A), B)) on the same model, same run"


def plot_merge(data: dict, path: Path) -> str:
    """Per checkpoint: merge seconds vs plain copy (the reference) and PEFT merge + save (the peer)."""
    checkpoints = [k for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("seconds"), dict)]
    if not checkpoints:
        raise KeyError("no checkpoint entry with 'seconds'")
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5.5 * len(checkpoints), 3.4), squeeze=False)
    for ax, name in zip(axes[0], checkpoints):
        seconds = data[name]["seconds"]
        copy = seconds.get("copy")
        colours = [
            PEER_COLOUR if m.startswith("peft") else REF_COLOUR if m == "copy" else OURS_COLOUR
            for m in seconds
        ]
        ax.barh(list(seconds), list(seconds.values()), color=colours)
        ax.invert_yaxis()
        for y, s in enumerate(seconds.values()):
            ax.text(
                s, y, f" {s:.2f} s" + (f" ({s / copy:.1f}× copy)" if copy else ""), va="center", fontsize=7
            )
        ax.set_xlim(right=max(seconds.values()) * 1.6)
        ax.set_xlabel("seconds")
        size = data[name].get("checkpoint_bytes")
        ax.set_title(name + (f" ({size / 1e9:.1f} GB)" if size else ""), fontsize=9)
    _finish(
        fig, path, "Merge time vs copying the checkpoint; peer: PEFT LoRA r=8 merge_and_unload + save", data
    )
    return "a plain file copy of the same checkpoint and PEFT LoRA r=8 merge_and_unload + save_pretrained"


def plot_swap(data: dict, path: Path) -> str:
    """(a) ms to make a new adapter servable, (b) ms per request, AdapterBank vs PEFT LoRA r=8."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(12, 3.8))
    labels, values, colours = [], [], []
    for case, entry in data["servable_seconds"].items():
        held = case.rsplit("_", 1)[-1]
        for key, label, colour in (
            ("bank_load_s", "bank.load", OURS_COLOUR),
            ("bank_load_and_materialise_s", "bank.load + U/V", OURS_COLOUR),
            ("peft_load_adapter_set_adapter_s", "PEFT load+set (peer)", PEER_COLOUR),
        ):
            if key in entry:
                labels.append(f"{label}, PEFT holds {held}")
                values.append(1e3 * entry[key])
                colours.append(colour)
    ax_a.barh(labels, values, color=colours)
    ax_a.set_xscale("log")
    ax_a.invert_yaxis()
    for y, v in enumerate(values):
        ax_a.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    ax_a.set_xlim(right=max(values) * 4)
    ax_a.set_xlabel("ms to make a new adapter servable (log)")
    ax_a.tick_params(axis="y", labelsize=7)
    latency = data["request_latency_seconds"]
    names = list(latency)
    ax_b.barh(
        names,
        [1e3 * v for v in latency.values()],
        color=[PEER_COLOUR if n.startswith("peft") else OURS_COLOUR for n in names],
    )
    ax_b.invert_yaxis()
    ax_b.set_xlabel(f"ms per request ({data.get('args', {}).get('request_texts', '?')} texts)")
    ax_b.tick_params(axis="y", labelsize=7)
    for y, v in enumerate(latency.values()):
        ax_b.text(1e3 * v, y, f" {1e3 * v:.0f}", va="center", fontsize=7)
    _finish(
        fig, path, "Adapter swap on MiniLM: AdapterBank (.qpeft K=8) vs peer PEFT LoRA r=8 (same run)", data
    )
    return "PEFT LoRA r=8 load_adapter / set_adapter on the same model, same run"


def plot_vision(data: dict, path: Path) -> str:
    """Left: ViT test accuracy vs trainable parameters (LoRA r=8 the peer); right: ONNX ms per export mode."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.4))
    for row in data["summary"]:
        kind = row["method"].split()[0].lower()
        colour = PEER_COLOUR if kind == "lora" else OURS_COLOUR if kind == "qpeft" else REF_COLOUR
        x, y = row["trainable_parameters"], 100 * row["test_accuracy_mean"]
        ax_a.plot(x, y, "o", color=colour)
        ax_a.annotate(row["method"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    s = data["settings"]
    ax_a.set_xscale("log")
    ax_a.set_xlabel("trainable parameters (log, head included)")
    ax_a.set_ylabel("test accuracy %")
    ax_a.set_title(
        f"{s['task']}: {s['max_train']:,} train / {s['max_test']:,} test, {s['epochs']} epochs, "
        f"mean of {len(s['seeds'])} seeds",
        fontsize=9,
    )
    ax_a.margins(x=0.25, y=0.15)
    modes = list(data["onnx"])
    for i, batch in enumerate((1, 32)):
        values = [data["onnx"][m][f"batch{batch}_ms"] for m in modes]
        bars = ax_b.barh(
            [j + 0.4 * i for j in range(len(modes))], values, height=0.38, label=f"batch {batch}"
        )
        ax_b.bar_label(bars, fmt="%.1f ms", fontsize=7)
    ax_b.set_yticks([j + 0.2 for j in range(len(modes))], modes)
    ax_b.set_xlabel("ms per batch (ORT, CPU)")
    ax_b.set_title("ONNX Runtime latency by export mode (merged = reference)", fontsize=9)
    ax_b.legend(fontsize=7)
    _finish(
        fig, path, "ViT (samples/vit-fmnist5) adapted to unseen classes; peer: PEFT LoRA r=8 (same run)", data
    )
    return "PEFT LoRA r=8 on the same ViT linear layers, same data, epochs and seeds, in the same run"


PLOTS: dict[str, tuple[str, Callable[[dict, Path], str]]] = {
    "filesize": ("filesize.png", plot_filesize),
    "accuracy": ("accuracy.png", plot_accuracy),
    "accuracy_tuned": ("accuracy_tuned.png", plot_accuracy),
    "onnx": ("onnx.png", plot_onnx),
    "merge": ("merge.png", plot_merge),
    "swap": ("swap.png", plot_swap),
    "vision": ("vision.png", plot_vision),
}


def demote(markdown: str, levels: int = 2) -> str:
    """Push every markdown heading down ``levels`` levels (outside code fences)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" * levels + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def section(name: str, title: str, what: str, folder: Path, notes: list[str]) -> str:
    """One BENCHMARKS.md section: command, machine, plot (or why not), the script's own markdown."""
    data = load(name, folder)
    text = f"## {title}\n\n{what}"
    if (ROOT / "benchmarks" / f"{name}.py").is_file():
        text += f"{' ' if what else ''}Run alone: `python -m benchmarks.{name}`."
    text += "\n\n"
    if data is None:
        notes.append(f"{name}: no results (benchmarks/results/{name}.json missing); section and plot skipped")
        return text + f"_Not run yet: `benchmarks/results/{name}.json` is missing._\n\n"
    text += f"Results {run_date(data, folder / f'{name}.json')} on {machine_label(data)}.\n\n"
    if name in PLOTS:
        png, plot = PLOTS[name]
        try:
            peer = plot(data, folder / png)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            plt.close("all")
            notes.append(
                f"{name}: plot skipped ({type(e).__name__}: {e}; the JSON's layout is not the expected one)"
            )
            text += f"_Plot skipped: {name}.json does not have the expected layout ({type(e).__name__}: {e})._\n\n"
        else:
            rel = (folder / png).relative_to(ROOT) if (folder / png).is_relative_to(ROOT) else folder / png
            text += f"![{title}]({rel})\n\n_Peer: {peer}. Machine: {machine_label(data)}._\n\n"
    md = folder / f"{name}.md"
    if md.is_file():
        text += demote(md.read_text().strip()) + "\n\n"
    return text


def script_summary(name: str) -> str:
    """First line of benchmarks/<name>.py's docstring (read, not imported), or ''."""
    try:
        doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.splitlines()[0] if doc else ""


def write_report(folder: Path = RESULTS_DIR, output: Path = OUTPUT) -> list[str]:
    """Regenerate the plots and BENCHMARKS.md from the JSON in ``folder``; returns the notes (skips)."""
    notes: list[str] = []
    body = "".join(section(name, title, what, folder, notes) for name, title, what in SECTIONS)
    known = {name for name, _, _ in SECTIONS}
    others = sorted(
        p.stem for p in folder.glob("*.json") if p.stem not in known and not p.stem.endswith("_smoke")
    )
    body += "".join(section(name, name, script_summary(name), folder, notes) for name in others)
    now = datetime.datetime.now(datetime.timezone.utc)
    head = (
        "# Benchmarks\n\n"
        f"Generated {now:%Y-%m-%d %H:%M} UTC by `python -m benchmarks.report` from `benchmarks/results/*.json`. "
        "`python -m benchmarks` reruns every benchmark script with its defaults and then this report "
        "(`python -m benchmarks --only filesize,swap` runs a subset); each script also runs alone as "
        "`python -m benchmarks.<name>`. Every figure names the peer measured in the same run and the machine. "
        "Timings come from a shared 2-core machine with other jobs running: compare methods within one run, "
        "not across runs.\n\n"
    )
    if notes:
        head += "Skipped:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n"
    output.write_text(head + body.rstrip() + "\n")
    return notes


def main(argv: list[str] | None = None) -> None:
    """Write BENCHMARKS.md and the plots; print what was skipped."""
    argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.splitlines()[0]
    ).parse_args(argv)
    notes = write_report()
    print(f"wrote {OUTPUT.relative_to(ROOT)} and plots in {RESULTS_DIR.relative_to(ROOT)}/")
    for note in notes:
        print(f"skipped: {note}")


if __name__ == "__main__":
    main()
