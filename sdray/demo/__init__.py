"""`sdray demo`: all stages on synthetic scenes, then a report of what the model learned (docs/demo.md)."""

from sdray.demo.config import QUICK_OVERRIDES, DemoOptions
from sdray.demo.run import demo_config, run_demo

__all__ = ["QUICK_OVERRIDES", "DemoOptions", "demo_config", "run_demo"]
