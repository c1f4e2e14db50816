"""Training loops, statistics and report helpers shared by the experiments."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.experiments.downstream.context import Context
from dv365.experiments.downstream.hstu import HSTUConfig
from dv365.experiments.downstream.models import DownstreamConfig, DownstreamRanker, head_bias
from dv365.train.losses import MultiTaskLoss, TaskSpec
from dv365.train.metrics import (
    GroupSums,
    MultiTaskMeter,
    beyond_noise,
    bootstrap_delta_pct,
    mean_normalized_loss,
    seed_stats,
)

SIM_BANNER = (
    "> **SIMULATED data.** Users, requests and labels come from `dv365 synth` (docs/synth.md), whose "
    "generator puts stable long-term interests into the histories *by construction*. This run checks "
    "the implementation and exercises the long-history regime; it says nothing about real users.\n"
)
REAL_BANNER = (
    "> Real data: MovieLens ml-latest-small (610 users' ratings). It is small and bursty: many late "
    "requests have no history older than 24 h, so every number is also given for returning users "
    "(a non-empty gapped history, i.e. an embedding in the snapshot). Results are reported as "
    "measured.\n"
)


def banner(ctx_simulated: bool, dataset: str) -> str:
    if ctx_simulated:
        if dataset == "synth":
            return SIM_BANNER
        return (
            f"> **SIMULATED data** ({dataset}: a simulator's output, marked SIMULATED in its metadata). This run "
            "checks the implementation, not the method; it says nothing about real users.\n"
        )
    if dataset == "movielens":
        return REAL_BANNER
    return f"> Real data ({dataset}). Results are reported as measured.\n"


def hstu_config(ctx: Context, chunk: int = 0) -> HSTUConfig:
    d = ctx.settings.downstream
    h = d.hstu
    return HSTUConfig(
        dim=d.embedding_dim,
        num_layers=h.layers,
        num_heads=h.heads,
        qk_dim=h.qk_dim,
        v_dim=h.v_dim,
        dropout=h.dropout,
        chunk=chunk,
    )


def ranker_config(ctx: Context, mode: str) -> DownstreamConfig:
    d = ctx.settings.downstream
    return DownstreamConfig(
        num_tasks=len(ctx.tasks),
        embedding_dim=d.embedding_dim,
        item_hash_size=d.item_hash_size,
        hstu=hstu_config(ctx),
        dv365=mode,
        row_format=ctx.row_format,
        proj_tokens=d.proj_tokens,
        raw_tokens=d.no_projection,
        standardize=d.standardize_dv365,
        dv365_dropout=d.dv365_dropout,
        over_arch=tuple(d.over_arch),
    )


def fit_dv365_stats(model: torch.nn.Module, ctx: Context, train_rows: np.ndarray, schedule: str = "fresh") -> None:
    """Sets a downstream model's DV365 standardisation from the embeddings its training requests read
    (nothing when the model has no DV365 input or does not standardise)."""
    dv_input = getattr(model, "dv_input", None)
    if dv_input is not None and dv_input.config.standardize:
        dv_input.fit_standardization(*ctx.dv365_sample(train_rows, schedule))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def epochs(rows: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of ``rows``: a fresh permutation per epoch (``SeedSequence([seed, epoch])``), the last
    partial batch dropped (kept when the rows are fewer than a batch)."""
    epoch = 0
    while True:
        perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(rows))
        n = max(len(rows) // batch_size, 1)
        for i in range(n):
            yield rows[perm[i * batch_size : (i + 1) * batch_size]]
        epoch += 1


def predict_ranker(model: torch.nn.Module, ctx: Context, rows: np.ndarray, schedule: str) -> torch.Tensor:
    """``[len(rows), T]`` outputs (logits / predictions), no grad, in ``eval_batch_size`` batches."""
    model.eval()
    bs = ctx.settings.downstream.eval_batch_size
    outs = []
    with torch.no_grad():
        for s in range(0, len(rows), bs):
            outs.append(model(ctx.batch(rows[s : s + bs], schedule)))
    return torch.cat(outs) if outs else torch.zeros(0, len(ctx.tasks))


def ranker_metrics(
    ctx: Context, rows: np.ndarray, outputs: torch.Tensor, tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, Any]]:
    return ranker_metrics_by_user(ctx, rows, outputs, tasks, by_user=False)[0]


def ranker_metrics_by_user(
    ctx: Context, rows: np.ndarray, outputs: torch.Tensor, tasks: Sequence[TaskSpec], by_user: bool = True
) -> tuple[dict[str, dict[str, Any]], GroupSums | None]:
    """Per-task metrics of ``rows`` and (``by_user``) their per-user sums (:class:`GroupSums`): what the bootstrap
    interval over test users recomputes the metrics from."""
    if not len(rows):
        return {}, None
    meter = MultiTaskMeter(tasks)
    groups = ctx.req.user_id[rows] if by_user else None
    meter.update(outputs, torch.from_numpy(np.ascontiguousarray(ctx.req.labels[rows])), groups)
    return meter.compute(), meter.group_sums()


