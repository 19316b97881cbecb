"""Tests for legokit.aggregate: HeteAgg and the baselines on tiny hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from legokit.aggregate import (
    AGGREGATORS,
    ClientUpdate,
    cosine_matrix,
    coverage,
    fedavg,
    fedavg_delta,
    fedavg_factors,
    flexlora,
    flora,
    flora_factors,
    get_aggregator,
    heteagg,
    heterofl,
    update_norms,
)
from legokit.utils import LegokitError

MOD = "model.layers.0.self_attn.q_proj"
MASK_AWARE = ("heteagg", "heterofl", "fedavg_delta")
MASK_AGNOSTIC = ("fedavg", "flora", "flexlora")


def make_update(client: str, out: int = 4, inp: int = 6, rank: int = 2, seed: int = 0, alpha: float = 4.0,
                mask: torch.Tensor | None = None, weight: float = 1.0, name: str = MOD) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, inp, generator=g)  # (r, in)
    B = torch.randn(out, rank, generator=g)  # (out, r)
    if mask is None:
        mask = torch.ones(out, inp, dtype=torch.bool)
    return ClientUpdate(client=client, factors={name: (A, B)}, scaling=alpha / rank, masks={name: mask},
                        weight=weight)


def dense_update(client: str, deltas: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 weight: float = 1.0) -> ClientUpdate:
    """A ClientUpdate whose ``s·B@A`` is exactly the given ΔW per module: A = ΔW (out, in), B = I, s = 1."""
    factors = {name: (d, torch.eye(d.shape[0])) for name, d in deltas.items()}
    return ClientUpdate(client=client, factors=factors, scaling=1.0, masks=masks, weight=weight)


def dense_updates(deltas: list[dict[str, torch.Tensor]], masks: list[dict[str, torch.Tensor]],
                  weights: list[float] | None = None) -> list[ClientUpdate]:
    """One :func:`dense_update` per client, named 'a', 'b', ... (weights 1.0 unless given)."""
    weights = [1.0] * len(deltas) if weights is None else weights
    return [dense_update(chr(ord("a") + k), d, m, w)
            for k, (d, m, w) in enumerate(zip(deltas, masks, weights, strict=True))]


def random_mask(shape: tuple[int, int], keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < keep


# Hand-computed example (2 x 3): client a weight 1, client b weight 3.
DA = torch.tensor([[0.0, 4.0, 8.0], [2.0, 2.0, 2.0]])
DB = torch.tensor([[4.0, 0.0, 4.0], [6.0, 10.0, -2.0]])
MA = torch.tensor([[True, True, False], [True, False, False]])
MB = torch.tensor([[True, False, True], [True, False, False]])
PREV = torch.tensor([[9.0, 9.0, 9.0], [9.0, -1.0, 7.0]])


# --------------------------------------------------------------------------------------------- heteagg


def test_dense_update_carries_the_delta_exactly():
    # the helper the hand-computed tests rely on: s·B@A reproduces ΔW bit for bit
    u = dense_update("a", {"m": DA, "n": DB.T}, {"m": MA, "n": MB.T})
    assert torch.equal(u.delta("m"), DA) and torch.equal(u.delta("n"), DB.T)
    assert torch.equal(u.masked_delta("m"), DA * MA)


def test_heteagg_weights_respected_hand_computed():
    # prepare
    updates = dense_updates([{"m": DA}, {"m": DB}], [{"m": MA}, {"m": MB}], [1.0, 3.0])
    # execute
    keep = heteagg(updates, previous={"m": PREV}, uncovered="keep")["m"]
    zero = heteagg(updates, previous={"m": PREV}, uncovered="zero")["m"]
    # assert: (0,0) and (1,0) owned by both -> (1*a + 3*b)/4; (0,1) only a; (0,2) only b; rest nobody
    torch.testing.assert_close(keep, torch.tensor([[3.0, 4.0, 4.0], [5.0, -1.0, 7.0]]))
    torch.testing.assert_close(zero, torch.tensor([[3.0, 4.0, 4.0], [5.0, 0.0, 0.0]]))
    assert keep.dtype == torch.float32


def test_heteagg_keep_without_previous_gives_zero():
    # prepare
    updates = dense_updates([{"m": DA}, {"m": DB}], [{"m": MA}, {"m": MB}], [1.0, 3.0])
    # execute
    none = heteagg(updates, previous=None)["m"]
    other_key = heteagg(updates, previous={"other": PREV})["m"]
    # assert
    expected = torch.tensor([[3.0, 4.0, 4.0], [5.0, 0.0, 0.0]])
    torch.testing.assert_close(none, expected)
    torch.testing.assert_close(other_key, expected)


def test_fedavg_delta_hand_computed_includes_pruned_zeros():
    # prepare
    updates = dense_updates([{"m": DA}, {"m": DB}], [{"m": MA}, {"m": MB}], [1.0, 3.0])
    # execute
    out = fedavg_delta(updates, previous={"m": PREV})["m"]
    # assert: Σ n_k M_k ΔW_k / 4; uncovered coordinates get 0, the previous value is ignored
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.0, 3.0], [5.0, 0.0, 0.0]]))


def test_heterofl_hand_computed_and_equals_heteagg_with_equal_weights():
    # prepare: unequal weights, which heterofl ignores
    deltas, masks = [{"m": DA}, {"m": DB}], [{"m": MA}, {"m": MB}]
    # execute
    hfl = heterofl(dense_updates(deltas, masks, [1.0, 3.0]), previous={"m": PREV})["m"]
    hag = heteagg(dense_updates(deltas, masks, [5.0, 5.0]), previous={"m": PREV})["m"]
    # assert
    torch.testing.assert_close(hfl, torch.tensor([[2.0, 4.0, 4.0], [4.0, -1.0, 7.0]]))
    torch.testing.assert_close(hfl, hag)


def test_heteagg_full_masks_equals_fedavg_delta():
    # prepare
    g = torch.Generator().manual_seed(1)
    deltas = [{"m": torch.randn(4, 6, generator=g), "n": torch.randn(2, 3, generator=g)} for _ in range(3)]
    masks = [{"m": torch.ones(4, 6, dtype=torch.bool), "n": torch.ones(2, 3, dtype=torch.bool)}] * 3
    weights = [1.0, 2.0, 5.0]
    updates = dense_updates(deltas, masks, weights)
    # execute
    hag = heteagg(updates)
    fad = fedavg_delta(updates)
    # assert
    assert set(hag) == {"m", "n"}
    for name in hag:
        torch.testing.assert_close(hag[name], fad[name])
        expected = sum(w * d[name] for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        torch.testing.assert_close(hag[name], expected)


def test_heteagg_disjoint_masks_give_each_owner_its_delta():
    # prepare: three clients own disjoint column stripes of a 4 x 6 module; columns 4,5 are owned by nobody
    g = torch.Generator().manual_seed(2)
    deltas, masks = [], []
    for k in range(3):
        deltas.append({"m": torch.randn(4, 6, generator=g)})
        m = torch.zeros(4, 6, dtype=torch.bool)
        m[:, k] = True
        m[:, 3] = k == 2  # column 3 also owned by client 2 only
        masks.append({"m": m})
    prev = torch.full((4, 6), 7.0)
    # execute
    out = heteagg(dense_updates(deltas, masks, [1.0, 10.0, 0.5]), previous={"m": prev})["m"]
    # assert
    for k in range(3):
        torch.testing.assert_close(out[:, k], deltas[k]["m"][:, k])
    torch.testing.assert_close(out[:, 3], deltas[2]["m"][:, 3])
    torch.testing.assert_close(out[:, 4:], prev[:, 4:])


def test_heteagg_zero_weight_owner_counts_as_uncovered():
    # prepare
    updates = dense_updates([{"m": DA}, {"m": DB}], [{"m": MA}, {"m": MB}], [1.0, 0.0])
    # execute
    out = heteagg(updates, uncovered="zero")["m"]
    # assert: (0,2) is owned only by b, whose weight is 0
    torch.testing.assert_close(out, torch.tensor([[0.0, 4.0, 0.0], [2.0, 0.0, 0.0]]))


def test_heteagg_covered_coordinate_within_owner_range_property():
    for seed in range(25):
        # prepare
        g = torch.Generator().manual_seed(seed)
        K = int(torch.randint(1, 6, (1,), generator=g))
        deltas = [{"m": torch.randn(5, 7, generator=g) * 3} for _ in range(K)]
        masks = [{"m": random_mask((5, 7), 0.5, seed * 100 + k)} for k in range(K)]
        weights = (torch.rand(K, generator=g) * 10 + 0.01).tolist()
        # execute
        out = heteagg(dense_updates(deltas, masks, weights), uncovered="zero")["m"]
        # assert
        D = torch.stack([d["m"] for d in deltas])  # (K, out, in)
        M = torch.stack([m["m"] for m in masks])
        hi = torch.where(M, D, torch.tensor(-math.inf)).amax(0)
        lo = torch.where(M, D, torch.tensor(math.inf)).amin(0)
        covered = M.any(0)
        assert bool((out[covered] <= hi[covered] + 1e-5).all()), seed
        assert bool((out[covered] >= lo[covered] - 1e-5).all()), seed
        assert bool((out[~covered] == 0).all()), seed


def test_heteagg_ignores_client_order_and_the_scale_of_the_weights():
    # prepare
    g = torch.Generator().manual_seed(20)
    deltas = [{"m": torch.randn(5, 7, generator=g), "n": torch.randn(3, 4, generator=g)} for _ in range(4)]
    masks = [{"m": random_mask((5, 7), 0.5, 30 + k), "n": random_mask((3, 4), 0.5, 40 + k)} for k in range(4)]
    weights = [1.0, 2.0, 5.0, 0.5]
    prev = {"m": torch.full((5, 7), 3.0), "n": torch.full((3, 4), -1.0)}
    perm = [2, 0, 3, 1]
    updates = dense_updates(deltas, masks, weights)
    # execute
    ref = heteagg(updates, prev)
    shuffled = heteagg([updates[i] for i in perm], prev)
    scaled = [heteagg(dense_updates(deltas, masks, [c * w for w in weights]), prev) for c in (1e-3, 7.0, 1e4)]
    other = heteagg(dense_updates(deltas, masks, [1.0, 2.0, 5.0, 4.0]), prev)  # one weight changed
    # assert
    for name in ("m", "n"):
        torch.testing.assert_close(shuffled[name], ref[name])
        for out in scaled:
            torch.testing.assert_close(out[name], ref[name])
    assert not torch.allclose(other["m"], ref["m"])  # the weights do matter (the check can fail)


@pytest.mark.parametrize("agg", sorted(AGGREGATORS))
def test_update_aggregators_ignore_client_order_and_the_scale_of_the_weights(agg):
    # prepare: equal ranks and scalings so that fedavg applies too
    updates = [make_update(c, seed=50 + k, mask=random_mask((4, 6), 0.6, 60 + k), weight=w)
               for k, (c, w) in enumerate(zip("abcd", (1.0, 3.0, 0.5, 2.0), strict=True))]
    prev = {MOD: torch.full((4, 6), 2.0)}
    # execute
    ref = AGGREGATORS[agg](updates, prev, "keep")[MOD]
    reversed_ = AGGREGATORS[agg](updates[::-1], prev, "keep")[MOD]
    scaled = AGGREGATORS[agg]([ClientUpdate(u.client, u.factors, u.scaling, u.masks, 250.0 * u.weight)
                               for u in updates], prev, "keep")[MOD]
    # assert
    torch.testing.assert_close(reversed_, ref)
    torch.testing.assert_close(scaled, ref)


# ------------------------------------------------------------------------------------ factor-based


def test_identical_clients_give_back_their_update_full_masks():
    # prepare
    updates = [make_update(c, seed=3, weight=w) for c, w in (("a", 1.0), ("b", 4.0), ("c", 0.5))]
    expected = updates[0].delta(MOD)
    for name in AGGREGATORS:
        # execute
        out = AGGREGATORS[name](updates, None, "keep")
        # assert
        assert set(out) == {MOD}, name
        torch.testing.assert_close(out[MOD], expected, msg=name)


def test_identical_clients_with_partial_mask():
    # prepare
    mask = random_mask((4, 6), 0.5, seed=4)
    updates = [make_update(c, seed=5, mask=mask) for c in ("a", "b")]
    raw = updates[0].delta(MOD)
    for name in AGGREGATORS:
        # execute
        out = AGGREGATORS[name](updates, None, "zero")[MOD]
        # assert: mask-aware rules return the applied update M ⊙ ΔW, mask-agnostic ones the raw product
        expected = raw * mask if name in MASK_AWARE else raw
        torch.testing.assert_close(out, expected, msg=name)


def test_mask_aware_rules_match_their_formulas_on_low_rank_factors():
    # prepare: low-rank factors with different ranks and scalings, partial masks, unequal weights
    updates = [make_update(c, rank=k + 1, alpha=2.0 + k, seed=k, mask=random_mask((4, 6), 0.5, 10 + k),
                           weight=k + 1.0) for k, c in enumerate("abc")]
    prev = torch.full((4, 6), -3.0)
    D = torch.stack([u.scaling * (u.factors[MOD][1].double() @ u.factors[MOD][0].double())
                     for u in updates])  # (K, out, in) float64 reference
    M = torch.stack([u.masks[MOD] for u in updates]).double()
    n = torch.tensor([u.weight for u in updates], dtype=torch.float64)[:, None, None]
    covered = M.sum(0) > 0
    # some coordinates nobody owns (the fallback is exercised), some several clients own (the weights matter)
    assert not bool(covered.all()) and bool((M.sum(0) >= 2).any())
    # execute
    got = {name: AGGREGATORS[name](updates, {MOD: prev}, "keep")[MOD] for name in MASK_AWARE}
    # assert
    owner_mean = torch.where(covered, (n * M * D).sum(0) / (n * M).sum(0).clamp_min(1e-300), prev.double())
    equal_mean = torch.where(covered, (M * D).sum(0) / M.sum(0).clamp_min(1e-300), prev.double())
    torch.testing.assert_close(got["heteagg"], owner_mean.float())
    torch.testing.assert_close(got["heterofl"], equal_mean.float())
    torch.testing.assert_close(got["fedavg_delta"], ((n * M * D).sum(0) / n.sum()).float())
    assert heteagg is AGGREGATORS["heteagg"] and heterofl is AGGREGATORS["heterofl"]
    assert fedavg_delta is AGGREGATORS["fedavg_delta"]


def test_flora_exact_and_stacked_factors_reproduce_it():
    # prepare: heterogeneous ranks and scalings
    updates = [make_update("a", rank=2, alpha=4.0, seed=6, weight=1.0),
               make_update("b", rank=4, alpha=8.0, seed=7, weight=3.0),
               make_update("c", rank=1, alpha=1.0, seed=8, weight=2.0)]
    p = [1 / 6, 3 / 6, 2 / 6]
    expected = sum(pk * u.scaling * u.factors[MOD][1] @ u.factors[MOD][0]
                   for pk, u in zip(p, updates, strict=True))
    # execute
    dense = flora(updates)[MOD]
    A, B = flora_factors(updates)[MOD]
    # assert
    assert A.shape == (7, 6) and B.shape == (4, 7)
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(B @ A, expected)
    torch.testing.assert_close(flexlora(updates)[MOD], expected)


def test_fedavg_of_identical_factors_is_their_product():
    # prepare
    A = torch.arange(12.0).reshape(2, 6) / 10  # (r, in)
    B = torch.arange(8.0).reshape(4, 2) / 10  # (out, r)
    mask = torch.ones(4, 6, dtype=torch.bool)
    updates = [ClientUpdate(c, {MOD: (A, B)}, 2.0, {MOD: mask}, w) for c, w in (("a", 1.0), ("b", 7.0))]
    # execute
    out = fedavg(updates)[MOD]
    # assert
    torch.testing.assert_close(out, 2.0 * B @ A)


def test_fedavg_averages_factors_separately():
    # prepare
    a = make_update("a", seed=9, weight=1.0)
    b = make_update("b", seed=10, weight=3.0)
    (Aa, Ba), (Ab, Bb) = a.factors[MOD], b.factors[MOD]
    # execute
    out = fedavg([a, b])[MOD]
    A_g, B_g = fedavg_factors([a, b])[MOD]
    # assert: s · (Σ p B)(Σ p A), not the average of products
    torch.testing.assert_close(A_g, 0.25 * Aa + 0.75 * Ab)
    torch.testing.assert_close(out, a.scaling * (0.25 * Ba + 0.75 * Bb) @ (0.25 * Aa + 0.75 * Ab))
    assert not torch.allclose(out, flexlora([a, b])[MOD])


def test_fedavg_different_ranks_raises():
    # prepare
    updates = [make_update("a", rank=2, alpha=4.0), make_update("b", rank=4, alpha=8.0)]
    # execute / assert
    with pytest.raises(LegokitError, match="equal LoRA ranks.*'a': r=2.*'b': r=4.*flora"):
        fedavg(updates)


def test_fedavg_different_scalings_raises():
    # prepare
    updates = [make_update("a", rank=2, alpha=4.0), make_update("b", rank=2, alpha=8.0, seed=1)]
    # execute / assert
    with pytest.raises(LegokitError, match="one LoRA scaling"):
        fedavg(updates)


def test_aggregators_over_several_modules():
    # prepare
    def two_modules(client: str, seed: int) -> ClientUpdate:
        u, v = make_update(client, seed=seed), make_update(client, 2, 3, 1, seed=seed + 50, name="n")
        return ClientUpdate(client, {**u.factors, **v.factors}, u.scaling, {**u.masks, **v.masks})

    updates = [two_modules("a", 0), two_modules("b", 1)]
    # execute / assert: each module comes out as if aggregated alone (fedavg needs equal scalings: rank 1
    # alpha 4 != rank 2 alpha 4)
    for name in set(AGGREGATORS) - {"fedavg"}:
        out = AGGREGATORS[name](updates, None, "keep")
        assert set(out) == {MOD, "n"} and out[MOD].shape == (4, 6) and out["n"].shape == (2, 3), name
        for module in (MOD, "n"):
            alone = [ClientUpdate(u.client, {module: u.factors[module]}, u.scaling, {module: u.masks[module]},
                                  u.weight) for u in updates]
            torch.testing.assert_close(out[module], AGGREGATORS[name](alone, None, "keep")[module], msg=name)


# ----------------------------------------------------------------------------------------- helpers


def test_coverage_counts():
    # prepare
    masks = [{"m": MA}, {"m": MB}, {"m": torch.ones(2, 3, dtype=torch.bool)}]
    # execute
    cov = coverage(masks, "m")
    # assert
    assert cov.dtype == torch.int32
    torch.testing.assert_close(cov, torch.tensor([[3, 2, 2], [3, 1, 1]], dtype=torch.int32))


def test_update_norms_and_cosine():
    # prepare
    mask = random_mask((4, 6), 0.5, seed=11)
    a = make_update("a", seed=12, mask=mask)
    b = make_update("b", seed=12, mask=mask, alpha=-4.0)  # b = -a
    c = make_update("c", seed=13)
    # execute
    norms = update_norms([a, b, c])
    raw = update_norms([a], masked=False)
    cos = cosine_matrix([a, b, c], name=MOD)
    cos_all = cosine_matrix([a, b, c])
    # assert
    assert norms["a"][MOD] == pytest.approx(float((a.delta(MOD) * mask).norm()))
    assert raw["a"][MOD] == pytest.approx(float(a.delta(MOD).norm()))
    torch.testing.assert_close(cos.diagonal(), torch.ones(3))
    assert cos[0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    torch.testing.assert_close(cos, cos.T)
    torch.testing.assert_close(cos_all, cos)


def test_cosine_of_zero_update_is_nan():
    # prepare
    a = make_update("a", seed=1)
    z = ClientUpdate("z", {MOD: (torch.zeros(2, 6), torch.zeros(4, 2))}, 1.0, a.masks)
    # execute
    cos = cosine_matrix([a, z])
    # assert
    assert math.isnan(cos[0, 1].item()) and cos[0, 0].item() == pytest.approx(1.0)


def test_get_aggregator():
    assert get_aggregator("heteagg") is AGGREGATORS["heteagg"]
    assert set(AGGREGATORS) == {"heteagg", "fedavg", "fedavg_delta", "heterofl", "flora", "flexlora"}
    with pytest.raises(LegokitError, match="unknown aggregator 'fedprox'.*heteagg"):
        get_aggregator("fedprox")
    with pytest.raises(LegokitError, match="'local' is a reference"):
        get_aggregator("local")
    with pytest.raises(LegokitError, match="'centralized' is a reference"):
        get_aggregator("centralized")


def test_inputs_are_not_modified():
    # prepare
    dense = dense_updates([{"m": DA.clone()}, {"m": DB.clone()}], [{"m": MA.clone()}, {"m": MB.clone()}])
    prev = {"m": PREV.clone()}
    u = make_update("a", mask=random_mask((4, 6), 0.5, 3))
    A, B = (t.clone() for t in u.factors[MOD])
    # execute
    for fn in AGGREGATORS.values():
        fn(dense, prev, "keep")
        fn([u], None, "keep")
    # assert
    torch.testing.assert_close(dense[0].factors["m"][0], DA)
    torch.testing.assert_close(dense[1].factors["m"][0], DB)
    torch.testing.assert_close(dense[0].factors["m"][1], torch.eye(2))
    assert torch.equal(dense[0].masks["m"], MA) and torch.equal(dense[1].masks["m"], MB)
    torch.testing.assert_close(prev["m"], PREV)
    torch.testing.assert_close(u.factors[MOD][0], A)
    torch.testing.assert_close(u.factors[MOD][1], B)


# ------------------------------------------------------------------------------------- bad inputs

GOOD_D, GOOD_M = [{"m": DA}, {"m": DB}], [{"m": MA}, {"m": MB}]


def _bad(deltas: list[dict], masks: list[dict], weights: list[float] | None = None):
    """Build the dense updates lazily, inside ``pytest.raises`` (a construction error is one too)."""
    return lambda: dense_updates(deltas, masks, weights)


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (_bad([], []), {}, "no client updates"),
        (_bad([{"m": DA}, {"n": DB}], [{"m": MA}, {"n": MB}]), {},
         r"module keys differ between clients 'a' and 'b': only in 'a': \['m'\]; only in 'b': \['n'\]"),
        (_bad(GOOD_D, [{"m": MA}, {"x": MB}]), {}, r"client 'b': no mask for module\(s\) \['m'\]"),
        (_bad(GOOD_D, [{"m": MA}, {"m": MB.T}]), {},
         r"mask shape \(3, 2\) of module 'm', client 'b' does not match its update's shape \(2, 3\)"),
        (_bad([{"m": DA}, {"m": DB.T}], [{"m": MA}, {"m": MB.T}]), {},
         r"module 'm': client 'b' has A \(3, 2\), B \(3, 3\) -> \(out, in\) = \(3, 2\), client 'a' has \(2, 3\)"),
        (_bad(GOOD_D, [{"m": MA}, {"m": MB.float()}]), {},
         "mask of module 'm', client 'b' has dtype torch.float32: masks must be bool"),
        (_bad(GOOD_D, GOOD_M, [1, -1]), {}, "weight of client 'b' is -1.0"),
        (_bad(GOOD_D, GOOD_M, [1, float("nan")]), {}, "weight of client 'b' is nan"),
        (_bad(GOOD_D, GOOD_M, [1, float("inf")]), {}, "weight of client 'b' is inf"),
        (_bad(GOOD_D, GOOD_M, [0, 0]), {}, "all client weights are zero"),
        (_bad(GOOD_D, GOOD_M), {"uncovered": "mean"}, "unknown uncovered rule 'mean'"),
        (_bad([{"m": DA}, {"m": DB * float("inf")}], GOOD_M), {},
         "factor A of module 'm', client 'b' has NaN/inf"),
        (_bad([{"m": DA}, {"m": DB * float("nan")}], GOOD_M), {},
         "factor A of module 'm', client 'b' has NaN/inf"),
        (_bad(GOOD_D, GOOD_M), {"previous": {"m": PREV.T}},
         r"previous global delta of module 'm' has shape \(3, 2\), the updates have \(2, 3\)"),
    ],
)
def test_heteagg_bad_inputs_raise(make, kwargs, message):
    with pytest.raises(LegokitError, match=message):
        heteagg(make(), **kwargs)


def test_fedavg_delta_and_heterofl_bad_inputs_raise():
    with pytest.raises(LegokitError, match="client 'b' has dtype torch.int32: masks must be bool"):
        fedavg_delta(dense_updates(GOOD_D, [{"m": MA}, {"m": MB.int()}]))
    with pytest.raises(LegokitError, match="all client weights are zero"):
        fedavg_delta(dense_updates(GOOD_D, GOOD_M, [0.0, 0.0]))
    with pytest.raises(LegokitError, match="no client updates"):
        heterofl([])
    with pytest.raises(LegokitError, match="unknown uncovered rule 'nearest'"):
        heterofl(dense_updates(GOOD_D, GOOD_M), uncovered="nearest")
    with pytest.raises(LegokitError, match="weight of client 'a' is -1.0"):  # ignored, but still validated
        heterofl(dense_updates(GOOD_D, GOOD_M, [-1.0, 1.0]))


def test_client_update_construction_errors():
    A, B, mask = torch.zeros(2, 6), torch.zeros(4, 2), torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(LegokitError, match=r"client 'a': no mask for module\(s\) \['q'\]"):
        ClientUpdate("a", {"q": (A, B)}, 1.0, {"k": mask})
    with pytest.raises(LegokitError, match=r"module 'q', client 'a': A \(2, 6\) and B \(4, 3\) do not fit"):
        ClientUpdate("a", {"q": (A, torch.zeros(4, 3))}, 1.0, {"q": mask})
    with pytest.raises(LegokitError, match="scaling must be finite"):
        ClientUpdate("a", {"q": (A, B)}, float("nan"), {"q": mask})
    with pytest.raises(LegokitError, match="client 'a' has no factors for module 'v'"):
        ClientUpdate("a", {"q": (A, B)}, 1.0, {"q": mask}).delta("v")


@pytest.mark.parametrize("agg", sorted(AGGREGATORS))
def test_update_aggregators_bad_inputs_raise(agg):
    fn = AGGREGATORS[agg]
    a = make_update("a", seed=1)
    cases = [
        ([], "no client updates"),
        ([a, make_update("a", seed=2)], r"duplicate client name\(s\) \['a'\]"),
        ([a, make_update("b", name="other")], "module keys differ between clients 'a' and 'b'"),
        ([a, make_update("b", out=5)], r"client 'b' has A \(2, 6\), B \(5, 2\) -> \(out, in\) = \(5, 6\)"),
        ([a, make_update("b", mask=torch.ones(4, 6))], "client 'b' has dtype torch.float32: masks must be bool"),
        ([a, make_update("b", mask=torch.ones(6, 4, dtype=torch.bool))], r"mask shape \(6, 4\)"),
        ([a, make_update("b", weight=-2.0)], "weight of client 'b' is -2.0"),
        ([make_update("a", weight=0.0), make_update("b", weight=0.0)], "all client weights are zero"),
    ]
    for updates, message in cases:
        with pytest.raises(LegokitError, match=message):
            fn(updates, None, "keep")
    nan = make_update("b")
    nan.factors[MOD][1][0, 0] = float("nan")
    with pytest.raises(LegokitError, match="factor B of module .*q_proj', client 'b' has NaN/inf"):
        fn([a, nan], None, "keep")
    with pytest.raises(LegokitError, match="unknown uncovered rule 'bogus'"):
        fn([a, make_update("b", seed=3)], None, "bogus")


# ------------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize("agg", list(AGGREGATORS))
def test_aggregators_run_where_the_factors_are_and_match_the_cpu(device, agg):
    shapes = {"m.q": (4, 6), "m.k": (5, 3)}

    def updates(dev: torch.device) -> list[ClientUpdate]:
        out = []
        for k in range(3):
            factors, masks = {}, {}
            for j, (name, (o, i)) in enumerate(shapes.items()):
                u = make_update("abc"[k], o, i, seed=10 * k + j, mask=random_mask((o, i), 0.6, 10 * k + j), name=name)
                factors[name] = tuple(t.to(dev) for t in u.factors[name])
                masks[name] = u.masks[name].to(dev)
            out.append(ClientUpdate(client="abc"[k], factors=factors, scaling=2.0, masks=masks, weight=k + 1.0))
        return out

    previous = {n: torch.ones(s) for n, s in shapes.items()}
    want = AGGREGATORS[agg](updates(torch.device("cpu")), previous, "keep")
    got = AGGREGATORS[agg](updates(device), {n: t.to(device) for n, t in previous.items()}, "keep")
    assert set(got) == set(shapes)
    for name, delta in got.items():
        assert delta.device.type == device.type and delta.dtype == torch.float32
        torch.testing.assert_close(delta.cpu(), want[name], atol=1e-5, rtol=1e-5)
