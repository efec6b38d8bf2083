"""Command line: `swarm-node run`, `swarm`, `status`, `report`, `experiment`, `doctor`, `config-doc`.

Flags are generated from the config tree (one flag per setting, same name as the field), and heavy
libraries (torch, transformers, hivemind) are imported only after the arguments are parsed, so `--help`
is instant. Operator mistakes print one `error:` line with the fix and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import typing
from typing import Any

from swarm_node.config import flag_name, leaf_fields, load_config
from swarm_node.config.sources import is_list_setting
from swarm_node.errors import OperatorError

EXIT_OPERATOR_ERROR = 2
SWARM_ONLY = {"output_dir", "rounds", "linger_s", "initial_peers", "initial_peers_file", "identity_path", "host_maddrs",
              "announce_maddrs"}


def _add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    for name, (section, info) in leaf_fields().items():
        if name in skip:
            continue
        flag = flag_name(name)
        help_text = (info.description or "").replace("%", "%%")
        annotation = info.annotation
        origin = typing.get_origin(annotation)
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif is_list_setting(annotation):
            parser.add_argument(flag, dest=name, nargs="*", default=None, metavar="VALUE", help=help_text)
        elif origin is typing.Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(annotation), default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(annotation, str)
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one node (starts a new swarm unless --initial-peers is given)")
    run.add_argument("--config", help="TOML config file (also SWARM_NODE_CONFIG)")
    _add_config_flags(run)

    swarm = sub.add_parser("swarm", help="run a local swarm of N node processes on 127.0.0.1")
    swarm.add_argument("--config", help="TOML config file passed to every node")
    swarm.add_argument("--nodes", type=int, default=2, help="number of node processes (the first is the bootstrap peer)")
    swarm.add_argument("--rounds", type=int, default=3, help="rounds each node runs before the swarm stops")
    swarm.add_argument("--output-dir", default="runs/swarm", help="directory holding node0/, node1/, ...")
    _add_config_flags(swarm, skip=SWARM_ONLY)

    status = sub.add_parser("status", help="show running nodes' state (from their /status endpoint)")
    status.add_argument("target", help="a node's or a local swarm's output directory, or http://HOST:PORT")

    report = sub.add_parser("report", help="plots and a summary from metrics.jsonl files")
    report.add_argument("output_dir", help="a node's or a local swarm's output directory")
    report.add_argument("--report-dir", default=None, help="where to write (default OUTPUT_DIR/report)")

    experiment = sub.add_parser("experiment", help="the SAPO controlled experiment as local swarms; results and plots")
    exp_sub = experiment.add_subparsers(dest="experiment_command", required=True)
    sapo = exp_sub.add_parser("sapo", help="run (or continue) every arm and seed of a preset, then write results")
    sapo.add_argument("--preset", default="smol", help="tiny (CI smoke, minutes), smol (SmolLM2, 4 agents, hours on "
                      "2 cores), homogeneous and heterogeneous (issue 11: sharing arms, 3 seeds, about a day each on 2 "
                      "cores; docs/results.md) or paper (the paper's sizes, for GPUs)")
    sapo.add_argument("--name", default=None, help="experiment name (default: the preset); output in ROOT/NAME")
    sapo.add_argument("--root", default="experiments", help="directory holding experiments")
    sapo.add_argument("--arms", nargs="*", default=None, help="arms to run (default: the preset's), e.g. "
                      "local4-ext0 local2-ext2 control, or short names such as 4/0 2/2 2/2-tis")
    sapo.add_argument("--seeds", nargs="*", type=int, default=None, help="seeds to run (default: the preset's)")
    sapo.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the preset's)")
    sapo.add_argument("--model", default=None, help="policy model for every agent (default: the preset's)")
    sapo.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                      help="autocast dtype of every agent (default auto: bf16 where the CPU supports it)")
    sapo.add_argument("--optimizer", default=None, choices=["adamw", "adafactor"],
                      help="optimizer of every agent (default adamw; adafactor saves about 1 GB per SmolLM2 agent)")
    exp_report = exp_sub.add_parser("report", help="re-create results.md, results.json and plots from the logs")
    exp_report.add_argument("experiment_dir", help="an experiment directory, e.g. experiments/smol")
    exp_report.add_argument("--into", default=None, metavar="DOC",
                            help="also put the tables and plots into DOC (e.g. docs/results.md), between "
                                 "'<!-- begin/end experiment report DIR -->' lines, appended if it has none")

    doctor = sub.add_parser("doctor", help="check why a node cannot join: daemon, ports, bootstrap peers, clock, "
                            "memory, disk, model, versions (exit 0 when all pass)")
    doctor.add_argument("--config", help="TOML config file (also SWARM_NODE_CONFIG)")
    doctor.add_argument("--skip-model", action="store_true", help="do not load the model (faster)")
    _add_config_flags(doctor)

    sub.add_parser("config-doc", help="print the reference of every setting (markdown)")
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time_s, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        line = {"time_s": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    from swarm_node import progress

    progress.enable(fmt)
    if level != "DEBUG":
        logging.getLogger("hivemind").setLevel(logging.WARNING)


def _overrides(args: argparse.Namespace, skip: set[str] = frozenset()) -> dict[str, Any]:
    return {name: getattr(args, name) for name in leaf_fields() if name not in skip and getattr(args, name, None) is not None}


async def run_node(config) -> int:
    """Start a node, run it, and always stop it. First SIGINT/SIGTERM stops gracefully, a second forces exit."""
    from swarm_node.node import Node

    node = Node(config)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def force_exit() -> None:
        for child in __import__("psutil").Process().children(recursive=True):
            child.kill()
        os._exit(130)

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logging.getLogger("swarm_node").info(
                "stopping after the current phase, at most %.0f s (signal again to force)", config.stop_deadline_s)
            node.request_stop()
            loop.call_later(config.stop_deadline_s, force_exit)  # a phase that overruns is abandoned
        else:
            force_exit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await node.start()
        await node.run()
    finally:
        await node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config-doc":
        from swarm_node.config import config_reference

        print(config_reference())
        return 0
    try:
        if args.command == "status":
            from swarm_node.tools.status import render

            render(args.target)
            return 0
        if args.command == "report":
            from pathlib import Path

            from swarm_node.tools.report import write_report

            print(f"wrote {write_report(Path(args.output_dir), args.report_dir and Path(args.report_dir))}")
            return 0
        if args.command == "experiment":
            from pathlib import Path

            setup_logging("INFO")
            if args.experiment_command == "report":
                from swarm_node.experiment.results import write_results

                root = Path(args.experiment_dir)
                if not (root / "experiment.json").exists():
                    raise OperatorError(f"{root} is not an experiment directory (no experiment.json)")
                doc = Path(args.into) if args.into else None
                if doc is not None and not doc.is_file():
                    raise OperatorError(f"--into {doc}: no such file; give an existing markdown document")
                print(f"wrote {write_results(root, doc)}" + (f" and its tables into {doc}" if doc else ""))
                return 0
            from swarm_node.experiment.run import run_experiment

            extra = {k: v for k, v in (("model", args.model), ("precision", args.precision),
                                                  ("optimizer", args.optimizer)) if v} or None
            return run_experiment(args.preset, Path(args.root) / (args.name or args.preset), args.arms, args.seeds,
                                  args.rounds, extra)
        if args.command == "doctor":
            from swarm_node.tools.doctor import doctor

            config = load_config(args.config, _overrides(args))
            setup_logging("WARNING")
            return doctor(config, load_model=not args.skip_model)
        if args.command == "run":
            config = load_config(args.config, _overrides(args))
            setup_logging(config.log_level, config.log_format)
            import uvloop

            return uvloop.run(run_node(config))
        if args.command == "swarm":
            from swarm_node.tools.launcher import run_local_swarm

            overrides = _overrides(args, SWARM_ONLY)
            config = load_config(args.config, overrides)  # validate once, before any process starts
            setup_logging(config.log_level, config.log_format)
            return run_local_swarm(args.nodes, args.rounds, args.output_dir, args.config, overrides)
    except OperatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_OPERATOR_ERROR
    return 1


if __name__ == "__main__":
    sys.exit(main())
