"""Multi-stage recipes: `engine.fit` once per stage, each stage starting from the previous one.

A config with a `stages:` list is a recipe. Stage k is the top-level config with the keys that
stage sets replaced (`config.StageConfig`); `fit_recipe(cfg, out)` trains it in
`out/stage{k}_{name}/`, a complete run directory of its own (config.yaml, metrics.jsonl, curves,
checkpoints, best.safetensors), and hands its weights on:

* Stage k+1 starts from stage k's `best.safetensors` (`init_from: best`, the default) or from
  the model weights in its `checkpoints/last.pt` (`init_from: last`), loaded strictly by
  `load_weights`, so every tensor arrives bit-identical; a change of image size or window needs
  nothing (no derived table is stored).
* `model.pretrained_window_sizes` of stage k+1 is set automatically unless the stage sets it: per
  layer, the window stage k's position-bias MLP normalised its offsets by, i.e. stage k's own
  pretrained window where it had one, else its effective window at its image size (the window,
  or the feature map if that is smaller). A 192 px / window-12 stage thus gives 12, 12, 12, 6,
  the official 22k->1k values. Carrying the normaliser forward keeps the bias learned for every
  offset unchanged, so stage k+1's model computes exactly stage k's function at stage k's size
  and window; re-normalising by the new window would move every learned offset.
* Freezing is explicit: every stage must set `model.freeze` (`[]` for nothing), and the start of
  each stage logs which tensors are frozen and what changed since the previous stage.
* Everything is checked before any training: each stage's config, its freeze patterns against
  its model, that consecutive stages' weights fit each other, and that the initial weights exist.
* `out/recipe.json` records each finished stage. Running the same command again skips finished
  stages and resumes the interrupted one from its own checkpoints (engine.fit's auto-resume).
  `out/metrics.jsonl` and `out/curves.png` join the stages' metrics on one epoch axis.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import INHERIT, Config, ConfigError, check_task
from ..errors import InputError
from ..model.transformer import SwinTransformerV2, SwinV2Config
from ..model.windows import pair, stage_windows
from ..outputs import write_output
from ..weights.registry import get_variant, model_config
from .tasks import task_for

log = logging.getLogger(__name__)

RECIPE_FORMAT = "swinv2.recipe"
SECTIONS = ("model", "data", "optim", "schedule", "train", "simmim")  # what a stage may set
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class StagePlan:
    """One stage, resolved: its config (initial weights and pretrained windows filled in) and what it freezes."""

    index: int  # 1-based
    count: int
    name: str
    dir: Path
    cfg: Config  # no stages; what engine.fit runs
    init_from: str  # "best" | "last": which weights of the previous stage start this one
    set_keys: dict[str, Any]  # the stage's own keys, dotted
    arch: SwinV2Config  # the model this stage trains (class count: as configured or the variant's)
    frozen: tuple[str, ...]  # parameter names model.freeze matches
    frozen_values: int
    total_values: int
    pretrained_note: str  # where pretrained_window_sizes came from

    @property
    def title(self) -> str:
        return f"stage {self.index}/{self.count} {self.name!r}" if self.name else f"stage {self.index}/{self.count}"

    def handoff(self, init_from: str) -> Path:
        """The weights file this stage hands to the next one."""
        return self.dir / "best.safetensors" if init_from == "best" else self.dir / "checkpoints" / "last.pt"


# --------------------------------------------------------------------------- windows


def next_pretrained_windows(prev: SwinV2Config) -> tuple[int | tuple[int, int], ...]:
    """pretrained_window_sizes for a model initialised from a model of architecture `prev`: per layer
    the CPB normaliser `prev` used (its pretrained window, else its effective window)."""
    return tuple(
        p if pair(p) != (0, 0) else e
        for p, e in zip(
            prev.pretrained_window_sizes,
            stage_windows(prev.img_size, prev.patch_size, prev.window_size, len(prev.depths)),
        )
    )


# --------------------------------------------------------------------------- planning


def _stage_keys(section: Any, prefix: str = "") -> dict[str, Any]:
    """The dotted keys a stage section sets (INHERIT left out), e.g. {'model.img_size': 192}."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if v is INHERIT:
            continue
        if dataclasses.is_dataclass(v):
            out |= _stage_keys(v, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = v
    return out


def _meta_model(arch: SwinV2Config) -> SwinTransformerV2:
    with torch.device("meta"):  # shapes and names only: no memory, no init cost
        return SwinTransformerV2(arch)


def _arch(cfg: Config) -> SwinV2Config:
    m = cfg.model
    return model_config(
        m.name,
        num_classes=m.num_classes,
        img_size=m.img_size,
        window_size=m.window_size,
        pretrained_window_sizes=m.pretrained_window_sizes,
        drop_path_rate=m.drop_path_rate,
    )


def _n_layers(name: str) -> int | None:
    try:
        return len(get_variant(name).config.depths)
    except KeyError:  # an unknown name is reported when the stage's model is built
        return None


def _frozen(model: SwinTransformerV2, patterns: Sequence[str], where: str) -> tuple[str, ...]:
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(
                f"{where}: pattern {pat!r} matches no parameter (names look like {names[0]!r}, "
                f"'layers.0.blocks.0.attn.qkv.weight', {names[-1]!r})"
            )
    return tuple(n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns))


