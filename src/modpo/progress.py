"""Progress bars and training logs: shown by default in the library, switched off by the command line unless -v.

`quiet()` turns off every bar a run would draw: this package's own (`bar`), the datasets library's (`map`
descriptions) and transformers' (weight loading and writing); `log_callback()` gives the trainers a callback that
sends their loss logs to the `modpo` logger (INFO) in place of printing them.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

logger = logging.getLogger("modpo.training")
_shown = True


def shown() -> bool:
    """Whether progress bars and printed training logs are on."""
    return _shown


def bar(iterable, **kwargs):
    """tqdm over `iterable`, unless bars are off."""
    return tqdm(iterable, disable=not _shown or kwargs.pop("disable", False), **kwargs)


def quiet() -> None:
    """Off: this package's bars, the datasets library's and transformers' (their own switches)."""
    global _shown
    _shown = False
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def route_trainer_logs(trainer) -> None:
    """Where bars are off, a trainer's printed logs (transformers' PrinterCallback / ProgressCallback) go to the
    `modpo.training` logger at INFO instead, which -v shows."""
    if _shown:
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                logger.info("step %d: %s", state.global_step, logs)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LogCallback())
