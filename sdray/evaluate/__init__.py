"""Caption faithfulness: recover scene attributes from pixels (`attributes`), score image sets against their
captions (`faithfulness`), and read/write files for `sdray evaluate` (`report`)."""

from sdray.evaluate.attributes import Recovered, recover
from sdray.evaluate.faithfulness import evaluation_prompts, faithfulness, parse_caption, score, summary_lines
from sdray.evaluate.report import EvaluateOptions, evaluate_dir, sample_grid

__all__ = [
    "EvaluateOptions",
    "Recovered",
    "evaluate_dir",
    "evaluation_prompts",
    "faithfulness",
    "parse_caption",
    "recover",
    "sample_grid",
    "score",
    "summary_lines",
]
