"""Training and evaluation of one next-item arm.

* Loss: sampled softmax, every valid position predicts its next item against ``negatives`` item ids drawn
  uniformly from the whole catalogue for that position (GR's ``local`` sampler; a negative equal to the
  positive is masked, as GR does), L2-normalised vectors, dot product / temperature. With
  ``negatives_group`` > 1, that many consecutive positions share one draw (same distribution per position,
  ~13x less loss time on a CPU: :func:`sampled_softmax_loss`).
* Optimiser: AdamW; early stopping / model selection on validation HR@10, evaluated every ``val_every``
  steps (and at the end); the best state is restored.
* Evaluation: exhaustive ranking over every item (seen items included); rank = number of items scored
  strictly above the target; HR@K = [rank < K], NDCG@K = 1 / log2(rank + 2) if rank < K; averaged over users.
* Reproducibility: ``torch.manual_seed(seed)`` (initialisation, dropout), a separate torch generator for the
  negatives and a numpy generator for the batch order, all from the seed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dv365.experiments.nextitem.arms import DistantHistoryProvider, NextItemModel
from dv365.experiments.nextitem.data import Sequences, Windows, gather, ranges

logger = logging.getLogger(__name__)

KS = (10, 50, 200)
METRICS = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in KS)


# ------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------
def ranks_of(user_vecs: torch.Tensor, item_vecs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]`` rank of each target among items 1..N (0 = best): items scored strictly above it.

    ``user_vecs [B, d]``, ``item_vecs [N+1, d]`` (row 0 = padding, never ranked), ``target [B]`` codes >= 1."""
    scores = user_vecs @ item_vecs[1:].T  # [B, N]
    t = scores.gather(1, (target - 1)[:, None])  # [B, 1]
    return (scores > t).sum(1)


def per_user_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """``{HR@K, NDCG@K}`` per user for K in 10, 50, 200 (``ranks`` 0-based)."""
    r = np.asarray(ranks, np.float64)
    out = {}
    for k in KS:
        hit = r < k
        out[f"HR@{k}"] = hit.astype(np.float64)
        out[f"NDCG@{k}"] = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    return out