def plan_recipe(cfg: Config, out_dir: str | os.PathLike) -> list[StagePlan]:
    """Resolve and check every stage of `cfg` before any work; raises ConfigError naming the stage key."""
    if not cfg.stages:
        raise ConfigError("the config has no stages: train it with engine.fit")
    if cfg.model.freeze:
        raise ConfigError(
            f"model.freeze={list(cfg.model.freeze)} at the top level of a recipe: set the freezing "
            f"in every stage instead (stages.N.model.freeze, [] for none)"
        )
    out = Path(out_dir)
    base = dataclasses.replace(cfg, stages=())
    names = [s.name for s in cfg.stages]
    plans: list[StagePlan] = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if stage.name and not _NAME_RE.fullmatch(stage.name):
            raise ConfigError(f"{where}.name: {stage.name!r} must be letters, digits, '_', '.' or '-' (a folder name)")
        if stage.name and stage.name in names[:i]:
            raise ConfigError(f"{where}.name: {stage.name!r} names two stages")
        keys = {k: v for sec in SECTIONS for k, v in _stage_keys(getattr(stage, sec), f"{sec}.").items()}
        if "model.freeze" not in keys:
            raise ConfigError(
                f"{where}.model.freeze is not set: every stage states what it freezes "
                f"([] for nothing), so a stage cannot inherit a freeze by accident"
            )
        auto: dict[str, Any] = {}
        note = "configured"
        if plans:
            prev = plans[-1]
            if "model.weights" in keys or "model.pretrained" in keys:
                which = "model.weights" if "model.weights" in keys else "model.pretrained"
                raise ConfigError(
                    f"{where}.{which}: a later stage starts from the previous stage's weights "
                    f"(choose which with {where}.init_from: best | last)"
                )
            auto = {
                "model.weights": str(prev.handoff(stage.init_from)),
                "model.weights_strict": True,
                "model.pretrained": None,
            }  # the hand-off replaces any published start point
            pws = next_pretrained_windows(prev.arch)
            if "model.pretrained_window_sizes" not in keys and _n_layers(keys.get("model.name", base.model.name)) in (
                len(pws),
                None,
            ):  # another layer count is reported by _check_fits below
                auto["model.pretrained_window_sizes"] = list(pws)
                note = f"from {prev.title}"
        try:
            scfg = base.replace(**{**keys, **auto})
            arch = _arch(scfg)
            _check_task(scfg, arch)
        except (ConfigError, ValueError, TypeError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ConfigError(f"{where}: {msg}") from None
        model = _meta_model(arch)
        frozen = _frozen(model, scfg.model.freeze, f"{where}.model.freeze")
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        if plans:
            _check_fits(plans[-1], model, where)
        elif scfg.model.weights and not Path(scfg.model.weights).exists():
            raise FileNotFoundError(f"model.weights not found: {scfg.model.weights} (set model.weights=PATH)")
        dir_name = f"stage{i + 1}_{stage.name}" if stage.name else f"stage{i + 1}"
        plans.append(
            StagePlan(
                i + 1,
                len(cfg.stages),
                stage.name,
                out / dir_name,
                scfg,
                stage.init_from,
                keys,
                arch,
                frozen,
                sum(sizes[n] for n in frozen),
                sum(sizes.values()),
                note,
            )
        )
    return plans


def _check_task(cfg: Config, arch: SwinV2Config) -> None:
    """A stage's task settings and its model against its task (e.g. SimMIM's masks against the patches)."""
    check_task(cfg)
    task_for(cfg).check_model(arch)


def _check_fits(prev: StagePlan, model: SwinTransformerV2, where: str) -> None:
    """The previous stage's weights must load into this stage's model (same names and shapes)."""
    # The head is left out: a class count of None is only known from the data (strict loading checks it).
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")}
    theirs = {k: tuple(v.shape) for k, v in _meta_model(prev.arch).state_dict().items() if not k.startswith("head.")}
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k} {theirs.get(k, '-')} -> {mine.get(k, '-')}" for k in diff[:4])
        raise ConfigError(
            f"{where}: the weights of {prev.title} do not fit this stage's model ({len(diff)} tensors differ: {shown})"
        )


