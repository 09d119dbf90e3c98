"""Each tiny model family's chat markup (orchestrator/tiny_model.py CHATS): prompt ids plus
response ids are the template's rendering of the whole conversation, the response ending as
the template ends an assistant turn, and the generation config lists every token that ends
a reply."""
from __future__ import annotations

import json

import pytest

from orchestrator.data import Tokenize
from orchestrator.tiny_model import ARCHS, CHATS, arch_config, build_model, stop_ids

pytestmark = pytest.mark.unit

# what each family's markup writes after a reply's text
TURN_END = {"llama": "<|end|>", "qwen2": "<|im_end|>\n", "mistral": "</s>",
            "gemma": "<end_of_turn>\n", "gpt_neox": "<|end|>"}


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request):
    arch = request.param
    _, tokenizer = arch_config(arch, "tiny")
    return arch, tokenizer


def test_prompt_and_response_ids_are_the_templates_rendering(family):
    arch, tok = family
    t = Tokenize(tok)
    assert t.turn_end == TURN_END[arch]
    messages = [{"role": "user", "content": "pick a color"}]
    reply = "the blue one, surely"
    _, prompt = t.prompt(messages)
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                    tokenize=False)
    assert prompt + t.response(reply) == t.ids(whole), arch
    # the reply's tokens are followed by the token that stops generation
    stops = set(stop_ids(tok, ARCHS[arch][2]))
    response = t.response(reply)
    first_stop = next(i for i, x in enumerate(response) if x in stops)
    assert tok.decode(response[:first_stop]) == reply, arch


def test_conversation_segments_are_the_templates_rendering(family):
    arch, tok = family
    t = Tokenize(tok)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "and now"}, {"role": "assistant", "content": "bye"}]
    segments = t.conversation(messages, "messages")
    assert sum(segments, []) == t.ids(tok.apply_chat_template(messages, tokenize=False)), arch
    assert segments[1] == t.response("hi there") and segments[3] == t.response("bye")


def test_generation_config_lists_every_token_that_ends_a_reply(tmp_path):
    model = build_model(tmp_path / "gemma", "tiny", arch="gemma")
    gen = json.loads((model / "generation_config.json").read_text())
    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<eos>"
    vocab = {t["content"]: t["id"] for t in json.loads(
        (model / "tokenizer.json").read_text())["added_tokens"]}
    assert sorted(gen["eos_token_id"]) == sorted(vocab[t] for t in CHATS["gemma"].stops)
