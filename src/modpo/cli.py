"""The `modpo` command: one subcommand per stage, each a YAML config plus `key.path=value` overrides."""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import warnings
from pathlib import Path

from transformers.utils import logging as hf_logging

from modpo.config import MODPOConfig
from modpo.demo.pipeline import run_demo
from modpo.errors import ModpoError, WriteError
from modpo.experiments.compare import METHODS, run_compare
from modpo.experiments.curves import CurveSettings, run_curves
from modpo.front.generate import SamplingSettings
from modpo.front.steer import steer
from modpo.front.sweep import EVALUATION_KEYS, run_front
from modpo.guard import last_checkpoint
from modpo.labeling import LabelConfig, run_label
from modpo.progress import quiet
from modpo.recipes import run_recipe, shipped_recipes
from modpo.run_config import EVALUATION_HELP, FrontConfig, StageConfig, describe, load_config
from modpo.stages import STAGES

STAGE_HELP = {
    "sft": "supervised fine-tuning (TRL SFTTrainer)",
    "reward": "reward-model training (TRL RewardTrainer), one objective per model",
    "dpo": "DPO: MODPO with one objective (weights [1.0])",
    "train": "MODPO for one weight vector: preference pairs for objective 0, margin rewards for the rest",
}
EXAMPLES = {
    "sft": "modpo sft --config sft.yaml training.num_train_epochs=2 output_dir=runs/sft",
    "reward": "modpo reward --config rm.yaml training.learning_rate=5e-4 output_dir=runs/rm_harmless",
    "dpo": "modpo dpo --config dpo.yaml training.beta=0.1 output_dir=runs/dpo_safer",
    "train": "modpo train --config modpo.yaml training.weights=[0.3,0.7] training.beta=0.1 output_dir=runs/w03",
    "front": "modpo front --config front.yaml weights=[[0.2,0.8],[0.8,0.2]] evaluation.samples_per_prompt=4",
    "label": "modpo label --config label.yaml samples_per_prompt=4 labels.sentiment.temperature=0.1",
}

