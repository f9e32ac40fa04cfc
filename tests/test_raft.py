"""Retrieval-aware training rows (RAFT): the prompt is the one the RAG rungs use, the gold passage is there
in all but the `no_gold` share, and the files are whole."""

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.rag import build_index, retrieval_augment
from tunelab.rag.raft import raft_data, raft_rows
from tunelab.tasks import load_task

TASK = load_task("handbook-qa")


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    return build_index("handbook-qa", tmp_path_factory.mktemp("raft") / "idx", kind="bm25")


def _titles(user_turn: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in user_turn.splitlines() if line.startswith("[")]


def test_rows_carry_the_gold_passage_except_the_no_gold_share(bm25):
    rows, info = raft_rows(bm25, TASK, "train", k=3, no_gold=0.25, seed=1, limit=200)
    docs = {d["id"]: d for d in TASK.corpus()}
    examples = TASK.examples("train", limit=200)
    assert len(rows) == 200 and info["rows"] == 200
    without = 0
    for ex, row in zip(examples, rows):
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert msgs[-1]["content"] == TASK.reference(ex)
        assert msgs[1]["content"].endswith(ex["question"])
        titles = _titles(msgs[1]["content"])  # BM25 returns only passages sharing a word with the question
        assert len(titles) <= 3 and msgs[1]["content"].startswith("Context:\n[1] " if titles else ex["question"])
        gold_title = docs[ex["doc_id"]]["title"]
        assert (gold_title in titles) == row["meta"]["gold_in_context"]
        without += not row["meta"]["gold_in_context"]
    assert 0.15 <= without / 200 <= 0.35  # 25% asked, seeded
    assert info["gold_in_context"] == pytest.approx(1 - without / 200)


def test_gold_rows_read_like_the_rag_rung_prompt(bm25):
    """Where the retriever ranked the gold passage in the top k, the training prompt is exactly the one the
    RAG rung builds at answer time (same index, same k, same template)."""
    rows, _ = raft_rows(bm25, TASK, "train", k=3, no_gold=0.0, limit=40)
    examples = TASK.examples("train", limit=40)
    augment = retrieval_augment(bm25, TASK, "train", 40, 3)
    same = sum(augment(ex, TASK.messages(ex)) == row["messages"][:-1] for ex, row in zip(examples, rows))
    assert same >= 30  # the rest had the gold passage moved up into the top k
    assert all(row["meta"]["gold_in_context"] for row in rows)


def test_raft_data_writes_train_and_validation_jsonl(bm25, tmp_path):
    d = raft_data(bm25, TASK, tmp_path / "raft", k=2, no_gold=0.2, limit_train=30)
    train = [json.loads(line) for line in d.train.read_text().splitlines()]
    assert len(train) == 30 and len(d.validation.read_text().splitlines()) == len(TASK.examples("validation"))
    assert json.loads((tmp_path / "raft" / "raft.json").read_text())["train"]["rows"] == 30
    assert not list((tmp_path / "raft").glob(".*tmp"))


def test_a_bad_share_and_a_task_without_gold_ids_are_refused(bm25):
    with pytest.raises(TunelabError, match="no_gold"):
        raft_rows(bm25, TASK, no_gold=1.0)
    with pytest.raises(TunelabError, match="doc_id"):
        raft_rows(bm25, load_task("orders-json"), limit=3)


def test_tunelab_train_with_data_rag_trains_on_retrieved_passages(tunelab, bm25, tiny_model_dir, tmp_path):
    import yaml

    from tunelab.config.recipe import load_recipe
    from tunelab.train import train

    out = tmp_path / "raft-lora"
    args = [f"model.spec={tiny_model_dir}", "data.task=handbook-qa", f"data.rag={bm25.folder.parent}",
            "data.rag_k=2", "data.limit_train=24", "data.limit_validation=4", "train.max_steps=1",
            "train.batch_size=2", "train.effective_batch=2", "checkpoint_every=null", f"output_dir={out}"]
    with pytest.raises(TunelabError, match="data.rag="):  # the library's train alone does not retrieve
        train(load_recipe(None, args))
    code, stdout, stderr = tunelab("train", *args)
    assert code == 0, stderr
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())["data"]
    assert recorded["rag"] == str(bm25.folder.parent) and recorded["train"] == str(out / "raft-data" / "train.jsonl")
    rows = [json.loads(line) for line in (out / "raft-data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and sum("Context:\n[1] " in r["messages"][1]["content"] for r in rows) >= 18
    with pytest.raises(TunelabError, match="data.mix"):
        load_recipe(None, ["data.mix=[{task: handbook-qa, weight: 1}]", f"data.rag={bm25.folder}"])
