"""The demo's report directory: grid.png, loss_curves.png, metrics.json and report.md linking them."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdray.demo.results import DemoRun
from sdray.evaluate import summary_lines
from sdray.storage import atomic_dir

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
CURVES_FILE = "loss_curves.png"
REPORT_FILE = "report.md"


def loss_curves_png(vae_history: list[dict], unet_history: list[dict]) -> bytes:
    """Three panels: VAE loss, VAE held-out PSNR (both per report), UNet loss per step with a moving mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (vae_ax, psnr_ax, unet_ax) = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    steps = [r["step"] for r in vae_history]
    vae_ax.plot(steps, [r["loss"] for r in vae_history], marker="o", markersize=3)
    vae_ax.set(title="VAE training loss", xlabel="step", yscale="log")
    psnr_ax.plot(steps, [r["psnr"] for r in vae_history], marker="o", markersize=3, color="tab:green")
    psnr_ax.set(title="VAE held-out PSNR (dB)", xlabel="step")
    losses = [r["loss"] for r in unet_history]
    window = max(1, min(25, len(losses) // 5))
    mean = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(losses))
    ]
    unet_steps = [r["step"] for r in unet_history]
    unet_ax.plot(unet_steps, losses, alpha=0.3, color="tab:blue")
    unet_ax.plot(unet_steps, mean, color="tab:blue", label=f"{window}-step mean")
    unet_ax.set(title="UNet diffusion loss", xlabel="step")
    unet_ax.legend()
    for ax in (vae_ax, psnr_ax, unet_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def report_metrics(run: DemoRun) -> dict[str, Any]:
    """The content of metrics.json: stage times, load, VAE and UNet summaries, faithfulness accuracies."""
    results = run.results
    if not (results.data and results.vae and results.preprocess and results.unet and results.generate):
        raise RuntimeError("the demo report needs every stage's results")
    faith = {k: v for k, v in (results.faithfulness or {}).items() if k != "recovered"}
    pre = results.preprocess
    return {
        "quick": run.opts.quick,
        "stage_seconds": dict(run.stage_s),
        "total_seconds": round(sum(run.stage_s.values()), 1),
        "machine": {"cpus": _cpus(), "load_avg_1_5_15": run.load_avg},
        "data": asdict(results.data),
        "vae": results.vae.summary(),
        "preprocess": {k: pre.get(k) for k in ("rows_in", "rows_written", "rows_rejected", "shards")},
        "unet": results.unet.summary(),
        "sampling": {
            "images": len(results.generate.images),
            "samples_per_prompt": run.opts.samples_per_prompt,
            "steps": run.opts.sampler_steps,
            "guidance_scale": run.opts.guidance_scale,
            "scheduler": run.opts.scheduler,
            "first_seed": run.opts.seed,
        },
        "faithfulness": faith,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def report_markdown(metrics: dict[str, Any]) -> str:
    """A short human report: stage times, the numbers that matter, and links to the pictures."""
    vae, unet, faith = metrics["vae"], metrics["unet"], metrics["faithfulness"]
    times = "\n".join(f"| {name} | {sec:.1f} |" for name, sec in metrics["stage_seconds"].items())
    load = metrics["machine"]["load_avg_1_5_15"]
    return f"""# sdray demo report{" (quick smoke run: numbers mean nothing)" if metrics["quick"] else ""}

![samples]({GRID_FILE})

Generated images (held-out combinations first; green caption = colour, shape and position all recovered
from the pixels as asked, red = not). Loss curves: [{CURVES_FILE}]({CURVES_FILE}). All numbers:
[{METRICS_FILE}]({METRICS_FILE}).

| stage | seconds |
|---|---|
{times}
| **total** | **{metrics["total_seconds"]:.1f}** |

Machine: {metrics["machine"]["cpus"]} CPUs; load average (1/5/15 min) {load.get("start")} at the start,
{load.get("end")} at the end (other jobs on a shared machine slow every stage).

- VAE: {vae["psnr_db"]:.2f} dB held-out reconstruction PSNR after {vae["steps"]} steps
  (scaling factor {vae["scaling_factor"]:.3f}).
- UNet: {unet["steps"]} steps, final loss {unet["final_loss"]:.4f}.
- Sampling: {metrics["sampling"]["images"]} images, {metrics["sampling"]["scheduler"]}
  {metrics["sampling"]["steps"]} steps, guidance {metrics["sampling"]["guidance_scale"]}.

## Caption faithfulness (accuracy of attributes read from pixels)

```
{chr(10).join(summary_lines(faith))}
```
`real` is the measurement's upper bound (real images vs their captions), `baseline` is
{faith["baseline_kind"]}; `held_out` rows are colour/shape/position combinations that never occur in the
training data.
"""


def write_report(run: DemoRun, report_dir: Path) -> Path:
    """Write the report directory atomically (an older one is replaced); returns its path."""
    metrics = report_metrics(run)
    with atomic_dir(report_dir, overwrite=True) as tmp:
        shutil.copyfile(run.out / "eval" / GRID_FILE, tmp / GRID_FILE)
        vae, unet = run.results.vae, run.results.unet
        (tmp / CURVES_FILE).write_bytes(
            loss_curves_png(vae.history if vae else [], unet.history if unet else [])
        )
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        (tmp / REPORT_FILE).write_text(report_markdown(metrics))
    return report_dir