# --------------------------------------------------------------------------- logging


def _values(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def describe_stage(plan: StagePlan, prev: StagePlan | None) -> list[str]:
    """The lines logged at the start of a stage: what it trains, from what, and what is frozen."""
    c, a = plan.cfg, plan.arch
    src = (
        f"{prev.title}'s {plan.init_from} weights {c.model.weights}"
        if prev is not None
        else (f"{c.model.weights}" if c.model.weights else "a fresh initialisation")
    )
    pws = f"{list(a.pretrained_window_sizes)} ({plan.pretrained_note})" if any(a.pretrained_window_sizes) else "none"
    lines = [
        f"{plan.title} in {plan.dir}: {c.train.epochs} epochs at {a.img_size[0]} px, window {a.window_size}, "
        f"pretrained windows {pws}, from {src}",
        f"{plan.title} sets: "
        + (", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in plan.set_keys.items()) or "nothing"),
    ]
    pats = list(c.model.freeze)
    if plan.frozen:
        lines.append(
            f"{plan.title} FROZEN by model.freeze={pats}: {len(plan.frozen)} tensors, "
            f"{_values(plan.frozen_values)} of {_values(plan.total_values)} values: {', '.join(plan.frozen)}"
        )
    else:
        lines.append(f"{plan.title} freezes nothing (model.freeze=[]): all {_values(plan.total_values)} values train")
    if prev is not None:
        now, before = set(plan.frozen), set(prev.frozen)
        if now == before:
            lines.append(
                f"{plan.title} freezing unchanged from {prev.title}" + (" (nothing frozen)" if not now else "")
            )
        else:
            if before - now:
                lines.append(
                    f"{plan.title} UNFROZEN since {prev.title}: " + ", ".join(n for n in prev.frozen if n not in now)
                )
            if now - before:
                lines.append(
                    f"{plan.title} newly frozen since {prev.title}: "
                    + ", ".join(n for n in plan.frozen if n not in before)
                )
    return lines


# --------------------------------------------------------------------------- the record


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write_json(path: Path, obj: Any) -> None:
    write_output(path, json.dumps(obj, indent=1))


def _read_record(out: Path) -> dict[str, Any]:
    path = out / "recipe.json"
    if not path.exists():
        return {"format": RECIPE_FORMAT, "stages": {}}
    try:
        rec = json.loads(path.read_text())
        if rec.get("format") != RECIPE_FORMAT or not isinstance(rec.get("stages"), dict):
            raise InputError("not a recipe record")
        return rec
    except (ValueError, OSError) as e:  # a torn or foreign file: the stage folders still resume
        log.warning("ignoring %s (%s): every stage will be checked through its own checkpoints", path, e)
        return {"format": RECIPE_FORMAT, "stages": {}}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def _finished(plan: StagePlan, rec: dict[str, Any], next_init: str | None) -> dict[str, Any] | None:
    """The record entry of `plan` if the stage finished and left the weights the next stage needs."""
    entry = rec["stages"].get(plan.dir.name)
    if not entry or entry.get("status") != "done":
        return None
    if next_init is not None and not plan.handoff(next_init).exists():
        log.warning(
            "%s is recorded as finished but %s is missing: running it again (it resumes from its checkpoints)",
            plan.title,
            plan.handoff(next_init),
        )
        return None
    # The resolved config minus num_classes, which engine.fit fills in from the data.
    old, new = _flat(entry.get("config", {})), _flat(plan.cfg.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "model.num_classes")
    if changed:
        log.warning(
            "%s finished earlier with a different config (%s); keeping its results. Use a new --out to train it again",
            plan.title,
            ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6]),
        )
    return entry


def _join_metrics(plans: Sequence[StagePlan], out: Path) -> list[dict[str, Any]]:
    """The stages' metrics rows on one epoch axis, each with stage / stage_name / stage_epoch."""
    rows: list[dict[str, Any]] = []
    for p in plans:
        path = p.dir / "metrics.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append(
                    row | {"stage": p.index, "stage_name": p.name, "stage_epoch": row["epoch"], "epoch": len(rows) + 1}
                )
    return rows


