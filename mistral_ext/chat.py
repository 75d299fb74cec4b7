"""Chat formatting: the Mistral instruct format for Mistral's sentencepiece tokenizers, otherwise the checkpoint's
own jinja2 chat template."""

from __future__ import annotations

from .tokenizer import Tokenizer

# Section 5.1 of the Mistral 7B paper; Mistral's API prepends it when asked for a safe prompt.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
               "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")


def system_messages(system: str | None = None, safe_prompt: bool = False) -> list[dict]:
    """The system part of a conversation: the paper's guardrail prompt when asked for, then `system`."""
    parts = [p for p in (SAFE_PROMPT if safe_prompt else None, system) if p]
    return [{"role": "system", "content": "\n\n".join(parts)}] if parts else []


def conversation(user: str, system: str | None = None, safe_prompt: bool = False) -> list[dict]:
    return system_messages(system, safe_prompt) + [{"role": "user", "content": user}]


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                m.get("content"), str):
            raise ValueError(f"each message must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")


def uses_mistral_format(model) -> bool:
    return model.chat_template is None and isinstance(model.tokenizer, Tokenizer)


def mistral_instruct_tokens(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """`<s>[INST] user [/INST] answer</s>[INST] user [/INST]`: BOS once, EOS after each answer. The system prompt
    goes before the first user message, separated by a blank line, as mistral_common's v1 tokenizer does."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    first_user = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("a conversation needs a user message")
    ids = [tokenizer.bos_id]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if system and i == first_user else m["content"]
            ids += tokenizer.encode(f"[INST] {content} [/INST]", bos=False)
        else:
            ids += tokenizer.encode(m["content"], bos=False) + [tokenizer.eos_ids[0]]
    return ids


def chat_tokens(model, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ending where the assistant's next answer starts."""
    _check_messages(messages)
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer")
    if uses_mistral_format(model):
        return mistral_instruct_tokens(model.tokenizer, messages)
    if model.chat_template is None:
        raise ValueError("this checkpoint has no chat template; use a raw prompt")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as HF renders chat templates
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    tok = model.tokenizer
    special = {"bos_token": tok.token_text(tok.bos_id) if tok.bos_id >= 0 else "",
               "eos_token": tok.token_text(tok.eos_ids[0]) if tok.eos_ids else ""}
    text = env.from_string(model.chat_template).render(messages=messages, add_generation_prompt=True, **special)
    return tok.encode(text, bos=False)
