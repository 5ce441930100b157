"""The annotation library: ranking, calibration, trimming, classical and MLLM scorers, the score cache."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr

from oars_fast.annotation import (
    ClassicalPairwiseComparator,
    ClassicalQualityScorer,
    GlobalScorer,
    MLLMGlobalScorer,
    MLLMPairwiseComparator,
    PairwiseComparator,
    ScoreCache,
    TransformersChat,
    bradley_terry,
    cache_key,
    cached_compare,
    cached_scores,
    calibrate,
    n_trimmed,
    parse_choice,
    parse_rating,
    preference_matrix,
    trim,
    win_rate,
)
from oars_fast.annotation.scorers import noise_sigma

ROOT = Path(__file__).resolve().parents[1]


def _chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array -> contiguous (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


# ------------------------------------------------------------------------------------------- ranking

def test_win_rate_hand_cases():
    order = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], float)
    np.testing.assert_allclose(win_rate(order), [1.0, 0.5, 0.0])
    ties = np.array([[0, 0.5, 1], [0.5, 0, 0], [0, 1, 0]], float)
    np.testing.assert_allclose(win_rate(ties), [0.75, 0.25, 0.5])
    np.testing.assert_allclose(win_rate(np.full((4, 4), 0.5)), 0.5)  # all similar
    # the diagonal is ignored, whatever it holds; torch input works too
    odd = ties.copy()
    np.fill_diagonal(odd, [7.0, np.nan, -3.0])
    np.testing.assert_allclose(win_rate(odd), [0.75, 0.25, 0.5])
    np.testing.assert_allclose(win_rate(torch.tensor(ties)), [0.75, 0.25, 0.5])


@pytest.mark.parametrize("prefs, match", [
    (np.zeros((2, 3)), "square"),
    (np.zeros((1, 1)), "at least 2"),
    (np.array([[0, 2.0], [-1.0, 0]]), r"\[0, 1\]"),
    (np.array([[0, np.nan], [0.5, 0]]), "not finite"),
    (np.array([[0, 1.0], [1.0, 0]]), "must be 1"),
    (np.zeros(3), "square"),
])
def test_ranking_rejects_bad_prefs(prefs, match):
    with pytest.raises(ValueError, match=match):
        win_rate(prefs)
    with pytest.raises(ValueError, match=match):
        bradley_terry(prefs)


def test_bradley_terry():
    # all ties -> 0.5 each; the mapped scores always average 0.5
    np.testing.assert_allclose(bradley_terry(np.full((5, 5), 0.5)), 0.5, atol=1e-12)
    # a total order (one candidate wins everything): finite, same order as win_rate
    k = 6
    order = np.triu(np.ones((k, k)), 1)
    r = bradley_terry(order)
    assert np.isfinite(r).all() and (r > 0).all() and (r < 1).all()
    assert (np.diff(r) < 0).all() and np.argsort(-r).tolist() == np.argsort(-win_rate(order)).tolist()
    assert abs(r.mean() - 0.5) < 1e-9
    # exact recovery: outcomes equal to the model's probabilities give back its mean win probabilities
    rng = np.random.default_rng(0)
    strength = np.exp(rng.normal(0, 1, k))
    prob = strength[:, None] / (strength[:, None] + strength[None, :])
    np.fill_diagonal(prob, 0.0)
    np.testing.assert_allclose(bradley_terry(prob, prior=0.0, tol=1e-13, iters=10000), prob.sum(1) / (k - 1),
                               atol=1e-8)
    # the prior shrinks towards 0.5 but keeps the order
    strong = bradley_terry(order, prior=1.0)
    assert (np.abs(strong - 0.5) < np.abs(r - 0.5) + 1e-12).all() and (np.diff(strong) < 0).all()
    with pytest.raises(ValueError, match="prior"):
        bradley_terry(order, prior=-1)


def test_preference_matrix_cancels_position_bias():
    always_a = preference_matrix(4, lambda i, j: "A", both_orders=True)
    np.testing.assert_allclose(win_rate(always_a), 0.5)
    by_index = preference_matrix(4, lambda i, j: "A" if i < j else "B", both_orders=False)
    np.testing.assert_allclose(win_rate(by_index), [1, 2 / 3, 1 / 3, 0])
    with pytest.raises(ValueError, match="returned 'C'"):
        preference_matrix(3, lambda i, j: "C")


# --------------------------------------------------------------------------------------- calibration

def test_calibrate_recovers_linear_data_exactly():
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = int(rng.integers(2, 30))
        r = rng.random(k)
        alpha_true, beta_true = rng.uniform(0.1, 3.0), rng.uniform(1.0, 2.0)
        q = alpha_true * r + beta_true
        alpha, beta, q_sr = calibrate(r, q, lo=-100, hi=100)
        assert abs(alpha - alpha_true) < 1e-9 and abs(beta - beta_true) < 1e-9
        np.testing.assert_allclose(q_sr, q, atol=1e-9)


def test_calibrate_clips_degenerate_nan_and_nonnegative():
    alpha, beta, q_sr = calibrate([0.0, 0.5, 1.0], [0.0, 3.0, 6.0])  # fit 6 r + 0 leaves [1, 5] at both ends
    assert abs(alpha - 6) < 1e-12 and abs(beta) < 1e-12
    np.testing.assert_allclose(q_sr, [1.0, 3.0, 5.0])
    alpha, beta, q_sr = calibrate([0.4] * 4, [2.0, 3.0, 4.0, 5.0])  # degenerate: all r equal
    assert alpha == 0.0 and beta == 3.5
    np.testing.assert_allclose(q_sr, 3.5)
    # an unparsed anchor (NaN) is left out of the fit but still calibrated
    alpha, beta, q_sr = calibrate([0.0, 0.5, 1.0, 0.25], [1.0, 2.0, 3.0, np.nan])
    assert abs(alpha - 2) < 1e-12 and abs(beta - 1) < 1e-12 and abs(q_sr[3] - 1.5) < 1e-12
    # ranker and anchors disagree: plain LS gives alpha < 0; nonnegative falls back to the group mean
    assert calibrate([0.0, 1.0], [4.0, 2.0])[0] < 0
    assert calibrate([0.0, 1.0], [4.0, 2.0], nonnegative=True)[:2] == (0.0, 3.0)
    with pytest.raises(ValueError, match="same length"):
        calibrate([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="no finite anchor"):
        calibrate([0.1, 0.2], [np.nan, np.nan])


def test_trim_removes_exactly_the_configured_fraction():
    rng = np.random.default_rng(2)
    d = rng.random(1000)
    keep = trim(d, 0.05)
    assert (~keep).sum() == 50 == n_trimmed(1000, 0.05)
    assert d[~keep].min() > d[keep].max()  # the 50 largest went
    for n, fraction, expected in [(30, 0.05, 2), (10, 0.04, 0), (10, 0.05, 1), (7, 0.1, 1), (20, 0.1, 2),
                                  (5, 0.0, 0), (5, 1.0, 5)]:
        assert (~trim(rng.random(n), fraction)).sum() == expected == n_trimmed(n, fraction), (n, fraction)
    # ties: the lower index goes first; NaN counts as the largest disagreement
    assert np.flatnonzero(~trim(np.zeros(10), 0.3)).tolist() == [0, 1, 2]
    assert np.flatnonzero(~trim([0.1, np.nan, 0.9, 0.2], 0.5)).tolist() == [1, 2]
    with pytest.raises(ValueError, match="fraction"):
        trim(d, 1.5)


# ------------------------------------------------------------------------------ classical scorers

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle")
_BLUR = (0.0, 0.7, 1.1, 1.6, 2.3, 3.2)           # Gaussian sigma, px
_NOISE = (0.0, 3.0, 6.0, 10.0, 18.0, 30.0)       # Gaussian std, 8-bit units
_JPEG = (None, 80, 55, 35, 18, 7)                # quality
_COMBINED = ((0.0, 0.0, 95), (0.5, 2.0, 80), (0.9, 4.0, 60), (1.4, 7.0, 40), (2.0, 11.0, 25), (2.8, 16.0, 12))


def _hr_patch(name: str, size: int = 256) -> np.ndarray:
    import skimage.data

    a = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    a = a[..., :3]
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size].astype(np.float64) / 255.0


def _q8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255.0) / 255.0


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray((_q8(x) * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf)).astype(np.float64) / 255.0


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return x if sigma == 0 else ndimage.gaussian_filter(x, (sigma, sigma, 0))


def _noise(x: np.ndarray, std: float, seed: int) -> np.ndarray:
    return x if std == 0 else x + np.random.default_rng(seed).normal(0, std / 255.0, x.shape)


def _ladder(hr: np.ndarray, kind: str, seed: int) -> list[np.ndarray]:
    """Six 'SR methods': the HR patch degraded at increasing known severity (index 0 = best)."""
    if kind == "blur":
        return [_q8(_blur(hr, s)) for s in _BLUR]
    if kind == "noise":
        return [_q8(_noise(hr, s, seed)) for s in _NOISE]
    if kind == "jpeg":
        return [_q8(hr) if q is None else _jpeg(hr, q) for q in _JPEG]
    return [_jpeg(_noise(_blur(hr, b), n, seed), q) for b, n, q in _COMBINED]


def test_classical_scorers_order_a_known_severity_ladder():
    scorer, comparator = ClassicalQualityScorer(), ClassicalPairwiseComparator()
    assert isinstance(scorer, GlobalScorer) and isinstance(comparator, PairwiseComparator)
    rows = []
    for seed, name in enumerate(_PHOTOS):
        hr = _hr_patch(name)
        lr = _chw(hr.reshape(64, 4, 64, 4, 3).mean((1, 3)))  # the LR input: 4x area downsampling
        for kind in ("blur", "noise", "jpeg", "combined"):
            cands = [_chw(c) for c in _ladder(hr, kind, seed)]
            # stage 1: global anchors; stage 2: exhaustive pairwise ranking; stage 3: calibration
            q_anchor = scorer.score(cands)
            prefs = preference_matrix(len(cands), lambda i, j: comparator.compare(lr, cands[i], cands[j]),
                                      both_orders=False)  # the classical comparator is symmetric
            r = win_rate(prefs)
            alpha, beta, q_sr = calibrate(r, q_anchor)
            quality = -np.arange(len(cands))  # inverse severity
            rows.append((name, kind, spearmanr(q_sr, quality)[0], spearmanr(q_anchor, quality)[0], alpha,
                         np.round(q_sr, 2)))
            assert all(1.0 <= q <= 5.0 for q in q_anchor)
    print("\nladder Spearman vs inverse severity (6 levels per group)")
    for name, kind, rho_sr, rho_anchor, alpha, q_sr in rows:
        print(f"  {name:22s} {kind:9s} Q_SR {rho_sr:+.3f}  anchor {rho_anchor:+.3f}  alpha {alpha:5.2f}  Q_SR {q_sr}")
    rho_sr = np.array([row[2] for row in rows])
    rho_anchor = np.array([row[3] for row in rows])
    print(f"  Q_SR: min {rho_sr.min():.3f} mean {rho_sr.mean():.3f}; anchors: min {rho_anchor.min():.3f} "
          f"mean {rho_anchor.mean():.3f}; {len(rows)} groups")
    assert rho_sr.min() >= 0.9, rows[int(rho_sr.argmin())]
    assert rho_anchor.min() >= 0.9, rows[int(rho_anchor.argmin())]
    assert all(row[4] > 0 for row in rows)  # ranker and anchors agree on every group's direction


def test_classical_comparator_is_symmetric_and_uses_the_margin():
    hr = _hr_patch("astronaut", 96)
    a, b = _chw(hr), _chw(_q8(_blur(hr, 1.5)))
    lr = _chw(hr.reshape(24, 4, 24, 4, 3).mean((1, 3)))
    comp = ClassicalPairwiseComparator()
    assert comp.compare(lr, a, b) == "A" and comp.compare(lr, b, a) == "B" and comp.compare(None, a, b) == "A"
    assert comp.compare(lr, a, a.clone()) == "similar"
    assert ClassicalPairwiseComparator(margin=10.0).compare(lr, a, b) == "similar"
    assert comp.lr_psnr(lr, a) == comp.psnr_cap  # exact consistency is capped, not infinite
    with pytest.raises(ValueError, match="shape"):
        comp.compare(lr, a[0], b)


def test_noise_estimate_is_calibrated_and_inputs_are_checked():
    rng = np.random.default_rng(3)
    for std in (2.0, 10.0, 25.0):  # std of the luma noise, 8-bit units
        x = np.clip(0.5 + rng.normal(0, std / 255.0, (256, 256, 1)), 0, 1).repeat(3, 2)
        assert abs(noise_sigma(x) / std - 1) < 0.1
    scorer = ClassicalQualityScorer()
    bad = torch.full((3, 32, 32), 0.5)
    bad[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images\[1\] contains NaN"):
        scorer.score([torch.rand(3, 32, 32), bad])
    with pytest.raises(ValueError, match="at least 24"):
        scorer.score([torch.rand(3, 16, 16)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        scorer.score([np.zeros((3, 32, 32))])
    assert scorer.score([torch.full((3, 64, 64), 0.5)]) == [1.0]  # flat: no detail at all


# ----------------------------------------------------------------------------------------- cache

class _CountingScorer:
    name = "counting"

    def __init__(self):
        self.calls = 0
        self.images = 0

    def score(self, images):
        self.calls += 1
        self.images += len(images)
        return [float(img.mean()) * 4 + 1 for img in images]


def test_score_cache_resumes_after_an_interrupted_run(tmp_path):
    path = tmp_path / "scores.jsonl"
    images = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    calls = []

    def score(i):
        calls.append(i)
        return float(images[i].mean())

    cache = ScoreCache(path)
    for i in range(5):  # "killed" after half of the work
        cache.get_or_compute(("scorer-x", images[i]), lambda i=i: score(i))
    del cache
    cache = ScoreCache(path)
    assert len(cache) == 5
    values = [cache.get_or_compute(("scorer-x", img.clone()), lambda i=i: score(i)) for i, img in enumerate(images)]
    assert calls == list(range(10))  # nothing scored twice
    assert (cache.hits, cache.misses) == (5, 5)
    assert values == [float(img.mean()) for img in images]
    # another scorer name, or the same pixels in another dtype, is another key
    assert ("scorer-y", images[0]) not in cache and ("scorer-x", images[0].double()) not in cache
    assert cache_key(("a", 1)) != cache_key(("a", "1")) != cache_key(("a1",))
    # batched scoring through the cache scores only the misses, in one call
    scorer = _CountingScorer()
    first = cached_scores(cache, scorer, images[:4])
    assert cached_scores(cache, scorer, images[:6])[:4] == first
    assert (scorer.calls, scorer.images) == (2, 6)
    comp = ClassicalPairwiseComparator()
    a = torch.rand(3, 32, 32)
    assert cached_compare(cache, comp, None, a, a) == "similar"
    assert ScoreCache(path).get((comp.name, "compare", None, a, a)) == "similar"


def test_score_cache_survives_kill_and_torn_line(tmp_path):
    path = tmp_path / "scores.jsonl"
    child = f"""
