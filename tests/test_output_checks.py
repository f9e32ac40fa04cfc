"""Output checks (tunelab.ops.checks): keys.yaml's `checks:` validated with the field and the fix; regex, word
lists, the refusal detector and a judge flag or block; in the server, through the official `openai` SDK, a
blocked answer comes back as OpenAI's content filter does (finish_reason "content_filter", no content) and a
flagged one is logged with the check's name."""

import json

import httpx2 as httpx
import pytest

from tunelab.errors import TunelabError
from tunelab.ops.checks import CheckSpec, compile_checks, run_checks
from tunelab.server.auth import Keys, hash_key

ACME, OTHER = "sk-acme", "sk-other"
CARD = r'\b(?:\d[ -]?){13,16}\b'


def keys_file(tmp_path, checks: str) -> Keys:
    path = tmp_path / "keys.yaml"
    path.write_text(f"tenants:\n  acme:\n    key_sha256: [{hash_key(ACME)}]\n    checks:\n{checks}")
    return Keys.load(path)


def test_each_kind_of_check_flags_or_blocks():
    checks = compile_checks([CheckSpec(name="card", regex=CARD, action="block"),
                             CheckSpec(name="rivals", words=["RivalCo", "cheap mart"]),
                             CheckSpec(refusal=True)])
    assert [c.name for c in checks] == ["card", "rivals", "refusal"]
    r = run_checks(checks, "Saved card 4111 1111 1111 1111; rivalco is cheaper.")
    assert r.flags == ["card", "rivals"] and r.blocked and r.blocked_by == "card" and "card" in r.message()
    assert run_checks(checks, "Try Cheap   Mart next door").flags == ["rivals"]  # any case, any spacing
    assert run_checks(checks, "rivalcoin and cheap marts are fine").flags == []  # whole words only
    r = run_checks(checks, "I'm sorry, but I can't help with that.")
    assert r.flags == ["refusal"] and not r.blocked  # action defaults to flag
    assert run_checks(checks, "order 12 items").flags == []


def test_a_judge_sees_the_answer_and_the_prompt_and_a_broken_judge_never_blocks():
    seen = []

    def judge(spec, messages):
        seen.append(messages[0]["content"])
        return "Yes, it is." if "idiot" in messages[0]["content"] else "no"

    checks = compile_checks([CheckSpec(name="rude", action="block", judge={
        "prompt": "Q: {prompt}\nA: {answer}\nIs the answer rude? yes or no"})])
    r = run_checks(checks, "Only an idiot asks that.", prompt="How do I reset it?", judge=judge)
    assert r.blocked and r.flags == ["rude"]
    assert seen[0] == "Q: How do I reset it?\nA: Only an idiot asks that.\nIs the answer rude? yes or no"
    assert not run_checks(checks, "Press the button.", prompt="How?", judge=judge).flags

    def broken(spec, messages):
        raise TimeoutError("judge too slow")

    r = run_checks(checks, "Only an idiot asks that.", judge=broken)
    assert r.flags == ["rude:error"] and not r.blocked


def test_a_judge_on_a_given_local_model_is_loaded_once_and_asked(tiny_model_dir):
    """judge.model: a separate local model (here a tiny random Llama) loaded on first use; `flag_if` is matched
    on what it replies (an empty regex always matches: the judge ran without an error)."""
    from tunelab.ops.checks import LOCAL_JUDGES

    checks = compile_checks([CheckSpec(name="j", judge={"prompt": "Rude? {answer}", "model": str(tiny_model_dir),
                                                         "flag_if": "", "max_tokens": 3})])
    assert run_checks(checks, "fine", judge=LOCAL_JUDGES).flags == ["j"]
    assert run_checks(checks, "fine again", judge=LOCAL_JUDGES).flags == ["j"]
    assert list(LOCAL_JUDGES._engines) == [str(tiny_model_dir)]


@pytest.mark.parametrize("checks, says", [
    ("      - {regex: '(unclosed', action: block}\n", "tenants.acme.checks.0.regex: '(unclosed' is not a valid "
                                                       "regular expression"),
    ("      - {regex: 'x', words: [y]}\n", "tenants.acme.checks.0: give exactly one of regex, words, refusal"),
    ("      - {action: block}\n", "give exactly one of regex, words, refusal: true, judge (got none)"),
    ("      - {regex: 'x', action: stop}\n", "tenants.acme.checks.0.action: Input should be 'flag' or 'block'"),
    ("      - {judge: {prompt: 'rude?'}}\n", "tenants.acme.checks.0.judge.prompt: the judge prompt must contain "
                                            "{answer}"),
    ("      - {regex: 'x'}\n      - {regex: 'y'}\n", "two checks are named 'regex'"),
    ("      - {regex: 'x', name: 'a b'}\n", "name 'a b': letters, digits"),
    ("      - {refusal: true, blocks: true}\n", "unknown key 'tenants.acme.checks.0.blocks'"),
])
def test_a_bad_checks_entry_names_the_file_the_field_and_the_fix(tmp_path, checks, says):
    with pytest.raises(TunelabError) as e:
        keys_file(tmp_path, checks)
    assert str(e.value).startswith(str(tmp_path / "keys.yaml")) and says in str(e.value)


