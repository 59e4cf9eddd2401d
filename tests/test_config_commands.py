"""Every config combination the docs show parses, and the shipped runs compose as documented.

The real-size runs are stacked LightningCLI-style: ``configs/trainer/default.yaml`` (trainer, resumable
wandb logger, callbacks), then a ``configs/data/*.yaml`` (shards), then the run config (model and what
the run changes: ``configs/grounding|agriculture|distill``), then presets (``configs/trainer/ddp.yaml``...).
The commands are read from README.md, docs/*.md, checkpoints/README.md, the config headers and the
SLURM scripts, and parsed with one parser (class paths, argument names and types; nothing is built).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "configs/trainer/default.yaml"
SLURM = "configs/trainer/slurm.yaml"
RUN_DIRS = ("grounding", "agriculture", "distill")  # configs/<dir>/*.yaml: run configs, stacked on the shared ones
DOCUMENTS = [REPO / "README.md", REPO / "checkpoints/README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "configs").rglob("*.yaml")), *sorted((REPO / "scripts/slurm").glob("*.sbatch"))]

COMMAND = re.compile(r"(?:train\.py\s+(?:fit|validate|test|predict)|sbatch\s+scripts/slurm/\S+\.sbatch)\b(.*)")


def logical_lines(path: Path) -> list[tuple[int, str]]:
    """(first line number, line) with shell continuations joined; in YAML and SLURM scripts, the
    comment lines' text."""
    lines = list(enumerate(path.read_text().splitlines(), 1))
    if path.suffix in (".yaml", ".sbatch"):
        lines = [(n, re.sub(r"^\s*#\s?", "", line)) for n, line in lines if line.lstrip().startswith("#")]
    joined, current, start = [], "", 0
    for number, line in lines:
        start = start or number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            joined.append((start, current + line))
            current, start = "", 0
    return joined + ([(start, current)] if current else [])


def config_stack(line: str) -> tuple[str, ...] | None:
    """The ``--config`` files of a documented command, in order (an sbatch script adds slurm.yaml after
    its leading config arguments); None when the line holds no command or a placeholder config."""
    match = COMMAND.search(line)
    if match is None:
        return None
    rest = match.group(1).replace("`", " ")
    try:
        tokens = shlex.split(rest, comments=True)
    except ValueError:  # prose around an inline command
        tokens = rest.split()
    if "sbatch" in match.group(0):
        leading = []
        for token in tokens:
            if token.startswith("-"):
                break
            leading.append(token)
        configs = [*leading, SLURM] + [t for i, t in enumerate(tokens) if i and tokens[i - 1] == "--config"]
    else:
        configs = [t.split("=", 1)[1] if t.startswith("--config=") else t
                   for i, t in enumerate(tokens) if t.startswith("--config=") or (i and tokens[i - 1] == "--config")]
    if not configs or any(not c.startswith("configs/") or not c.endswith(".yaml") for c in configs):
        return None  # no config, or a placeholder (TASK.yaml, ...)
    return tuple(configs)