EPILOG = """Overrides set any config key by its dotted path, the value read as YAML, e.g.
  {example}
Config keys:
{keys}"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modpo", description="Multi-objective direct preference optimization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        epilog = EPILOG.format(example=EXAMPLES[name], keys=describe(StageConfig, name))
        if name in ("dpo", "train"):
            epilog += "\nMODPO keys under training: (besides every transformers.TrainingArguments field)\n" + _modpo_fields()
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    front = sub.add_parser("front", help="train and evaluate every weight vector of a sweep; write the report",
                           description="Train (or reuse) one MODPO model per weight vector, sample each on the "
                                       "evaluation prompts, score them, and write front.md/.json/.csv/.png.",
                           epilog=EPILOG.format(example=EXAMPLES["front"], keys=describe(FrontConfig))
                           + "\nKeys under evaluation:\n" + _evaluation_fields(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(front)
    front.add_argument("--resume", action="store_true",
                       help="continue a point killed while training from the last checkpoint in its folder")
    label = sub.add_parser("label", help="sample a model and label pairs of its responses by scorers (Bradley-Terry)",
                           description="Sample responses from a model, score each with every scorer, pair them and "
                                       "label each pair by Bradley-Terry on a scorer; writes samples.jsonl, "
                                       "pairs_<label>.jsonl and labels.json (correlations, label agreement).",
                           epilog=EPILOG.format(example=EXAMPLES["label"], keys=describe(LabelConfig)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(label)
    shipped = shipped_recipes()
    recipe = sub.add_parser("recipe", help=f"run a recipe: a YAML list of stages (shipped: {', '.join(shipped)})",
                            description="Run every stage of a recipe in order; finished stages are skipped.",
                            epilog=_recipe_epilog(shipped), formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe.add_argument("name", help="a recipe YAML path, or the name of a shipped recipe")
    recipe.add_argument("variables", nargs="*", metavar="NAME=VALUE", help="override a recipe variable (YAML value)")
    recipe.add_argument("--only", help="comma-separated commands to run (e.g. front)")
    recipe.add_argument("--overwrite", action="store_true",
                        help="let a stage replace a different run already in its output_dir")
    recipe.add_argument("--resume", action="store_true",
                        help="continue a stage from the last checkpoint in its output_dir, where there is one")
    demo = sub.add_parser("demo", help="the whole pipeline on a built-in synthetic task, in one to two minutes on "
                                       "a laptop CPU",
                          description="SFT -> margin model (DPO on harmlessness) -> MODPO at several weights -> "
                                      "sampling -> exact scoring, on a synthetic helpful-vs-harmless task.")
    demo.add_argument("--output-dir", default="runs/demo", help="where models, data and the report go (default: runs/demo)")
    demo.add_argument("--weights", default="0.1,0.3,0.5,0.7,0.9",
                      help="comma-separated helpfulness weights w; each point trains w = (w, 1 - w)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training (default: 0)")
    demo.add_argument("--beta", type=float, default=0.1, help="KL strength of DPO and MODPO (default: 0.1)")
    demo.add_argument("--overwrite", action="store_true", help="replace runs in output-dir that used other settings")
    generate = sub.add_parser("generate", help="sample from a weight-conditioned model at the weights you choose",
                              description="Steer one model trained with training.weight_sampling: the weights are "
                                          "rendered as in training and put before the prompt.")
    generate.add_argument("--model", required=True, help="the conditioned model's folder (output of modpo train)")
    generate.add_argument("--weights", required=True, help="comma-separated weights on the simplex, e.g. 0.3,0.7")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--chat", action="store_true", help="send the prompt as one user turn through the chat "
                                                               "template (default: text)")
    generate.add_argument("prompt", help="the prompt")
    compare = sub.add_parser("compare", help="MODPO against DPO soups, DPO LW, Best-of-N and MORLHF on the demo task",
                             description="Run the demo pipeline and every baseline at the same weights, score all with "
                                         "the same exact evaluator, record compute, and write comparison.md/.json/"
                                         ".csv/.png under OUTPUT_DIR/report. Finished work is reused on rerun.")
    compare.add_argument("--output-dir", default="runs/compare", help="where everything goes (default: runs/compare)")
    compare.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training (default: 0)")
    compare.add_argument("--methods", default=None,
                         help="comma-separated subset of modpo,soups,dpo_lw,bon,morlhf,conditioned,mixing (default: "
                              "all; with --seeds, the five with a budget to sweep: modpo,soups,dpo_lw,bon,morlhf)")
    compare.add_argument("--seeds", default=None,
                         help="comma-separated seeds, e.g. 0,1,2: every method as a compute-vs-quality curve over "
                              "these seeds, written to OUTPUT_DIR/report/curves.md/.json/.png (default: one run at "
                              "--seed)")
    compare.add_argument("--learning-rates", default=None,
                         help="with --seeds: the learning-rate grid every trained method gets (default: 1e-3,3e-3)")
    return parser


def _modpo_fields() -> str:
    import dataclasses

    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "\n".join(f"  training.{f.name:<21} {f.metadata.get('help', '')} (default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r})"
                     for f in dataclasses.fields(MODPOConfig) if f.name not in inherited)


def _recipe_epilog(shipped: dict[str, dict]) -> str:
    lines = ["Shipped recipes and their variables (set one as NAME=VALUE):"]
    lines += [f"  {name:<12} " + " ".join(f"{k}={v}" for k, v in variables.items()) for name, variables in shipped.items()]
    return "\n".join(lines + ["For example:", "  modpo recipe pku_safety data_dir=/path/to/data steps=12 --only front"])


def _evaluation_fields() -> str:
    """Every key `modpo front` accepts under evaluation, with the sampling defaults."""
    import dataclasses

    defaults = {f.name: f" (default: {f.default!r})" for f in dataclasses.fields(SamplingSettings)}
    keys = [k for k in EVALUATION_HELP if k in EVALUATION_KEYS] + sorted(EVALUATION_KEYS - set(EVALUATION_HELP))
    return "\n".join(f"  evaluation.{key:<19} {EVALUATION_HELP.get(key, '')}{defaults.get(key, '')}" for key in keys)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="YAML file of config keys (listed below)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config key (dotted path)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing a different run already in output_dir")


def _run(args) -> int:
    if args.command == "demo":
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ModpoError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
        report = run_demo(args.output_dir, weights, seed=args.seed, beta=args.beta, overwrite=args.overwrite,
                          say=lambda line: print(line, flush=True))
        _print_report(Path(args.output_dir) / "front", "front", f"Demo finished in {report['demo_wall_seconds']:.0f} s.")
        return 0
    if args.command == "recipe":
        import yaml

        variables = {}
        for item in args.variables:
            if "=" not in item:
                raise ModpoError(f"variable '{item}' is not of the form name=value")
            key, raw = item.split("=", 1)
            try:
                variables[key] = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ModpoError(f"variable '{item}': value is not valid YAML") from None
        only = args.only.split(",") if args.only else None
        for out in run_recipe(args.name, variables, only, overwrite=args.overwrite, resume=args.resume):
            print(f"done: {out}")
        return 0
    if args.command == "compare":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
        if args.seeds is not None:
            settings = CurveSettings(seeds=tuple(_numbers(args.seeds, "--seeds", int)))
            if methods is not None:
                settings.methods = tuple(methods)
            if args.learning_rates is not None:
                settings.learning_rates = tuple(_numbers(args.learning_rates, "--learning-rates", float))
            document = run_curves(args.output_dir, settings)
            _print_report(Path(args.output_dir) / "report", "curves",
                          f"Curves finished in {document['sweep_wall_seconds']:.0f} s.")
            return 0
        if args.learning_rates is not None:
            raise ModpoError("--learning-rates: only with --seeds (the curves over seeds)")
        document = run_compare(args.output_dir, seed=args.seed, methods=methods or METHODS)
        _print_report(Path(args.output_dir) / "report", "comparison",
                      f"Comparison finished in {document['compare_wall_seconds']:.0f} s.")
        return 0
    if args.command == "generate":
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ModpoError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, seed=args.seed, batch_size=1)
        (sample,) = steer(args.model, [prompt], weights, settings)
        print(sample["response"])
        return 0
    if args.command == "label":
        cfg = load_config(LabelConfig, args.config, args.overrides)
        print(f"saved to {run_label(cfg, say=print)}")
        return 0
    if args.command == "front":
        cfg = load_config(FrontConfig, args.config, args.overrides)
        with _clean_on_error(cfg.output_dir):
            run_front(cfg, overwrite=args.overwrite, resume=args.resume)
        print((Path(cfg.output_dir) / "front.md").read_text())
        return 0

    cfg = load_config(StageConfig, args.config, args.overrides)
    args.output_dir = cfg.output_dir  # for the advice after Ctrl-C
    with _clean_on_error(cfg.output_dir):
        out = STAGES[args.command](cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"saved to {out}")
    return 0


def _numbers(text: str, option: str, kind) -> list:
    """Comma-separated numbers of one kind, or a one-line error naming the option."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ModpoError(f"{option} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not values:
        raise ModpoError(f"{option}: give at least one value")
    return values


