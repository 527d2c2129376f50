"""The ``hf`` tokenizer's model facts, chat templates and logprob token texts, against
transformers' own tokenizer for SmolLM2's GGUF and a SentencePiece-style tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flowserve_core.interfaces import ChatMessage, Tokenizer
from flowserve_core.types import DeploymentSpec
from flowserve_hf_tokenizer.loading import LoadedTokenizer, ModelFacts
from flowserve_hf_tokenizer.testing import WIDE_CHARACTERS as WIDE, build_llama_style_tokenizer
from flowserve_hf_tokenizer.tokenizer import HFTokenizer, build_hf_tokenizer

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
contents = st.lists(st.sampled_from(list("ab ,\n{}%'\"") + ["Hello", "<|im_end|>", "{{ x }}"] + WIDE),
                    max_size=12).map("".join)
conversations = st.tuples(
    st.booleans(), contents,
    st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), contents), min_size=1, max_size=4))


def test_smollm2_facts_come_from_its_gguf(smollm2):
    assert isinstance(smollm2, Tokenizer)
    assert smollm2.eos_token_ids == [2]
    assert smollm2.hf_tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert smollm2.max_model_len == 8192
    assert smollm2.vocab_size == 49152


def test_a_deployment_max_model_len_overrides_the_model(smollm2):
    loaded = LoadedTokenizer(tokenizer=smollm2.hf_tokenizer, facts=ModelFacts(context_length=8192), model="m")
    assert HFTokenizer(loaded, DeploymentSpec(max_model_len=1024)).max_model_len == 1024
    loaded = LoadedTokenizer(tokenizer=smollm2.hf_tokenizer, facts=ModelFacts(), model="m")
    assert HFTokenizer(loaded, DeploymentSpec()).max_model_len is None


def test_a_model_directory_gives_eos_ids_and_context_length_from_its_configs(llama_style, tmp_path):
    assert llama_style.eos_token_ids == [2, 5]  # tokenizer's </s>, then generation_config's
    assert llama_style.max_model_len == 512
    bare = build_llama_style_tokenizer(tmp_path / "bare", max_position_embeddings=None)
    assert build_hf_tokenizer(DeploymentSpec(model=str(bare))).max_model_len is None


def test_the_cached_smollm2_tokenizer_equals_the_one_transformers_reads_from_the_gguf(smollm2, smollm2_cold):
    assert smollm2.hf_tokenizer.name_or_path != smollm2_cold.hf_tokenizer.name_or_path  # really reloaded
    assert smollm2.hf_tokenizer.get_vocab() == smollm2_cold.hf_tokenizer.get_vocab()
    text = "Hello, world! naïve 世界 🙂 <|im_start|>user\n  spaces\t"
    assert smollm2.encode(text) == smollm2_cold.hf_tokenizer.encode(text)
    assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text
    assert (smollm2.eos_token_ids, smollm2.max_model_len) == (smollm2_cold.eos_token_ids, smollm2_cold.max_model_len)


def test_smollm2_chat_prompt_is_ready_for_the_assistant(smollm2):
    ids = smollm2.apply_chat_template([ChatMessage(role="user", content="What is 2+2?")])
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    with_system = smollm2.apply_chat_template([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}])
    assert smollm2.decode(with_system, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations, add_generation_prompt=st.booleans())
def test_chat_template_matches_transformers_for_smollm2(smollm2, smollm2_cold, conversation, add_generation_prompt):
    with_system, system, turns = conversation
    messages = ([ChatMessage(role="system", content=system)] if with_system else []) + \
        [ChatMessage(role=role, content=content) for role, content in turns]
    ours = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    # Contents may hold <|im_end|>: transformers' sanitized rendering encodes it as text (issue 20)
    theirs = smollm2_cold.hf_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, sanitize_control_tokens=True)
    assert ours == list(theirs)


def test_a_model_without_a_chat_template_says_so(llama_style):
    with pytest.raises(ValueError, match="has no chat template.*completions API.*chat_template"):
        llama_style.apply_chat_template([ChatMessage(role="user", content="hi")])


def test_a_chat_template_can_be_given_as_a_deployment_option(llama_style_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer = build_hf_tokenizer(DeploymentSpec(model=str(llama_style_dir), options={"chat_template": str(template)}))
    ids = tokenizer.apply_chat_template([ChatMessage(role="user", content="hello world")])
    assert tokenizer.decode(ids) == "[user] hello world\n[assistant]"
    with pytest.raises(ValueError, match="chat_template='/no/such.jinja'"):
        build_hf_tokenizer(DeploymentSpec(model=str(llama_style_dir), options={"chat_template": "/no/such.jinja"}))


def test_a_template_that_refuses_the_conversation_gives_a_value_error(llama_style_dir):
    refusing = "{% if messages[0].role != 'user' %}{{ raise_exception('the first turn must be the user') }}{% endif %}"
    tokenizer = build_hf_tokenizer(DeploymentSpec(model=str(llama_style_dir), options={"chat_template": refusing}))
    with pytest.raises(ValueError, match="refused the messages: the first turn must be the user"):
        tokenizer.apply_chat_template([ChatMessage(role="assistant", content="hi")])
    with pytest.raises(ValueError, match="at least one message"):
        tokenizer.apply_chat_template([])


def test_token_text_shows_tokens_as_openai_logprobs_do(smollm2, llama_style):
    pieces = smollm2.encode("Hello world 世", add_special_tokens=False)
    texts = [smollm2.token_text(i) for i in pieces]
    assert texts == ["Hello", " world", " ", "bytes:\\xe4\\xb8", "bytes:\\x96"]  # 世 is two byte pieces
    assert smollm2.token_text(2) == "<|im_end|>"
    # SentencePiece drops a leading space when a token is decoded alone; logprobs keep it.
    assert llama_style.token_text(llama_style.encode("world", add_special_tokens=False)[0]).startswith(" ")


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.sampled_from(list("ab ,.\n") + WIDE), max_size=15).map("".join))
def test_token_bytes_concatenate_to_the_text(smollm2, llama_style, text):
    assert b"".join(smollm2.token_bytes(i) for i in smollm2.encode(text, add_special_tokens=False)) == text.encode()
    # SentencePiece encodes a leading "▁": mid-text that token reads as a space.
    pieces = llama_style.encode(text, add_special_tokens=False)
    assert b"".join(llama_style.token_bytes(i) for i in pieces) == (" " + text if text else "").encode()


# Gemma's chat template (as its checkpoints ship it, in chat_template.jinja): no system role, so
# a system message becomes the first user turn's prefix; "assistant" is "model"; BOS comes
# from the template, not from tokenizing.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages "
    "= messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % "
    "2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = "
    "message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\\n' }}{% endif %}")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_checkpoints_own_template_file_renders_as_transformers_renders_it(llama_style_dir, tmp_path,
                                                                               add_generation_prompt):
    """chat_template.jinja in the model directory is the template (transformers reads it so);
    Gemma's system-role quirk and BOS handling come out exactly as transformers has them."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "gemma-like"
    shutil.copytree(llama_style_dir, model)
    (model / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    ours = build_hf_tokenizer(DeploymentSpec(model=str(model)))
    ids = ours.apply_chat_template([ChatMessage(**m) for m in conversation], add_generation_prompt=add_generation_prompt)
    reference = AutoTokenizer.from_pretrained(str(model)).apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    assert ids == list(reference)
    text = ours.decode(ids, skip_special_tokens=False)
    assert text.count("<s>") == 1 and "system" not in text.replace("Answer", "")  # no system turn, one BOS
    assert "<start_of_turn>user\nAnswer briefly.\n\nHi there<end_of_turn>" in text
    assert text.endswith("<start_of_turn>model\n") == add_generation_prompt
