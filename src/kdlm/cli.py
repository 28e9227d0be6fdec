"""The ``kdlm`` command line: one function per subcommand.

    kdlm distill [--config run.yaml] [--train.lr 1e-4 ...] [--resume]   train a student (no arguments: the demo)
    kdlm eval    [--config run.yaml] [--model RUN_DIR/final] [--out DIR] evaluate a student against the teacher
    kdlm validate [--config run.yaml] [...]                              check + print the resolved config, run nothing
    kdlm cache-teacher --config run.yaml --cache.dir DIR                 run the teacher once, store its sparse signal
    kdlm report RUN_DIR [RUN_DIR ...] [--out DIR]                        one HTML page (+ markdown twin) about runs;
                 --out defaults to RUN_DIR/report for one run, reports/<YYYYmmdd-HHMMSS> for several

``python -m kdlm ...`` is the same, so ``accelerate launch -m kdlm distill ...`` works.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

from kdlm.config import Config, ConfigError, check_paths, to_dict, validate

COMMANDS = ("distill", "eval", "validate", "cache-teacher", "report")
DESCRIPTIONS = {
    "distill": "Train a student model to imitate a teacher model (knowledge distillation). With no flags: the offline "
    "demo. Settings come from --config FILE and dotted flags; each is listed below with its default.",
    "eval": "Evaluate a trained student against its teacher on the held-out data (teacher-forced KL and cross-entropies, "
    "ROUGE-L and other text metrics of its generations).",
    "validate": "Check a configuration (types, contradictions, that the files it names exist) and print it fully "
    "resolved; runs nothing.",
    "cache-teacher": "Run the teacher once over the training data and store its sparse signal in cache.dir, so that "
    "`kdlm distill` with the same cache.dir trains without running the teacher.",
}

# The help of each flag is its field's attribute docstring in kdlm/config.py (read with docstring_parser).
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, saying "default: unset" instead of "default: null": what an unset field resolves
    to depends on other fields, and its help text says it."""

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        if action.default is None:
            text = text.replace("default: %(default)s", "default: unset")
        return text


def build_parser(command: str) -> ArgumentParser:
    """The parser of one subcommand: ``--config FILE`` plus one dotted flag per config field."""
    parser = ArgumentParser(
        prog=f"kdlm {command}",
        description=DESCRIPTIONS[command],
        formatter_class=_HelpFormatter,
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file; flags after it override it.")
    if command == "distill":
        parser.add_argument(
            "--resume", action="store_true", help="Continue from the newest complete checkpoint (= --train.resume true)."
        )
    if command == "eval":
        parser.add_argument(
            "--model",
            type=Optional[str],
            default=None,
            help="Student folder to evaluate (default: <train.output_dir>/final).",
        )
        parser.add_argument(
            "--out",
            type=Optional[str],
            default=None,
            help="Folder for eval_<name>.json and predictions_<name>.jsonl (default: the model's parent folder, e.g. "
            "the run directory of RUN/final; train.output_dir for a model inside the kdlm cache).",
        )
    parser.add_class_arguments(Config, nested_key=None, fail_untyped=True)
    return parser


def parse_config(argv: Sequence[str], command: str = "distill") -> tuple[Config, dict]:
    """Parse ``argv`` (without the subcommand) into a validated :class:`Config` and the command's extra flags.

    Raises :class:`ConfigError` naming the offending key for unknown keys, wrong types, contradictions and local
    paths that do not exist (:func:`kdlm.config.check_paths`).
    """
    parser = build_parser(command)
    try:
        namespace = parser.parse_args(list(argv))
        built = parser.instantiate(namespace)
    except Exception as err:  # jsonargparse raises ArgumentError / ParserError with the key in the message
        raise ConfigError(str(err)) from None
    cfg = Config(**{f.name: built[f.name] for f in dataclasses.fields(Config)})
    extras = {k: built[k] for k in ("resume", "model", "out") if k in built}
    if extras.get("resume"):
        cfg.train.resume = True
    return check_paths(validate(cfg), command), extras


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            argv = ["distill"]  # `kdlm` alone runs the demo, like `kdlm distill`
        else:
            print(__doc__)
            return 0
    command, rest = argv[0], argv[1:]
    if command == "report":  # takes run directories, not a config: its own small parser
        from kdlm.report import report_main

        return report_main(rest)
    if command not in COMMANDS:
        print(f"kdlm: error: unknown command '{command}'; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        build_parser(command).print_help()
        return 0
    try:
        cfg, extras = parse_config(rest, command)
    except ConfigError as err:
        print(f"kdlm {command}: error: {err}", file=sys.stderr)
        return 2

    if command == "validate":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print("# config is valid", file=sys.stderr)
        return 0

    from kdlm.errors import KdlmError  # noqa: PLC0415 (keep `validate` free of heavy imports)

    try:
        if command == "distill":
            from kdlm.train.loop import distill

            distill(cfg)
        elif command == "cache-teacher":
            import logging
            import os

            from kdlm.cache import build_cache
            from kdlm.logs import setup_logging

            # Under torchrun every process runs it: process 0 tells the story, the others only warn.
            setup_logging(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
            build_cache(cfg)
        else:
            from kdlm.eval.run import evaluate_command

            evaluate_command(cfg, model_path=extras.get("model"), out=extras.get("out"))
    except (KdlmError, ConfigError) as err:  # ConfigError: a setting found wrong only when the run builds it
        print(f"kdlm {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