def mean_metrics(ranks: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    m = per_user_metrics(ranks if mask is None else np.asarray(ranks)[mask])
    return {k: float(v.mean()) if len(v) else math.nan for k, v in m.items()}


# ------------------------------------------------------------------------------------------------------
# The data of one arm
# ------------------------------------------------------------------------------------------------------
@dataclass
class DistantCache:
    """The provider's embeddings of every (user, cut) an arm reads, computed once (the provider is frozen)."""

    tokens: torch.Tensor  # [P, T, D]
    present: torch.Tensor  # [P] bool
    index: dict[str, np.ndarray]  # split -> [W] row into tokens
    seconds: float = 0.0

    @classmethod
    def build(
        cls, provider: DistantHistoryProvider, seqs: Sequences, windows: Mapping[str, Windows], batch: int = 1024
    ) -> DistantCache:
        t0 = time.perf_counter()
        users = np.concatenate([seqs.user_ids[w.urow] for w in windows.values()])
        cuts = np.concatenate([w.cut_ts for w in windows.values()])
        pairs, inv = np.unique(np.stack([users, cuts], 1), axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        toks, pres = [], []
        for s in range(0, len(pairs), batch):
            t, p = provider.embed(pairs[s : s + batch, 0].copy(), pairs[s : s + batch, 1].copy())
            toks.append(torch.as_tensor(t, dtype=torch.float32).cpu())
            pres.append(np.asarray(p, bool))
        index, o = {}, 0
        for name, w in windows.items():
            index[name] = inv[o : o + len(w)]
            o += len(w)
        tokens = torch.cat(toks) if toks else torch.zeros(0, provider.out_tokens, provider.dim)
        present = torch.from_numpy(np.concatenate(pres) if pres else np.zeros(0, bool))
        return cls(tokens, present, index, time.perf_counter() - t0)


@dataclass
class ArmData:
    """Windows of one arm per split (``train`` / ``val`` / ``test``) and the source of its extra."""

    seqs: Sequences
    windows: dict[str, Windows]
    extra: str = "none"
    cache: DistantCache | None = None
    dist_end: dict[str, np.ndarray] = field(default_factory=dict)
    device: str = "cpu"  # where batches are put (the cache stays on the CPU)

    def __post_init__(self) -> None:
        if self.extra == "mean":
            self.dist_end = {k: self.seqs.distant_end(w.urow, w.cut_ts) for k, w in self.windows.items()}

    def batch(self, split: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        w = self.windows[split].take(idx)
        b = gather(self.seqs, w, train=split == "train")
        if self.extra == "mean":
            start = self.seqs.offsets[w.urow]
            end = self.dist_end[split][idx]
            flat, offs = ranges(start, end)
            b["bag"] = torch.from_numpy(self.seqs.items[flat])
            b["bag_offsets"] = torch.from_numpy(offs)
            b["bag_len"] = torch.from_numpy(end - start)
        elif self.extra == "dv365":
            assert self.cache is not None
            rows = torch.from_numpy(self.cache.index[split][idx])
            b["dv365"] = self.cache.tokens[rows]
            b["present"] = self.cache.present[rows]
        return {k: v.to(self.device) for k, v in b.items()} if self.device != "cpu" else b


# ------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSettings:
    negatives: int = 128
    temperature: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 101
    full_epochs: int = 0  # epochs of the ``full`` arm (0: ``epochs``); its epoch has ~K/200 of a short arm's steps
    val_every: int = 50
    patience: int = 0  # validations without improvement before stopping (0: never)
    eval_batch_size: int = 512
    loss_chunk: int = 4096  # positions per sampled-softmax chunk (memory only; same gradients)
    negatives_group: int = 1  # positions sharing one draw of negatives (1: GR's per-position sampler)


def sampled_softmax_loss(
    items: torch.Tensor,
    h: torch.Tensor,
    targets: torch.Tensor,
    negatives: int,
    temperature: float,
    gen: torch.Generator,
    group: int = 1,
) -> torch.Tensor:
    """Sum over positions of the sampled-softmax loss.

    ``items [N+1, d]`` L2-normalised item table (row 0 = padding, never sampled), ``h [P, d]`` normalised user
    vectors, ``targets [P]``; ``negatives`` ids per position, uniform over 1..N; a negative equal to the
    positive is masked out.

    ``group`` consecutive positions share one draw of ``negatives`` ids (1: every position its own, GR's
    ``local`` sampler exactly). Each position still scores ``negatives`` ids drawn uniformly and independently
    of its target, so its expected loss and gradient are the same; only the draws of neighbouring positions
    are no longer independent. Sharing turns ``P`` matrix-vector products over a gathered ``[P, R, d]``
    tensor (memory-bound: ~0.29 s per 4,096 positions on one CPU core) into ``P / group`` small matrix
    products over ``[P / group, R, d]`` (16: ~0.02 s)."""
    p, lo, hi = len(targets), 1, items.shape[0]
    pos_l = (h * F.embedding(targets, items)).sum(-1, keepdim=True)  # [P, 1]
    if group <= 1:
        neg = torch.randint(lo, hi, (p, negatives), generator=gen, device=items.device)  # [P, R]
        neg_l = torch.bmm(F.embedding(neg, items), h[:, :, None])[:, :, 0]  # [P, R]
    else:
        g = -(-p // group)
        draw = torch.randint(lo, hi, (g, negatives), generator=gen, device=items.device)  # [G, R]
        hp = F.pad(h, (0, 0, 0, g * group - p)).view(g, group, -1)  # [G, group, d]
        neg_l = torch.bmm(hp, F.embedding(draw, items).transpose(1, 2)).reshape(g * group, negatives)[:p]
        neg = draw.repeat_interleave(group, dim=0)[:p]  # [P, R]
    neg_l = neg_l.masked_fill(neg == targets[:, None], -5e4 * temperature)
    logits = torch.cat([pos_l, neg_l], dim=1) / temperature  # [P, 1 + R]
    return F.cross_entropy(logits, torch.zeros(p, dtype=torch.long, device=logits.device), reduction="sum")


def train_step(
    model: NextItemModel, opt: torch.optim.Optimizer, b: dict[str, torch.Tensor], fs: FitSettings, gen: torch.Generator
) -> float:
    """One step; the loss is computed in chunks of positions (backward into the detached user vectors, then
    once through the encoder), so memory stays bounded at ``loss_chunk × negatives × d``."""
    model.train()
    out = model(b)  # [B, L, d]
    mask = b["valid"] & (b["targets"] > 0)
    h = out[mask]  # [P, d]
    targets = b["targets"][mask]
    n = max(len(targets), 1)
    hd = h.detach().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for s in range(0, len(targets), fs.loss_chunk):
        items = model.item_vectors()  # [N+1, d], normalised once per chunk
        sl = slice(s, s + fs.loss_chunk)
        loss = sampled_softmax_loss(items, hd[sl], targets[sl], fs.negatives, fs.temperature, gen, fs.negatives_group)
        loss = loss / n
        loss.backward()
        total += float(loss.detach())
    if len(targets):
        h.backward(hd.grad)
    opt.step()
    return total


@torch.no_grad()
def evaluate(model: NextItemModel, data: ArmData, split: str, batch_size: int = 512) -> np.ndarray:
    """``[U]`` rank of each user's ``split`` target (exhaustive over every item)."""
    model.eval()
    items = model.item_vectors()
    out = []
    n = len(data.windows[split])
    for s in range(0, n, batch_size):
        b = data.batch(split, np.arange(s, min(s + batch_size, n)))
        out.append(ranks_of(model(b)[:, -1], items, b["target"]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class FitResult:
    best_step: int
    best_val_hr10: float
    steps: int
    seconds: float
    curve: list[tuple[int, float]]
    max_steps: int = 0  # the cap (epochs × steps per epoch); ``steps`` < ``max_steps``: stopped early


def fit(model: NextItemModel, data: ArmData, fs: FitSettings, seed: int, progress: bool = False) -> FitResult:
    """Trains ``model`` on ``data``'s training windows, keeps the state of the best validation HR@10."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    gen = torch.Generator(device=model.item_emb.weight.device).manual_seed(seed + 1_000_003)
    opt = torch.optim.AdamW(model.parameters(), lr=fs.lr, weight_decay=fs.weight_decay)
    n = len(data.windows["train"])
    per_epoch = max(math.ceil(n / fs.batch_size), 1)
    steps = fs.epochs * per_epoch
    best = (0, -1.0, copy.deepcopy(model.state_dict()))
    curve: list[tuple[int, float]] = []
    since, step = 0, 0
    bar = _bar(steps, progress)
    for _epoch in range(fs.epochs):
        perm = rng.permutation(n)
        for i in range(per_epoch):
            idx = np.sort(perm[i * fs.batch_size : (i + 1) * fs.batch_size])
            train_step(model, opt, data.batch("train", idx), fs, gen)
            step += 1
            bar.update(1)
            if step % fs.val_every == 0 or step == steps:
                hr = mean_metrics(evaluate(model, data, "val", fs.eval_batch_size))["HR@10"]
                curve.append((step, round(hr, 5)))
                if hr > best[1]:
                    best, since = (step, hr, copy.deepcopy(model.state_dict())), 0
                else:
                    since += 1
                if fs.patience and since >= fs.patience:
                    break
        else:
            continue
        break
    bar.close()
    model.load_state_dict(best[2])
    return FitResult(best[0], best[1], step, time.perf_counter() - t0, curve, steps)


def _bar(total: int, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, leave=False, desc="steps")


# ------------------------------------------------------------------------------------------------------
# Serving cost
# ------------------------------------------------------------------------------------------------------
class _PeakBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode (inputs and parameters excluded), tracked
    until each storage's owning tensor is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key and key not in self.live:
                    nbytes = t.untyped_storage().nbytes()
                    self.live[key] = nbytes
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, key)
        return out


def serving_cost(model: NextItemModel, data: ArmData, users: int = 16, repeats: int = 3) -> dict[str, float]:
    """Per-user forward cost at batch 1 on the test windows, on the CPU (a copy of the model): median time (ms)
    and peak bytes of the tensors the forward creates plus its inputs (the scoring against the catalogue is the
    same for every arm and left out)."""
    model = copy.deepcopy(model).cpu().eval()
    n = len(data.windows["test"])
    pick = np.linspace(0, n - 1, min(users, n)).astype(np.int64)
    times, peaks, inputs = [], [], []
    with torch.no_grad():
        for i in pick:
            b = {k: v.cpu() for k, v in data.batch("test", np.array([i])).items()}
            model(b)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(b)
                times.append(time.perf_counter() - t0)
            with _PeakBytes() as pb:
                model(b)
            peaks.append(pb.peak)
            inputs.append(sum(v.numel() * v.element_size() for v in b.values()))
    return {
        "ms_per_user": 1000 * float(np.median(times)),
        "peak_kib": float(np.median(np.asarray(peaks) + np.asarray(inputs))) / 1024,
        "input_kib": float(np.median(inputs)) / 1024,
    }