def evaluate_ranker(
    model: torch.nn.Module, ctx: Context, rows: np.ndarray, schedule: str, tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, Any]]:
    return ranker_metrics(ctx, rows, predict_ranker(model, ctx, rows, schedule), tasks)


class RankerFit:
    """A :class:`DownstreamRanker` of one DV365 mode, with Adam, the multi-task loss (Eq. 7-8) and the best
    validation state (early stopping on the mean normalised loss over every task: NE, and MSE / Var(label) for
    the regression task; dv365-train's :func:`~dv365.train.metrics.mean_normalized_loss`)."""

    def __init__(self, ctx: Context, mode: str, seed: int, train_rows: np.ndarray, schedule: str = "fresh") -> None:
        seed_all(seed)
        self.ctx, self.mode, self.seed, self.schedule = ctx, mode, seed, schedule
        self.model = DownstreamRanker(ranker_config(ctx, mode))
        fit_dv365_stats(self.model, ctx, train_rows, schedule)
        self.model.init_head_bias(head_bias(torch.from_numpy(ctx.req.labels[train_rows]), ctx.tasks))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=ctx.settings.downstream.lr)
        self.loss = MultiTaskLoss(ctx.tasks)

    def step(self, rows: np.ndarray) -> float:
        self.model.train()
        b = self.ctx.batch(rows, self.schedule)
        loss, _ = self.loss(self.model(b), b["labels"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def evaluate(self, rows: np.ndarray) -> dict[str, dict[str, Any]]:
        return evaluate_ranker(self.model, self.ctx, rows, self.schedule, self.ctx.tasks)

    def evaluate_subsets(self, rows: np.ndarray, subsets: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Metrics on ``rows`` (key ``all``) and on each boolean mask over ``rows``, from one forward pass."""
        return self.evaluate_subsets_by_user(rows, subsets, by_user=False)[0]

    def evaluate_subsets_by_user(
        self, rows: np.ndarray, subsets: Mapping[str, np.ndarray], by_user: bool = True
    ) -> tuple[dict[str, dict[str, Any]], dict[str, GroupSums | None]]:
        """:meth:`evaluate_subsets` and, per subset, the per-user sums of the evaluation."""
        out = predict_ranker(self.model, self.ctx, rows, self.schedule)
        res, sums = {}, {}
        res["all"], sums["all"] = ranker_metrics_by_user(self.ctx, rows, out, self.ctx.tasks, by_user)
        for name, m in subsets.items():
            res[name], sums[name] = ranker_metrics_by_user(
                self.ctx, rows[m], out[torch.from_numpy(m)], self.ctx.tasks, by_user
            )
        return res, sums

    def fit(
        self, train_rows: np.ndarray, val_rows: np.ndarray, steps: int, val_every: int
    ) -> tuple[int, float, list[tuple[int, float]]]:
        d = self.ctx.settings.downstream
        best = (0, mean_normalized_loss(self.evaluate(val_rows)), copy.deepcopy(self.model.state_dict()))
        curve = [(0, best[1])]
        it = epochs(train_rows, d.batch_size, self.seed)
        for step in range(1, steps + 1):
            self.step(next(it))
            if step % val_every == 0 or step == steps:
                ne = mean_normalized_loss(self.evaluate(val_rows))
                curve.append((step, round(ne, 5)))
                if ne < best[1]:
                    best = (step, ne, copy.deepcopy(self.model.state_dict()))
        self.model.load_state_dict(best[2])
        return best[0], best[1], curve


# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------
paired_stats = seed_stats  # mean, std, noise over seed-paired deltas (dv365.train.metrics.seed_stats)


def fmt_stat(v: Mapping[str, Any], unit: str = "") -> str:
    """``mean ± std`` over seeds, ``[low, high]`` over test users where computed (``users``), and ``~`` (within
    noise) or bold (:func:`beyond_noise`)."""
    if v.get("mean") is None:  # retrieval: too few control hits for a relative delta (h = the fewest of a seed)
        return f"n/a ({v['min_control_hits']})" if "min_control_hits" in v else "n/a"
    s = f"{v['mean']:+.3f}{unit}" + (f" ± {v['std']:.3f}" if v.get("std") is not None else "")
    u = v.get("users")
    if u is not None:
        s += f" [{u['low']:+.2f}, {u['high']:+.2f}]"
    return f"**{s}**" if beyond_noise(v) else f"{s} ~"


def user_intervals(
    runs: Sequence[Mapping[str, Any]], subset: str, kind: str, baseline: str, tasks: Sequence[str]
) -> dict[str, dict[str, Any]] | None:
    """The 95 % intervals over test users of ``kind``'s delta % vs ``baseline`` (same seeds), per task and for
    ``_mean_over_tasks``, from the runs' ``<subset>_users`` sums; None where a run did not keep them."""
    key = f"{subset}_users"
    base = {r["seed"]: r for r in runs if r["kind"] == baseline}
    pairs = [(r, base[r["seed"]]) for r in runs if r["kind"] == kind and r["seed"] in base]
    if not pairs or any(not a.get(key) or not b.get(key) for a, b in pairs):
        return None
    iv = bootstrap_delta_pct(
        [GroupSums.from_json(a[key]) for a, _ in pairs], [GroupSums.from_json(b[key]) for _, b in pairs]
    )
    return {**dict(zip(tasks, iv["tasks"], strict=True)), "_mean_over_tasks": iv["mean"]}


NOISE_NOTE = (
    "Mean ± std over seeds of the seed-paired deltas; **bold** = beyond noise, `~` = within noise "
    "(|mean| ≤ 2·std/√n, or a single seed)."
)
USERS_NOTE = (
    "[low, high] = the 95 % interval of the seed-averaged delta when the test users are resampled (2,000 "
    "bootstrap draws; every seed scores the same users, so the spread over seeds cannot show how much another "
    "draw of users would move it); beyond noise needs both |mean| > 2·std/√n and this interval on one side of 0."
)


def plot_bars(
    path: Path, title: str, groups: Sequence[str], series: Mapping[str, Sequence[Mapping[str, Any]]], ylabel: str
) -> bool:
    """Grouped bars with std error bars; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(len(series), 1) / 2 + 2), 3.8))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        m = [v.get("mean") if v.get("mean") is not None else np.nan for v in vals]
        s = [v.get("std") or 0.0 for v in vals]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, m, width, yerr=s, capsize=2, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def stem(experiment: str, dataset: str, quick: bool) -> str:
    return f"{experiment}-{dataset}{'-quick' if quick else ''}"


def data_lines(ctx: Context) -> list[str]:
    f = ctx.facts
    up = ctx.upstream
    return [
        f"- data set `{ctx.url}` (source `{f['source']}`){' — **SIMULATED**' if ctx.simulated else ''}: "
        f"{f['users']:,} users, {f['events']:,} events ({f['mean_events_per_user']:,.0f} per user, max "
        f"{f['max_events_per_user']:,}), {f['requests']:,} requests",
        f"- splits by request time: upstream {f['upstream']:,} (DV365 trained here) / downstream train {f['train']:,} / "
        f"validation {f['val']:,} (early stopping; every choice is made here) / test {f['test']:,} (evaluated once "
        "per model)",
        f"- DV365 upstream: `{up['kind']}` tower D = {up['dim']}, N_out = {up['n_out']}, {up['steps']} steps "
        f"(dv365-train Trainer, checkpoint `{up['checkpoint']}`); {f['windows']} int4 snapshots exported by "
        "`dv365.export.job.run_export`, one at the start of each downstream window, cut at as_of − 24 h",
        f"- test requests whose user has no embedding (no event before the snapshot's cut): "
        f"{100 * f['test_missing_share']:.1f}%; returning test requests: {f['test_returning']:,}",
        f"- short history of the downstream models: the last {ctx.settings.downstream.history} events before the request "
        f"(no gap), mean {f['mean_short_history']:.1f} on the test split",
        f"- test base rates: {', '.join(f'{k} {v:.4f}' for k, v in f['base_rates_test'].items())}",
    ]


def report_paths(out_dir: Path, experiment: str, dataset: str, quick: bool) -> tuple[Path, Path, Path]:
    """``(<stem>.md, <stem>.png, <stem>.json)`` of a report in ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem(experiment, dataset, quick)
    return out_dir / f"{name}.md", out_dir / f"{name}.png", out_dir / f"{name}.json"


def finish_report(
    ctx: Context, res: Mapping[str, Any], lines: list[str], md: Path, js: Path, png: Path, has_png: bool, command: str
) -> dict[str, str]:
    """Ends a report (wall time, the command), writes its Markdown and JSON; returns their paths."""
    import json

    lines.append(f"- wall time {res.get('seconds', 0):.0f} s\n")
    lines.append(f"## Command\n\n```bash\n{command}\n```\n")
    md.write_text("\n".join(lines) + "\n")
    js.write_text(
        json.dumps(
            {"dataset": ctx.dataset, "simulated": ctx.simulated, "facts": ctx.facts, **res}, indent=1, default=str
        )
        + "\n"
    )
    return {"markdown": str(md), "json": str(js), **({"png": str(png)} if has_png else {})}
