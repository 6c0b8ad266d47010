"""Caption faithfulness: per-attribute accuracy of images against the captions they were drawn for.

Three image sets are scored with the same pixel measurement (`sdray.evaluate.attributes`):
- `real`: synthetic images with their true captions, the upper bound (how good the measurement is);
- `generated`: the model's images for their prompts;
- `baseline`: a lower bound, by default the generated images scored against a derangement of their prompts
  (what an image that ignores its caption would score), or images given explicitly (e.g. unconditional ones).
Prompts whose (colour, shape, position) was held out of training (`_synth.json`) are also reported alone:
that is compositional generalisation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from sdray.data.synth import COLORS, POSITIONS, SHAPES, Scene, SynthConfig
from sdray.errors import InputError
from sdray.evaluate.attributes import EVALUATED, Recovered, recover

Attrs = dict[str, str]
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
_VOCAB = {"color": tuple(COLORS), "shape": SHAPES, "position": tuple(POSITIONS)}


def parse_caption(prompt: str) -> Attrs:
    """The (colour, shape, position) a synth-style prompt names, e.g. "a red circle in the top left".

    Raises:
        InputError: if the prompt names none, or several, of an attribute's values.
    """
    text = prompt.lower()
    attrs: Attrs = {}
    for name, values in _VOCAB.items():
        found = [v for v in values if re.search(rf"\b{re.escape(v)}\b", text)]
        if len(found) != 1:
            raise InputError(
                f"prompt {prompt!r}: expected exactly one {name} of {list(values)}, found {found}"
            )
        attrs[name] = found[0]
    return attrs


def evaluation_prompts(cfg: SynthConfig, *, per_combination: int = 1) -> list[tuple[str, Attrs]]:
    """(prompt, target attributes) for every (colour, shape, position) of ``cfg``, held-out ones first.

    Prompts use the data set's caption template with its first size and background, so they read exactly
    like training captions; ``per_combination`` repeats each (different seeds give different samples).
    """
    held = cfg.held_out_combinations()
    ordered = held + [c for c in cfg.combinations() if c not in set(held)]
    prompts = []
    for color, shape, position in ordered:
        scene = Scene(color, shape, position, cfg.sizes[0], cfg.backgrounds[0])
        attrs = {"color": color, "shape": shape, "position": position}
        prompts += [(scene.caption, attrs)] * per_combination
    return prompts


def combination(attrs: Attrs) -> tuple[str, str, str]:
    return (attrs["color"], attrs["shape"], attrs["position"])


def derangement(items: Sequence, *, seed: int = 0) -> list:
    """A shuffled copy where no item stays at its index (for n >= 2), deterministic by seed."""
    n = len(items)
    if n < 2:
        return list(items)
    rng = random.Random(seed)
    order = list(range(n))
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    return [items[j] for j in order]


def _accuracy(rows: list[tuple[Recovered, Attrs]]) -> dict[str, float | int]:
    result: dict[str, float | int] = {"n": len(rows)}
    if not rows:
        return result
    for name in EVALUATED:
        result[name] = sum(getattr(r, name) == t[name] for r, t in rows) / len(rows)
    result["all"] = sum(all(getattr(r, n) == t[n] for n in EVALUATED) for r, t in rows) / len(rows)
    return result


def score(
    recovered: Sequence[Recovered], targets: Sequence[Attrs], *, held_out: Iterable[Sequence[str]] = ()
) -> dict[str, dict[str, float | int]]:
    """Per-attribute accuracy (and `all`: every attribute right) over all, seen and held-out targets.

    Returns:
        {"all": {...}, "seen": {...}, "held_out": {...}}, each {"n": rows, "color": acc, "shape": acc,
        "position": acc, "all": acc}; accuracies are missing where n is 0.
    """
    if len(recovered) != len(targets):
        raise ValueError(f"{len(recovered)} recovered images but {len(targets)} targets")
    held = {tuple(c) for c in held_out}
    rows = list(zip(recovered, targets, strict=True))
    return {
        "all": _accuracy(rows),
        "seen": _accuracy([r for r in rows if combination(r[1]) not in held]),
        "held_out": _accuracy([r for r in rows if combination(r[1]) in held]),
    }


def faithfulness(
    generated: Sequence,
    targets: Sequence[Attrs],
    *,
    held_out: Iterable[Sequence[str]] = (),
    real: tuple[Sequence, Sequence[Attrs]] | None = None,
    baseline: tuple[Sequence, Sequence[Attrs]] | None = None,
    seed: int = 0,
) -> dict:
    """Score generated images (PIL or (H, W, 3) arrays) against their targets, with bounds.

    Args:
        generated: images, one per target.
        targets: dicts with `color`, `shape`, `position` (see :func:`parse_caption`).
        held_out: (colour, shape, position) triples never seen in training.
        real: (images, targets) of real data, the upper bound; omitted when None.
        baseline: (images, targets) of a lower bound; None scores the generated images against a
            derangement of their targets (caption-shuffled baseline).

    Returns:
        The content of metrics.json: {"generated", "real", "baseline", "chance", "baseline_kind",
        "recovered"}; "recovered" lists the attributes read from each generated image.
    """
    held_out = [tuple(c) for c in held_out]
    recovered = [recover(image) for image in generated]
    result: dict = {"generated": score(recovered, targets, held_out=held_out)}
    if real is not None:
        result["real"] = score([recover(image) for image in real[0]], real[1], held_out=held_out)
    if baseline is None:
        result["baseline"] = score(recovered, derangement(list(targets), seed=seed), held_out=held_out)
        result["baseline_kind"] = "caption-shuffled: generated images scored against other images' prompts"
    else:
        result["baseline"] = score([recover(image) for image in baseline[0]], baseline[1], held_out=held_out)
        result["baseline_kind"] = "given baseline images"
    result["chance"] = dict(CHANCE)
    result["held_out_combinations"] = [list(c) for c in held_out]
    result["recovered"] = [r.as_dict() for r in recovered]
    return result


def summary_lines(metrics: dict) -> list[str]:
    """A small table of the accuracies, one line per image set and split, for logs and reports."""
    lines = [f"{'set':<24}{'n':>5}" + "".join(f"{a:>10}" for a in (*EVALUATED, "all"))]
    for kind in ("real", "generated", "baseline"):
        for split, acc in metrics.get(kind, {}).items():
            if acc.get("n"):
                cells = "".join(f"{acc[a]:>10.2f}" for a in (*EVALUATED, "all"))
                lines.append(f"{kind + ' / ' + split:<24}{acc['n']:>5}{cells}")
    chance = metrics["chance"]
    lines.append(f"{'chance':<24}{'':>5}" + "".join(f"{chance[a]:>10.2f}" for a in EVALUATED))
    return lines
