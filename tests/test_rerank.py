"""Reranking: a cross-encoder folder and the base model as a yes/no judge rescore the fused candidates; the
ladder's optional hybrid+rerank rung puts the reranked passages into the prompt."""

import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.rag import build_index, load_index, retrieval_augment
from tunelab.rag.rerank import CrossEncoderReranker, JudgeReranker, load_reranker
from tunelab.tasks import load_task

TASK = "handbook-qa"
Q = "Who is Tariq Novak's manager?"


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """A hybrid index of the first 20 handbook documents."""
    docs = load_task(TASK).corpus()[:20]
    corpus = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return build_index(corpus, tmp_path_factory.mktemp("idx") / "small")


@pytest.fixture(scope="module")
def judge():
    from tunelab.models import load_tokenizer, tiny_model

    torch.manual_seed(0)
    model, tok = tiny_model("llama", tokenizer=load_tokenizer("smollm2-135m-instruct"))
    return JudgeReranker(model.eval(), tok, depth=4, batch_size=3)


def test_a_cross_encoder_folder_rescores_through_crossencoder(small_index, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    rr = load_reranker(tiny_cross_encoder)
    assert isinstance(rr, CrossEncoderReranker) and rr.depth is None
    fused = small_index.search(Q, k=small_index.config.candidates)
    hits = small_index.with_reranker(rr).search(Q, k=3)
    ce = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    want = ce.predict([(Q, f"{h.title}\n{h.text}") for h in fused])
    order = sorted(range(len(fused)), key=lambda i: (-want[i], fused[i].id))[:3]
    assert [h.id for h in hits] == [fused[i].id for i in order]
    assert [h.score for h in hits] == pytest.approx([float(want[i]) for i in order], abs=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3] and {h.score_name for h in hits} == {"cross-encoder"}
    by_id = {h.id: h for h in fused}
    for h in hits:  # the fused rank and score are kept beside each retriever's own
        assert h.stages["rrf"] == {"rank": by_id[h.id].rank, "score": by_id[h.id].score}
        assert {"bm25", "dense"} & set(h.stages)
    assert small_index.reranker is None  # with_reranker returned another view of the index
    with pytest.raises(TunelabError, match="not a local cross-encoder folder"):
        load_reranker(tiny_cross_encoder / "missing")


def test_the_judge_scores_the_log_odds_of_yes(judge):
    """Batched, left-padded scores equal one unpadded forward per pair: log P(Yes-tokens) - log P(No-tokens)."""
    pairs = [(Q, "People directory: Tariq Novak\nTariq Novak reports to Julia Reyes."),
             ("Which day was the offsite?", "Events\nThe 2023 Summer Offsite was on 17 July 2023, in Cork."),
             (Q, "Short."), (Q, "A much longer passage " * 8)]
    got = judge.score(pairs)
    for (q, p), g in zip(pairs, got):
        ids = torch.tensor([judge.prompt_ids(q, p)])
        with torch.inference_mode():
            logits = judge.model(input_ids=ids).logits[0, -1].float()  # (V,)
        want = torch.logsumexp(logits[judge.yes], -1) - torch.logsumexp(logits[judge.no], -1)
        assert g == pytest.approx(float(want), abs=1e-4)
    assert len(set(judge.yes) & set(judge.no)) == 0 and judge.score([]) == []
    assert Q in judge.tokenizer.decode(judge.prompt_ids(*pairs[0])) and "Yes or No" in \
        judge.tokenizer.decode(judge.prompt_ids(*pairs[0]))


def test_the_judge_reorders_the_top_depth_fused_candidates(small_index, judge):
    qs = [Q, "In which office does Hamid Nilsson work?"]
    fused = small_index.search_many(qs, k=10)
    hits = small_index.with_reranker(judge).search_many(qs, k=3)
    for q, f, h in zip(qs, fused, hits):
        top = f[:judge.depth]  # depth 4 >= k: the first 4 fused candidates are judged, the rest never
        scores = judge.score([(q, f"{c.title}\n{c.text}") for c in top])
        order = sorted(range(len(top)), key=lambda i: (-scores[i], top[i].id))[:3]
        assert [x.id for x in h] == [top[i].id for i in order]
        assert [x.score for x in h] == pytest.approx([scores[i] for i in order], abs=1e-4)
        assert all(x.score_name == "judge" and x.stages["rrf"]["rank"] <= judge.depth for x in h)


def test_the_judge_comes_from_an_engine_with_a_model(tiny_model_dir, tmp_path):
    from tunelab.infer import load_engine
    from tunelab.infer.testing import FakeEngine

    engine = load_engine(str(tiny_model_dir), device="cpu")
    rr = load_reranker("judge", engine, depth=7)
    assert isinstance(rr, JudgeReranker) and rr.model is engine.model and rr.depth == 7
    assert rr.identity["kind"] == "judge"
    with pytest.raises(TunelabError, match="exposes no transformers model"):
        load_reranker("judge", FakeEngine())
    with pytest.raises(TunelabError, match="needs a loaded model"):
        load_reranker("judge")
    fake = FakeEngine()
    fake.model = engine.model
    fake.add_adapter("a", str(tmp_path))
    with pytest.raises(TunelabError, match="adapters loaded"):
        load_reranker("judge", fake)
    assert load_reranker(None) is None and load_reranker(rr) is rr


class HideGold:
    """A reranker that knows each question's gold passage and ranks it last."""

    name, depth = "hide-gold", None
    identity = {"kind": "test"}

    def __init__(self, gold: dict[str, str]):
        self.gold = gold

    def score(self, pairs):
        return [-1.0 if self.gold[q][:60] in p else 1.0 for q, p in pairs]


def test_the_rerank_rung_is_optional_and_puts_reranked_passages_in_the_prompt(tmp_path):
    """The rung is skipped unless asked for; asked for with a reranker that hides the gold passage, a model
    that answers only from it scores 0 there, and 1 on the plain hybrid rung: the reranked order is used."""
    from tunelab.infer.testing import FakeEngine
    from tunelab.ladder import run_ladder
    from tunelab.ladder.rungs import plan_rungs

    plan = plan_rungs(False, True, True)
    assert "hybrid+rerank" not in [r.name for r in plan.rungs] and "--rerank" in plan.skipped["hybrid+rerank"]
    assert "hybrid+rerank" in [r.name for r in plan_rungs(False, True, True, optional=True).rungs]
    assert [r.name for r in plan_rungs(False, True, True, ["hybrid+rerank"]).rungs] == ["hybrid+rerank"]

    task = load_task(TASK)
    exs = task.examples("test", limit=12)
    docs = {d["id"]: d["text"] for d in task.corpus()}
    by_q = {task.prompt(ex): ex for ex in exs}

    def respond(q):
        ex = next(e for p, e in by_q.items() if q.prompt[-1]["content"].endswith(p))
        return ex["answer"] if docs[ex["doc_id"]][:60] in q.prompt[-1]["content"] else "I do not know."

    hide = HideGold({p: docs[ex["doc_id"]] for p, ex in by_q.items()})
    res = run_ladder(TASK, out=tmp_path / "ladder", limit=12, engine=FakeEngine(respond), rungs=["prompt", "hybrid"],
                     rerank=hide)
    by = {r.name: r for r in res.results}
    assert list(by) == ["prompt", "hybrid", "hybrid+rerank"]
    assert by["hybrid"].score == 1.0 and by["hybrid+rerank"].score == 0.0
    assert res.recommendation.rung == "hybrid"
    meta = json.loads((tmp_path / "ladder" / "rungs" / "hybrid+rerank" / "metrics.json").read_text())
    assert meta["augment"]["reranker"] == {"name": "hide-gold", "kind": "test"}


def test_augment_records_the_reranker(small_index, judge):
    aug = retrieval_augment(small_index.with_reranker(judge), TASK, limit=2, k=2)
    assert aug.info["reranker"] == {"name": "judge", "kind": "judge", "model": "base", "depth": 4}
    assert "reranker" not in retrieval_augment(load_index(small_index.folder), TASK, limit=2, k=2).info
