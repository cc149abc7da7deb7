"""The embedded demo: a synthetic helpful-vs-harmless task with exact rewards (see `task`); importing it registers
its evaluator, `{type: demo_exact}` (`evaluator`)."""

from modpo.demo.evaluator import DemoExactEvaluator

__all__ = ["DemoExactEvaluator"]