def _print_report(folder: Path, stem: str, footer: str) -> None:
    """The report's table, where its plot and data files are, and a closing line."""
    print((folder / f"{stem}.md").read_text())
    print(f"Plot: {folder / f'{stem}.png'}   data: {folder / f'{stem}.json'}, {folder / f'{stem}.csv'}")
    print(footer)


class _clean_on_error:
    """Remove output_dir if this command created it and then failed: no partial output is left behind.

    Finished work is kept: a folder that by then holds a checkpoint or a finished run (e.g. the trained
    points of a front whose last point hit a non-finite loss) stays.
    """

    def __init__(self, output_dir: str):
        self.path = Path(output_dir)
        self.existed = self.path.exists()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None and not self.existed and issubclass(kind, (ModpoError, FloatingPointError)):
            if not any(self.path.rglob("checkpoint-*")) and not any(self.path.rglob("modpo_run.json")):
                shutil.rmtree(self.path, ignore_errors=True)
        return False


def interrupted_advice(argv: list[str], output_dir: str | None = None) -> str:
    """What to run after Ctrl-C: the same command, plus --resume where it continues from a checkpoint (a stage
    with one in its output_dir; a front or recipe, which resume the points and stages that have one)."""
    command = ["modpo", *argv]
    stage = bool(argv) and argv[0] in STAGE_HELP
    resumes = (bool(argv) and argv[0] in ("front", "recipe")) or (
        stage and output_dir is not None and last_checkpoint(output_dir) is not None)
    if resumes and "--resume" not in argv:
        command.append("--resume")
    if resumes:
        how = "continue from the last checkpoint with"
    elif stage:
        how = "no checkpoint was written yet; start again with"
    else:
        how = "rerun (finished work is reused) with"
    return f"modpo: interrupted; {how}: {shlex.join(command)}"


# Warnings the libraries raise on every run about what modpo or TRL set up for them, never about the user's input:
# (category, message regex). Every other warning is shown.
KNOWN_NOISY_WARNINGS = (
    # transformers 5 renamed the field TRL's configs and ours still set
    (FutureWarning, r"`gradient_checkpointing` is deprecated and will be removed"),
    # torch's checkpoint, under the Trainer's gradient checkpointing
    (UserWarning, r"torch\.utils\.checkpoint: the use_reentrant parameter should be passed explicitly"),
    (UserWarning, r"None of the inputs have requires_grad=True\. Gradients will be None"),
    # torch DataParallel on several GPUs without a launcher, gathering the scalar loss
    (UserWarning, r"Was asked to gather along dimension 0, but all input tensors were scalars"),
)


def silence_known_warnings() -> None:
    """Ignore the warnings of `KNOWN_NOISY_WARNINGS`, by message; every other one still reaches the user."""
    for category, message in KNOWN_NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("modpo.recipes").setLevel(logging.INFO)  # a recipe's progress, stage by stage
    if not args.verbose:  # no progress bars or printed training logs (ours, datasets', transformers'); -v shows them
        quiet()
        hf_logging.set_verbosity_error()
        silence_known_warnings()
    try:
        return _run(args)
    except WriteError as err:  # not bad input: the disk refused a write
        print(f"modpo: error: {err}", file=sys.stderr)
        return 1
    except ModpoError as err:
        print(f"modpo: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"modpo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted_advice(argv, getattr(args, "output_dir", None)), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
