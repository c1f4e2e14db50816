"""Configuration of the long-history generator (``dv365 synth``): one frozen dataclass, documented fields.

Every number here is a parameter of the SIMULATED generative model described in ``docs/synth.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_END_TS = 1_735_689_600  # 2025-01-01T00:00:00Z: fixed so that output is deterministic
SOURCE = "synth:kuairand-pure"
SIMULATED_NOTE = (
    "SIMULATED data: user timelines and requests are drawn from dv365's documented generative model "
    "(docs/synth.md); only the item catalog (ids, authors, tags, types, durations) is real (KuaiRand-Pure, "
    "CC BY-SA 4.0). Do not report results on it as real-user results."
)
# Label columns of the generated requests with the default actions (float32: 0/1, seconds for watch time):
# ``label_<action>`` for every modelled action, then ``label_watch_time`` (see user.label_names).
LABELS: tuple[str, ...] = (
    "label_like",
    "label_follow",
    "label_comment",
    "label_forward",
    "label_save",
    "label_hate",
    "label_profile_enter",
    "label_long_view",
    "label_watch_time",
)


@dataclass(frozen=True)
class ActionSpec:
    """How often one explicit action follows an impression.

    ``p = rate * propensity_u * exp(affinity_slope * (affinity - 0.4) + watch_slope * (watch_ratio - 0.5))``,
    times ``skip_factor`` when the impression was skipped (dwell < 3 s), then scaled per user so the user's
    explicit timeline has its drawn length (see ``docs/synth.md``).

    Args:
        name: action in the UniTi vocabulary (``like``, ``follow``...).
        rate: base probability per impression at affinity 0.4 and watch ratio 0.5.
        affinity_slope: log-odds-like slope on affinity (negative: more likely on disliked items).
        watch_slope: slope on the watch ratio (0 for actions that do not depend on watching).
        skip_factor: multiplier when the impression was skipped.
    """

    name: str
    rate: float
    affinity_slope: float
    watch_slope: float = 0.0
    skip_factor: float = 0.05


DEFAULT_ACTIONS: tuple[ActionSpec, ...] = (
    ActionSpec("like", 0.017, 2.5, watch_slope=1.5),
    ActionSpec("follow", 0.0012, 3.0, watch_slope=1.0),
    ActionSpec("comment", 0.0040, 2.0, watch_slope=1.0),
    ActionSpec("forward", 0.0025, 2.0, watch_slope=1.0),
    ActionSpec("save", 0.0030, 2.0, watch_slope=1.0),
    ActionSpec("hate", 0.0007, -3.0, watch_slope=-1.0, skip_factor=3.0),
    ActionSpec("profile_enter", 0.020, 2.0, watch_slope=0.5, skip_factor=0.2),
)


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the simulated long-history generator.

    Sizes:
        users: users generated (ids ``0..users-1`` unless ``user_ids`` are given to the functions).
        mean_events: mean events per user, explicit + implicit (paper: 40K).
        max_events: cap on events per user (paper: 70K); also capped at ``max_implicit + max_explicit``.
        min_events: floor on events per user.
        events_sigma: sigma of the log-normal event count (clipped to [min_events, max_events]; its mu is
            solved so that the mean of the clipped distribution is ``mean_events``).
        explicit_fraction: mean explicit share of a user's events (paper: 10K of 40K = 0.25).
        explicit_concentration: per-user explicit share ~ Beta(f*c, (1-f)*c) (users differ in engagement).
        max_implicit, max_explicit: timeline caps (paper: 35K each); the most recent events are kept.
    Time:
        days: span of the history window; it ends at ``end_ts`` (unix s, default 2025-01-01 UTC).
        session_events: mean impressions per session (per-user, log-normal around it).
    Interests:
        long_term_concentration: Dirichlet scale of the stable long-term topic mixture (smaller: more peaked).
        favourite_authors: how many items' authors seed the long-term favourite-author set.
        author_weight: share of interest-driven impressions picked through authors rather than topics.
        short_term_weight: share of impressions drawn from the drifting short-term mixture, and weight of the
            short-term mixture in the affinity (the long-term one gets ``1 - short_term_weight``).
        short_term_days: mean length (days) of a short-term interest epoch.
        short_term_drift: random-walk step: theta_S <- (1-drift) theta_S + drift * Dirichlet(...).
        short_term_concentration: Dirichlet scale of each short-term step.
        explore_weight: share of impressions drawn from global popularity (exploration).
        ad_rate: share of impressions that are ads (on feed/explore/reels).
    Actions:
        actions: the explicit-action model (:class:`ActionSpec` per action); ``long_view`` is derived from
            the watch ratio (``long_view_ratio``) and is not listed here.
        long_view_ratio: watch ratio around which a video view becomes a ``long_view``.
    Requests:
        requests_per_user: training requests per user (0: none).
        request_window_days: requests fall in the last ``request_window_days`` of the window...
        min_history_days: ...but never before this many days of history.
    seed: master seed; user ``u`` draws from ``SeedSequence(seed, spawn_key=(1, u))`` so a user's data does
        not depend on which or how many other users are generated.
    """

    users: int = 100
    mean_events: int = 40_000
    max_events: int = 70_000
    min_events: int = 100
    events_sigma: float = 0.3
    explicit_fraction: float = 0.25
    explicit_concentration: float = 40.0
    max_implicit: int = 35_000
    max_explicit: int = 35_000
    days: int = 400
    end_ts: int = DEFAULT_END_TS
    session_events: float = 20.0
    long_term_concentration: float = 0.3
    favourite_authors: int = 30
    author_weight: float = 0.25
    short_term_weight: float = 0.3
    short_term_days: float = 4.0
    short_term_drift: float = 0.6
    short_term_concentration: float = 0.15
    explore_weight: float = 0.1
    ad_rate: float = 0.03
    long_view_ratio: float = 0.75
    actions: tuple[ActionSpec, ...] = DEFAULT_ACTIONS
    requests_per_user: int = 20
    request_window_days: int = 60
    min_history_days: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"SynthConfig: {what}")

        need(self.users >= 0, f"users must be >= 0, got {self.users}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(
            1 <= self.min_events <= self.mean_events,
            f"need 1 <= min_events ({self.min_events}) <= mean_events ({self.mean_events})",
        )
        need(self.max_implicit >= 1 and self.max_explicit >= 0, "max_implicit must be >= 1 and max_explicit >= 0")
        need(
            self.mean_events < self.events_cap,
            f"mean_events ({self.mean_events}) must be below the per-user cap "
            f"min(max_events, max_implicit + max_explicit) = {self.events_cap}",
        )
        need(self.events_sigma > 0, "events_sigma must be > 0")
        need(0.0 < self.explicit_fraction < 1.0, "explicit_fraction must be in (0, 1)")
        need(self.explicit_concentration > 0, "explicit_concentration must be > 0")
        need(self.days >= 1, f"days must be >= 1, got {self.days}")
        need(self.end_ts > self.days * 86_400, "end_ts must leave room for `days` of history after 1970")
        need(self.session_events >= 1, "session_events must be >= 1")
        for name in ("author_weight", "short_term_weight", "explore_weight", "ad_rate", "short_term_drift"):
            v = getattr(self, name)
            need(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v}")
        need(self.short_term_weight + self.explore_weight <= 1.0, "short_term_weight + explore_weight must be <= 1")
        need(self.long_term_concentration > 0 and self.short_term_concentration > 0, "concentrations must be > 0")
        need(self.short_term_days >= 1.0, "short_term_days must be >= 1")
        need(self.favourite_authors >= 1, "favourite_authors must be >= 1")
        names = [a.name for a in self.actions]
        need(
            len(set(names)) == len(names) and "long_view" not in names,
            f"actions must be unique and exclude long_view: {names}",
        )
        need(
            all(a.rate >= 0 and a.skip_factor >= 0 for a in self.actions), "action rates and skip factors must be >= 0"
        )
        need(self.requests_per_user >= 0, "requests_per_user must be >= 0")
        if self.requests_per_user:
            need(
                self.days > self.min_history_days,
                f"requests need days ({self.days}) > min_history_days ({self.min_history_days})",
            )
            need(self.request_window_days >= 1, "request_window_days must be >= 1")

    @property
    def events_cap(self) -> int:
        """Largest number of events one user can have."""
        return min(self.max_events, self.max_implicit + self.max_explicit)

    @property
    def start_ts(self) -> int:
        """First second of the history window."""
        return self.end_ts - self.days * 86_400

    def request_window(self) -> tuple[int, int]:
        """``[lo, hi)`` in unix seconds where request times are drawn."""
        lo = max(self.start_ts + self.min_history_days * 86_400, self.end_ts - self.request_window_days * 86_400)
        return lo, self.end_ts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["actions"] = [asdict(a) for a in self.actions]
        return d