def _write_joined(plans: Sequence[StagePlan], out: Path) -> None:
    from ..plots import plot_training_curves

    rows = _join_metrics(plans, out)
    if rows:
        write_output(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        plot_training_curves(rows, out / "curves.png")


# --------------------------------------------------------------------------- the run


def fit_recipe(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    resume: str | os.PathLike | None = None,
    allow_config_change: bool = False,
    start_over: bool = False,
) -> dict[str, Any]:
    """Train every stage of `cfg` in turn under `out_dir` (see the module docstring).

    Finished stages (recorded in `out_dir/recipe.json`) are skipped; the first unfinished one
    resumes from `resume` if given, else from its own newest checkpoint. Returns the last stage's
    summary (its weights, checkpoint, final and best metrics) with `run_dir`, `metrics` and
    `curves` of the whole recipe and `stages`, one summary per stage. Raises ConfigError /
    FileNotFoundError before any work for a bad recipe; engine.TrainingInterrupted on a signal.
    """
    from .engine import fit
    from .rundir import _lock, claim

    out = Path(out_dir)
    plans = plan_recipe(cfg, out)
    main = _is_main()
    lock = None
    if main:  # the recipe's folder is a run folder too: locked, never through links, never the user's files
        claim(out, (".lock", "config.yaml", "metrics.jsonl", "curves.png", "recipe.json"), ())
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    try:
        return _fit_stages(
            cfg, out, plans, fit, resume=resume, allow_config_change=allow_config_change, start_over=start_over
        )
    finally:
        if lock is not None:
            lock.close()


def _fit_stages(
    cfg: Config,
    out: Path,
    plans: Sequence[StagePlan],
    fit: Any,
    *,
    resume: str | os.PathLike | None,
    allow_config_change: bool,
    start_over: bool,
) -> dict[str, Any]:
    main = _is_main()
    if main:
        if start_over:
            (out / "recipe.json").unlink(missing_ok=True)
        write_output(out / "config.yaml", cfg.to_yaml())
    rec = _read_record(out)
    summaries: list[dict[str, Any]] = []
    explicit = resume
    for k, plan in enumerate(plans):
        prev = plans[k - 1] if k else None
        next_init = plans[k + 1].init_from if k + 1 < len(plans) else None
        entry = _finished(plan, rec, next_init)
        if entry is not None:
            if main:
                log.info("%s already finished (%s): skipped", plan.title, plan.dir)
            summaries.append(entry["summary"])
            continue
        if main:
            for line in describe_stage(plan, prev):
                log.info("%s", line)
        summary = fit(
            plan.cfg, plan.dir, resume=explicit, allow_config_change=allow_config_change, start_over=start_over
        )
        explicit = None
        summaries.append(summary)
        if main:
            rec["stages"][plan.dir.name] = {
                "index": plan.index,
                "name": plan.name,
                "status": "done",
                "init_weights": plan.cfg.model.weights,
                "frozen": list(plan.frozen),
                "config": plan.cfg.to_dict(),
                "summary": summary,
            }
            _write_json(out / "recipe.json", rec)
            _write_joined(plans, out)
            best = summary.get("best")
            log.info("%s finished: %s", plan.title, f"best {best}" if best else summary.get("final", {}))
    if main:
        _write_joined(plans, out)
    return summaries[-1] | {
        "run_dir": str(out),
        "metrics": str(out / "metrics.jsonl"),
        "curves": str(out / "curves.png"),
        "stages": summaries,
    }


def shadowed_overrides(cfg: Config, overrides: Sequence[str]) -> list[str]:
    """Top-level `key=value` overrides that some stage sets itself (so the override does not reach
    it), each as a one-line warning naming the stage key to override instead."""
    out = []
    keys = [item.partition("=")[0].strip() for item in overrides]
    for item, key in zip(overrides, keys):
        if key.startswith("stages."):
            continue
        for i, stage in enumerate(cfg.stages):
            sets = {k for sec in SECTIONS for k in _stage_keys(getattr(stage, sec), f"{sec}.")}
            if key in sets and f"stages.{i}.{key}" not in keys:
                out.append(
                    f"override {item!r} does not reach stage {i + 1}, which sets {key} itself; use stages.{i}.{key}=..."
                )
    return out