import os, signal, sys
from oars_fast.annotation import ScoreCache
assert "transformers" not in sys.modules  # the MLLM dependency stays off the import path
cache = ScoreCache({str(path)!r})
for i in range(20):
    cache.get_or_compute(("k", i), lambda i=i: i * 0.5)
    if i == 11:
        os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    cache = ScoreCache(path)
    assert len(cache) == 12 and cache.get(("k", 11)) == 5.5
    cache.close()
    # a write torn by a crash: the partial last line is ignored with a warning (and cut off)
    with open(path, "ab") as fh:
        fh.write(b'{"k":"0123abc","v":3.')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        cache = ScoreCache(path)
    assert len(cache) == 12
    calls = []
    cache.get_or_compute(("k", 12), lambda: calls.append(12) or float("nan"))
    cache.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = ScoreCache(path)
    assert len(cache) == 13 and math.isnan(cache.get(("k", 12))) and calls == [12]
    # a corrupt line in the middle is skipped with a warning naming the line; the rest loads
    lines = path.read_bytes().split(b"\n")
    lines[3] = b"{not json"
    path.write_bytes(b"\n".join(lines))
    with pytest.warns(RuntimeWarning, match=r"scores.jsonl:4: skipping"):
        cache = ScoreCache(path)
    assert len(cache) == 12 and cache.skipped_lines == 1
    with pytest.raises(TypeError, match="JSON-serialisable"):
        cache.put(("x",), object())


