"""Tokenising chat conversations: which tokens carry loss weight, truncation/drop accounting, speed."""

import copy
import time

import pytest

from tunelab.data import tokenize_chat, tokenize_dataset
from tunelab.errors import TunelabError

TWO_TURNS = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin, of course."},
]

# SmolLM2's template with the assistant reply (and its <|im_end|>) wrapped in a generation block
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def spans(ids, weights, tok, value):
    """Decoded runs of consecutive tokens whose weight == value."""
    runs, cur = [], []
    for i, w in zip(ids, weights):
        if w == value:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_two_turn_weights_by_hand(tokenizer):
    ex = tokenize_chat(tokenizer, TWO_TURNS, prompt_loss_weight=0.1, max_length=None)
    # same tokens as the template itself produces
    assert ex.input_ids == tokenizer.apply_chat_template(TWO_TURNS)["input_ids"]
    assert ex.weights[0] == 0.0 and set(ex.weights[1:]) == {0.1, 1.0}
    # weight 1.0: exactly the two replies, each with its closing <|im_end|>
    assert spans(ex.input_ids, ex.weights, tokenizer, 1.0) == ["Paris.<|im_end|>", "Berlin, of course.<|im_end|>"]
    # weight 0.1: everything else -- default system prompt, user turns, role headers, template newlines
    assert spans(ex.input_ids, ex.weights, tokenizer, 0.1) == [
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    n_resp = len(tokenizer("Paris.")["input_ids"]) + len(tokenizer("Berlin, of course.")["input_ids"]) + 2
    assert ex.weights.count(1.0) == n_resp


def test_zero_prompt_weight_masks_prompt(tokenizer):
    ex = tokenize_chat(tokenizer, TWO_TURNS, prompt_loss_weight=0.0, max_length=None)
    ref = tokenize_chat(tokenizer, TWO_TURNS, prompt_loss_weight=0.1, max_length=None)
    assert ex.input_ids == ref.input_ids
    assert ex.weights == [0.0 if w == 0.1 else w for w in ref.weights]


def test_explicit_system_and_reply_with_edge_whitespace(tokenizer):
    messages = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "x"},
                {"role": "assistant", "content": "\n {\"a\": 1}\n"}]
    ex = tokenize_chat(tokenizer, messages, prompt_loss_weight=0.5, max_length=None)
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    # the header's "\n" and the reply's leading "\n" would merge if tokenised together; pieces are
    # tokenised apart, so the prompt is exactly what the model sees at generation time
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)["input_ids"]
    assert ex.input_ids[:len(prompt)] == prompt and ex.weights[len(prompt)] == 1.0
    assert spans(ex.input_ids, ex.weights, tokenizer, 1.0) == ["\n {\"a\": 1}\n<|im_end|>"]
    assert "SmolLM" not in tokenizer.decode(ex.input_ids)  # no default system prompt added


def test_generation_tags_agree_with_incremental_rendering(tokenizer):
    tagged = copy.deepcopy(tokenizer)
    tagged.chat_template = GENERATION_TEMPLATE
    for plw in (0.0, 0.1):
        a = tokenize_chat(tagged, TWO_TURNS, plw, None)
        b = tokenize_chat(tokenizer, TWO_TURNS, plw, None)
        assert (a.input_ids, a.weights) == (b.input_ids, b.weights)


def test_non_incremental_template_is_a_clear_error(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{{ messages|length }} turns\n" + tokenizer.chat_template
    with pytest.raises(TunelabError, match="incrementally"):
        tokenize_chat(odd, TWO_TURNS, 0.1, None)
    with pytest.raises(TunelabError, match="system or user message"):
        tokenize_chat(tokenizer, TWO_TURNS[1:], 0.1, None)


def test_truncate_and_drop_counts(tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 100}]
    long_prompt = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "yo"}]
    rows = [short, long_reply, long_prompt, short]
    n_short = len(tokenize_chat(tokenizer, short, 0.1, None))
    max_length = n_short + 20

    examples, stats = tokenize_dataset(tokenizer, rows, 0.1, max_length)
    # long_reply is cut inside its reply; long_prompt loses its whole reply, so it is dropped
    assert [ex.index for ex in examples] == [0, 1, 3]
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_no_response, stats.dropped_too_long) == (4, 3, 1, 1, 0)
    assert len(examples[1]) == max_length and examples[1].truncated and examples[1].weights[-1] == 1.0
    assert stats.tokens == sum(len(ex) for ex in examples)
    assert stats.response_tokens == sum(w == 1.0 for ex in examples for w in ex.weights)
    assert "1 truncated" in stats.summary() and "no response" in stats.summary()

    examples, stats = tokenize_dataset(tokenizer, rows, 0.1, max_length, too_long="drop")
    assert [ex.index for ex in examples] == [0, 3]
    assert (stats.kept, stats.truncated, stats.dropped_too_long, stats.dropped_no_response) == (2, 0, 2, 0)
    assert tokenize_chat(tokenizer, long_reply, 0.1, max_length, too_long="drop") is None


def test_bad_arguments(tokenizer):
    with pytest.raises(TunelabError, match="prompt_loss_weight"):
        tokenize_chat(tokenizer, TWO_TURNS, 1.5, None)
    with pytest.raises(TunelabError, match="too_long"):
        tokenize_chat(tokenizer, TWO_TURNS, 0.1, 10, too_long="wrap")
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(TunelabError, match="no chat template"):
        tokenize_chat(bare, TWO_TURNS, 0.1, None)


def test_dataset_matches_single_and_is_fast(tokenizer):
    rows = [[{"role": "user", "content": f"Order {i}: {i % 7} apples and {i % 3} pears, ship to Oslo."},
             {"role": "assistant", "content": f'{{"apples": {i % 7}, "pears": {i % 3}, "city": "Oslo"}}'}]
            for i in range(1000)]
    t0 = time.perf_counter()
    examples, stats = tokenize_dataset(tokenizer, rows, 0.1, 512)
    seconds = time.perf_counter() - t0
    assert stats.kept == 1000 and seconds < 5.0, seconds
    one = tokenize_chat(tokenizer, rows[123], 0.1, 512)
    assert (examples[123].input_ids, examples[123].weights) == (one.input_ids, one.weights)


def test_template_exceptions_become_tunelab_errors(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages|length > 2 and messages[1]['role'] == messages[2]['role'] %}"
                            "{{ raise_exception('roles must alternate') }}{% endif %}" + tokenizer.chat_template)
    rows = [TWO_TURNS, [TWO_TURNS[0], TWO_TURNS[1], TWO_TURNS[1]]]
    with pytest.raises(TunelabError, match="conversation 1: .*roles must alternate"):
        tokenize_dataset(strict, rows, 0.1, None)