def documented() -> dict[tuple[str, ...], list[str]]:
    """Config stack -> where it is documented (file:line of the joined line)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for path in DOCUMENTS:
        for number, line in logical_lines(path):
            stack = config_stack(line)
            if stack is not None:
                found.setdefault(stack, []).append(f"{path.relative_to(REPO)}:{number}")
    return found


COMBINATIONS = documented()


def is_run_config(config: str) -> bool:
    return Path(config).parent.name in RUN_DIRS and Path(config).parent.parent.name == "configs"


@pytest.fixture(scope="module")
def parser():
    """One parse-only LightningCLI parser (the project's, without subcommands), reused for every stack."""
    from lightning.pytorch import LightningDataModule

    from sambridge.cli import SambridgeCLI
    from sambridge.modules import BaseTask

    class ParseOnlyCLI(SambridgeCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = ParseOnlyCLI(BaseTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       auto_configure_optimizers=False, run=False,
                       args=["--config", str(REPO / "configs/demo/grounding_tiny.yaml")])
    return cli.parser


def parse(parser, stack: tuple[str, ...]):
    args = [a for config in stack for a in ("--config", str(REPO / config))]
    return parser.parse_args(args).as_dict()


def test_the_docs_show_every_run_config_and_every_shared_one():
    shown = {config for stack in COMBINATIONS for config in stack}
    shipped = {str(p.relative_to(REPO)) for d in (*RUN_DIRS, "data", "trainer")
               for p in (REPO / "configs" / d).glob("*.yaml")}
    assert shipped <= shown, f"configs no documented command uses: {sorted(shipped - shown)}"


def test_every_documented_combination_parses(parser):
    failures = []
    for stack, where in COMBINATIONS.items():
        try:
            parse(parser, stack)
        except BaseException as err:  # jsonargparse exits on a parse error
            failures.append(f"{' + '.join(stack)} ({', '.join(where)}): {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


def test_documented_runs_stack_the_shared_trainer_and_a_data_config_first():
    wrong = []
    for stack, where in COMBINATIONS.items():
        runs = [i for i, config in enumerate(stack) if is_run_config(config)]
        if not runs:
            continue
        ok = (len(runs) == 1 and stack[0] == DEFAULT
              and any(c.startswith("configs/data/") for c in stack[1:runs[0]])
              and all(c.startswith("configs/trainer/") and c != DEFAULT for c in stack[runs[0] + 1:]))
        if not ok:
            wrong.append(f"{' + '.join(stack)} ({', '.join(where)})")
    assert not wrong, "expected --config trainer/default.yaml --config data/X.yaml --config RUN.yaml " \
                      "[--config trainer/PRESET.yaml]:\n" + "\n".join(wrong)


def test_only_the_shared_trainer_sets_the_callback_list():
    """A later config's ``callbacks:`` replaces the whole list (jsonargparse); ``callbacks+:`` appends.
    So the stackable configs only append, and no order of them loses a callback. (configs/demo/* are
    whole runs of their own.)"""
    setting = []
    for d in (*RUN_DIRS, "data", "trainer"):
        for path in sorted((REPO / "configs" / d).glob("*.yaml")):
            trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
            if "callbacks" in trainer:
                setting.append(str(path.relative_to(REPO)))
    assert setting == [DEFAULT]


def test_shipped_runs_log_to_resumable_offline_wandb_in_their_own_run_directory(parser):
    run_dirs: dict[str, str] = {}
    for stack in COMBINATIONS:
        if not any(is_run_config(c) for c in stack) or stack[0] != DEFAULT:
            continue
        trainer = parse(parser, stack)["trainer"]
        logger = trainer["logger"]
        assert logger["class_path"] == "sambridge.loggers.WandbLogger", stack
        assert logger["init_args"]["offline"] is True, stack
        assert logger["init_args"]["save_dir"] == trainer["default_root_dir"] != "runs/default", stack
        callbacks = [c["class_path"] for c in trainer["callbacks"]]
        assert callbacks[:3] == ["sambridge.callbacks.RunCheckpoint", "lightning.pytorch.callbacks.LearningRateMonitor",
                                 "sambridge.callbacks.EvaluationReport"], stack
        if SLURM in stack:  # appended by slurm.yaml, kept whatever came before
            assert "sambridge.callbacks.requeue.CheckpointOnSignal" in callbacks, stack
        run = next(c for c in stack if is_run_config(c))
        assert run_dirs.setdefault(trainer["default_root_dir"], run) == run, "two run configs share a run directory"
    assert len(set(run_dirs.values())) == sum(len(list((REPO / "configs" / d).glob("*.yaml"))) for d in RUN_DIRS)


def test_commands_are_read_as_the_shell_and_the_slurm_scripts_read_them():
    assert config_stack("sbatch scripts/slurm/train.sbatch configs/a.yaml configs/b.yaml --trainer.x 1") == \
        ("configs/a.yaml", "configs/b.yaml", SLURM)
    assert config_stack("python train.py fit --config configs/a.yaml --config=configs/b.yaml  # comment") == \
        ("configs/a.yaml", "configs/b.yaml")
    assert config_stack("python train.py fit --config TASK.yaml --config configs/trainer/ddp.yaml") is None


def test_run_checkpoint_writes_into_the_run_directory_whatever_the_logger(tmp_path):
    """What lets default.yaml share one checkpoint callback: ``last.ckpt`` at ``<run>/checkpoints``."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from sambridge.callbacks import RunCheckpoint

    run, explicit = RunCheckpoint(save_last=True), RunCheckpoint(dirpath=tmp_path / "elsewhere", every_n_train_steps=5)
    lightning = ModelCheckpoint(every_n_epochs=2)
    trainer = Trainer(default_root_dir=tmp_path / "run", logger=CSVLogger(tmp_path / "logs"), accelerator="cpu",
                      callbacks=[run, explicit, lightning], enable_progress_bar=False, enable_model_summary=False)
    for callback in (run, explicit, lightning):
        callback.setup(trainer, None, "fit")
    assert Path(run.dirpath) == tmp_path / "run" / "checkpoints"
    assert Path(explicit.dirpath) == tmp_path / "elsewhere"
    assert Path(lightning.dirpath) == tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints"
