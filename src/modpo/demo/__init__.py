"""The embedded demo: a synthetic helpful-vs-harmless task with exact rewards (see `task`)."""