# ------------------------------------------------------------------------------------------ MLLM

@pytest.mark.parametrize("text, expected", [
    ('{"rating": 3.5}', 3.5),
    ('```json\n{"rating": "4.20"}\n```', 4.2),
    ('<think>Maybe a 2, or 3 at most.</think><answer>{"rating": 4}</answer>', 4.0),
    ('Sure! {"Rating": 1.75} is my answer.', 1.75),
    ('{"score": 2}', 2.0),
    ("Rating: 2.75", 2.75),
    ("I would give it 4/5.", 4.0),
    ("3.1", 3.1),
    ("between 2 and 3", None),
    ('{"rating": 7}', None),
    ('{"rating": "good"}', None),
    ("no idea", None),
    ("<think>it is a 4", None),  # generation cut inside its reasoning
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize("text, expected", [
    ('{"choice": "A"}', "A"),
    ('{"choice": "Image B"}', "B"),
    ('{"answer": "similar"}', "similar"),
    ("B", "B"),
    ("Image A.", "A"),
    ("similar", "similar"),
    ("Tie", "similar"),
    ("The answer is B.", "B"),
    ("Candidate A is sharper, but overall B is better.", "B"),
    ("Both look the same to me.", "similar"),
    ("<think>A has noise, B is blurry</think><answer>A</answer>", "A"),
    ("A or B, hard to say", None),
    ("the better choice is a matter of taste", None),
    ('{"choice": "C"}', None),
    ("", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


class _FakeProcessor:
    """Mimics the public API TransformersChat uses: apply_chat_template(..., return_dict=True) + batch_decode."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.messages = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict, return_tensors):
        assert add_generation_prompt and tokenize and return_dict and return_tensors == "pt"
        self.messages.append(messages)
        return {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    def batch_decode(self, tokens, skip_special_tokens):
        return [self.answers[int(t[0]) - 100] for t in tokens]


class _FakeModel:
    device = torch.device("cpu")

    class config:  # noqa: N801 - mimics a transformers config
        _name_or_path = "fake/q-insight"

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, **kw):
        self.calls.append({"do_sample": do_sample, **kw})
        return torch.cat([input_ids, torch.tensor([[100 + len(self.calls) - 1]])], 1)


def test_mllm_global_scorer_parses_retries_and_marks_failures():
    proc, model = _FakeProcessor(["The image looks fine.", '{"rating": 3.4}']), _FakeModel()
    scorer = MLLMGlobalScorer.from_model(model, proc, max_retries=2)
    assert isinstance(scorer, GlobalScorer) and "fake/q-insight" in scorer.name
    assert scorer.score([torch.rand(3, 20, 30)]) == [3.4]
    assert [c["do_sample"] for c in model.calls] == [False, True]  # the retry samples
    content = proc.messages[0][0]["content"]
    assert content[0]["type"] == "image" and content[0]["image"].size == (30, 20) and content[1]["type"] == "text"
    assert "rating" in content[1]["text"] and "could not be read" in proc.messages[1][0]["content"][1]["text"]
    assert not scorer.failures

    bad = ["meh", "4 or 5", '{"rating": 9}']
    scorer = MLLMGlobalScorer.from_model(_FakeModel(), _FakeProcessor(bad), max_retries=2)
    assert math.isnan(scorer.score([torch.rand(3, 20, 30)])[0])
    assert scorer.failures[0].answers == bad and scorer.failures[0].kind == "rating"
    # the name (the cache key) changes with the prompt
    assert MLLMGlobalScorer.from_model(_FakeModel(), proc, prompt="Rate it.").name != scorer.name


def test_mllm_pairwise_comparator_with_a_fake_model():
    proc, model = _FakeProcessor(['{"choice": "B"}']), _FakeModel()
    comp = MLLMPairwiseComparator.from_model(model, proc)
    assert isinstance(comp, PairwiseComparator)
    lr, a, b = torch.rand(3, 8, 8), torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    assert comp.compare(lr, a, b) == "B"
    images = [c for c in proc.messages[0][0]["content"] if c["type"] == "image"]
    assert [im["image"].size for im in images] == [(8, 8), (32, 32), (32, 32)]

    comp = MLLMPairwiseComparator(lambda images, prompt, sample: "I can't tell", max_retries=1)
    assert comp.compare(None, a, b) == "similar"
    assert comp.failures[0].answers == ["I can't tell"] * 2
    # a callable backend is a ChatFn too (e.g. an inference server)
    seen = []
    comp = MLLMPairwiseComparator(lambda images, prompt, sample: seen.append(len(images)) or "A", name="server")
    assert comp.compare(None, a, b) == "A" and seen == [2] and comp.name == "server"


def test_transformers_chat_reports_missing_weights(tmp_path):
    missing = tmp_path / "q-insight"
    with pytest.raises(FileNotFoundError, match="q-insight"):
        TransformersChat.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        MLLMGlobalScorer(str(missing))  # a path is loaded with TransformersChat.from_pretrained


def test_transformers_chat_end_to_end_with_a_tiny_vlm(tmp_path):
    """The real path (chat template with images -> generate -> decode the new tokens) on a tiny LLaVA built here.

    Its output embeddings are zeroed, so every logit ties and greedy decoding emits vocabulary entry 0 ("3"):
    a rating of exactly 3.0 shows that only the generated tokens were decoded (the prompt holds other numbers).
    """
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["3", "<s>", "</s>", "<pad>", "<image>", "USER", "ASSISTANT", ":", "[UNK]"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<image>"])
    template = ("{% for m in messages %}{{ m['role'] | upper }} : {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT : {% endif %}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision, falling back to the PIL backend"
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28},
                                                          crop_size={"height": 28, "width": 28})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default", chat_template=template,
                                            image_token="<image>", num_additional_image_tokens=1)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14),
        text_config=transformers.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=4, vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    folder = tmp_path / "tiny-vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    chat = TransformersChat.from_pretrained(str(folder), device="cpu", dtype=torch.float32, max_new_tokens=3)
    assert chat.name == str(folder)
    scorer = MLLMGlobalScorer(chat, max_retries=0)
    assert scorer.score([torch.rand(3, 40, 56), torch.rand(1, 30, 30)]) == [3.0, 3.0]
    comp = MLLMPairwiseComparator(chat, max_retries=0)  # three images in one prompt
    assert comp.compare(torch.rand(3, 16, 16), torch.rand(3, 64, 64), torch.rand(3, 64, 64)) == "similar"
    assert comp.failures[0].answers == ["3 3 3"]