def test_keys_yaml_compiles_a_tenants_checks(tmp_path):
    keys = keys_file(tmp_path, f"      - {{name: card, regex: '{CARD}', action: block}}\n      - {{refusal: true}}\n")
    acme = keys.tenant(f"Bearer {ACME}")
    assert [c.name for c in acme.checks] == ["card", "refusal"] and acme.checks[0].blocks


# --- in the server, through the openai SDK -----------------------------------------------------------------------
def respond(q) -> str:
    """Echo the last user message; as a judge, say "yes" when the answer it judges is rude."""
    text = q.prompt if isinstance(q.prompt, str) else q.prompt[-1]["content"]
    if text.startswith("JUDGE"):
        return "yes" if "idiot" in text else "no"
    return text


@pytest.fixture()
def served(tmp_path, tokenizer):
    openai = pytest.importorskip("openai")
    from conftest import Server

    from tunelab.infer.testing import FakeEngine
    from tunelab.ops.requestlog import RequestLog
    from tunelab.server import ServeService

    (tmp_path / "keys.yaml").write_text(f"""tenants:
  acme:
    key_sha256: [{hash_key(ACME)}]
    log: content
    checks:
      - {{name: card, regex: '{CARD}', action: block}}
      - {{name: rivals, words: [rivalco]}}
      - {{name: rude, judge: {{prompt: "JUDGE is this rude? {{answer}}"}}}}
  other: {{key_sha256: [{hash_key(OTHER)}]}}
""")
    log = RequestLog.open(tmp_path / "requests.sqlite")
    srv = Server(ServeService(FakeEngine(respond, tokenizer=tokenizer), "fake", keys=Keys.load(tmp_path / "keys.yaml"),
                              request_log=RequestLog.open(tmp_path / "requests.sqlite")))
    yield srv, log, openai
    srv.stop()
    log.close()


def ask(srv, key, text, **kw):
    return srv.client(key).chat.completions.create(model="fake", messages=[{"role": "user", "content": text}], **kw)


def test_a_blocked_answer_is_a_content_filter_finish_and_is_logged_blocked(served):
    srv, log, _ = served
    r = ask(srv, ACME, "my card is 4111 1111 1111 1111")
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content is None
    assert "card" in choice.message.refusal
    row = next(x for x in log.rows(tenant="acme") if x.response_id == r.id)
    assert row.outcome == "blocked" and row.flags == ["card"]
    # another tenant's checks are its own: the same answer passes
    assert ask(srv, OTHER, "my card is 4111 1111 1111 1111").choices[0].finish_reason == "stop"
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'tunelab_output_check_hits_total{action="block",check="card",tenant="acme"} 1.0' in metrics


def test_a_flagged_answer_is_returned_and_logged_with_the_flag(served):
    srv, log, _ = served
    r = ask(srv, ACME, "ask rivalco instead")
    assert r.choices[0].message.content == "ask rivalco instead" and r.choices[0].finish_reason == "stop"
    rude = ask(srv, ACME, "only an idiot asks")  # the judge runs on the served engine
    assert rude.choices[0].message.content == "only an idiot asks"
    rows = {x.response_id: x for x in log.rows(tenant="acme")}
    assert rows[r.id].flags == ["rivals"] and rows[r.id].outcome == "ok"
    assert rows[rude.id].flags == ["rude"]
    assert json.loads(rows[r.id].prompt)[-1]["content"] == "ask rivalco instead"


def test_a_streamed_answer_is_held_until_the_checks_pass(served):
    srv, log, _ = served
    chunks = list(ask(srv, ACME, "card 4111 1111 1111 1111 ok", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert "4111" not in text and reasons == ["content_filter"]
    ok = list(ask(srv, ACME, "three items please", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in ok if c.choices) == "three items please"
    rows = log.rows(tenant="acme")
    assert [x.outcome for x in rows] == ["blocked", "ok"] and rows[0].flags == ["card"]
