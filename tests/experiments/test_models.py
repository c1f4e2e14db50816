"""DownstreamRanker's DV365 modes: shapes, the no_projection interaction (each raw row dotted with the ranker's
own fields), and clear errors for settings that cannot work."""

import pytest
import torch

from dv365.core.quantize import RowFormat, quantize_rows
from dv365.experiments.downstream.hstu import HSTUConfig
from dv365.experiments.downstream.models import DownstreamConfig, DownstreamRanker

E, N, K = 16, 6, 5


def _batch(fmt: RowFormat, B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(B * fmt.rows_per_user, fmt.dim, generator=g)
    payload = quantize_rows(rows, bits=fmt.bits).reshape(B, fmt.rows_per_user, -1)
    ids = lambda hi: torch.randint(0, hi, (B,), generator=g)  # noqa: E731
    h_valid = torch.arange(K)[None] >= torch.tensor([[0], [2], [4], [5]])[:B]
    return {
        "media": ids(50),
        "author": ids(50),
        "topic": ids(50),
        "media_type": ids(3),
        "surface": ids(3),
        "dense": torch.randn(B, 6, generator=g),
        "payload": payload,
        "present": torch.tensor([1, 1, 0, 1][:B]).bool(),
        "age_s": torch.full((B,), 3600.0),
        "h_media": torch.randint(0, 50, (B, K), generator=g),
        "h_action": torch.randint(1, 8, (B, K), generator=g),
        "h_valid": h_valid,
        "h_ts": torch.cumsum(torch.randint(1, 100, (B, K), generator=g), 1),
        "ts": torch.full((B,), 10_000),
    }


def _ranker(mode: str, fmt: RowFormat, **kw: object) -> DownstreamRanker:
    torch.manual_seed(0)
    return DownstreamRanker(
        DownstreamConfig(
            num_tasks=3,
            embedding_dim=E,
            item_hash_size=50,
            hstu=HSTUConfig(dim=E, num_layers=1, num_heads=2, qk_dim=8, v_dim=8),
            dv365=mode,
            row_format=fmt,
            proj_tokens=2,
            **kw,
        )
    )


@pytest.mark.parametrize(
    "mode,raw",
    [
        ("none", "interact"),
        ("linear", "interact"),
        ("hstu_prefix", "interact"),
        ("no_projection", "interact"),
        ("no_projection", "flatten"),
    ],
)
def test_every_mode_runs_and_backpropagates(mode: str, raw: str) -> None:
    fmt = RowFormat(dim=E, rows_per_user=N)
    m = _ranker(mode, fmt, raw_tokens=raw)
    b = _batch(fmt)
    out = m(b)
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    out.sum().backward()  # the heads start at zero weights, so only they get a gradient on the first step
    assert m.heads.weight.grad is not None and m.heads.weight.grad.abs().sum() > 0


def test_no_projection_interact_is_rows_dotted_with_fields() -> None:
    """The extra over-arch inputs of ``interact`` are exactly <DV365 row n, field f> for every n and f, where the
    rows are the de-quantized (zeroed when absent) tokens and the fields are the ranker's own 7 fields."""
    fmt = RowFormat(dim=E, rows_per_user=N)
    m = _ranker("no_projection", fmt, raw_tokens="interact").eval()
    b = _batch(fmt)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["x"] = inp[0]

    m.over.register_forward_hook(keep_input)
    with torch.no_grad():
        m(b)
        dv = m.dv_input(b["payload"], b["present"], b["age_s"])
        assert (dv.tokens[2] == 0).all()  # the absent user
        # the ranker's own fields: item [5], dense [1], user [1] (recomputed the way forward builds them)
        item = m.items(b)
        dense = m.dense(torch.cat([b["dense"], dv.side], 1))
        target = item[:, 0] + item[:, 1] + item[:, 2] + m.target_marker
        x = torch.cat([m.history.tokens(b), target[:, None]], 1)
        valid = torch.cat([b["h_valid"], torch.ones_like(b["h_valid"][:, :1])], 1)
        ts = torch.cat([b["h_ts"], b["ts"][:, None]], 1)
        user = m.history.encode(x, valid, ts, None, None)
        fields = torch.cat([item, dense[:, None], user[:, None]], 1)  # [B, 7, E]
        want = torch.einsum("bnd,bfd->bnf", dv.tokens, fields).flatten(1)
    x = seen["x"]
    assert x.shape[1] == E + 7 * 6 // 2 + N * 7
    torch.testing.assert_close(x[:, -N * 7 :], want)


def test_no_projection_interact_needs_equal_dims() -> None:
    with pytest.raises(ValueError, match=r"DV365 dim \(32\) must equal embedding_dim \(16\)"):
        _ranker("no_projection", RowFormat(dim=32, rows_per_user=N), raw_tokens="interact")
    _ranker("no_projection", RowFormat(dim=32, rows_per_user=N), raw_tokens="flatten")  # flatten has no such need
    with pytest.raises(ValueError, match="raw_tokens = 'concat'"):
        _ranker("no_projection", RowFormat(dim=E, rows_per_user=N), raw_tokens="concat")


def test_dv365_dropout_reads_dropped_examples_as_missing_users_in_training_only() -> None:
    fmt = RowFormat(dim=E, rows_per_user=N, bits=4)
    b = _batch(fmt)
    plain, dropped = _ranker("linear", fmt), _ranker("linear", fmt, dv365_dropout=0.999999)
    dropped.load_state_dict(plain.state_dict())
    missing = dict(b, present=torch.zeros_like(b["present"]))
    plain.train(), dropped.train()
    torch.manual_seed(1)
    assert torch.allclose(dropped(b), plain(missing))  # every example dropped: as if no user had DV365
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(b), plain(b))  # evaluation reads every embedding
