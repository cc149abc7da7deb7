"""Experiments built on the library: `compare` runs MODPO and its baselines on the demo task."""
