"""Self-reflection moderation (Mistral 7B paper, section 5.2): the model itself classifies a prompt or an answer
as acceptable or as one of three categories.

The paper does not print its prompt; this is ours (PROMPT). The label is scored, not generated: each label's
log-likelihood as the model's answer to the prompt, normalised over the labels (a softmax), so the scores are
deterministic and sum to 1. The paper measured Mistral 7B Instruct (99.4% precision, 95.6% recall on its own set);
a small model such as the default 135M one follows the mechanism but is far too small to moderate well.
"""

from __future__ import annotations

import torch

from .chat import chat_tokens
from .engine import Model

CATEGORIES = {
    "illegal": "illegal activities (terrorism, child abuse, fraud)",
    "hateful": "hateful, harassing or violent content (discrimination, self-harm, bullying)",
    "unqualified_advice": "unqualified advice (legal, medical, financial)",
}
LABELS = {"acceptable": "acceptable", "illegal": "illegal", "hateful": "hateful", "unqualified_advice": "advice"}

PROMPT = ("You are a content moderator. Classify the {role} below into exactly one category:\n"
          "- acceptable: none of the following\n"
          "- illegal: " + CATEGORIES["illegal"] + "\n"
          "- hateful: " + CATEGORIES["hateful"] + "\n"
          "- advice: " + CATEGORIES["unqualified_advice"] + "\n"
          "Answer with the category's name only.\n\n{content}")
ROLES = {"user": "user's message", "assistant": "assistant's answer", "system": "system message"}


def moderate(model: Model, text_or_conversation: str | list[dict]) -> dict:
    """{"flagged", "categories", "category_scores"} for a text, or for the last turn of a conversation (a list of
    {"role", "content"} messages: the earlier turns are not classified). category_scores hold every label's
    probability, "acceptable" included (they sum to 1); flagged when a category outscores "acceptable" and all
    others, which then is the one category set in `categories`."""
    if not isinstance(model, Model):
        raise TypeError(f"moderate needs a mistral_ext Model, got {type(model).__name__}")
    if isinstance(text_or_conversation, str):
        role, content = "user", text_or_conversation
    elif isinstance(text_or_conversation, list) and text_or_conversation:
        last = text_or_conversation[-1]
        if not isinstance(last, dict) or last.get("role") not in ROLES or not isinstance(last.get("content"), str):
            raise ValueError(f"the last message must be {{'role': user|assistant|system, 'content': str}}, got "
                             f"{last!r}")
        role, content = last["role"], last["content"]
    else:
        raise ValueError("moderate takes a str or a non-empty list of messages")
    prompt = chat_tokens(model, [{"role": "user", "content": PROMPT.format(role=ROLES[role], content=content)}])
    scores = torch.stack([_log_likelihood(model, prompt, model.tokenizer.encode(label, bos=False))
                          for label in LABELS.values()]).softmax(0)
    category_scores = {name: float(s) for name, s in zip(LABELS, scores)}
    best = max(category_scores, key=category_scores.get)
    return {"flagged": best != "acceptable", "categories": {c: c == best for c in CATEGORIES},
            "category_scores": category_scores}


def _log_likelihood(model: Model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log P(answer | prompt): the sum of each answer token's log-probability, in float64."""
    logits = model.forward(torch.tensor([prompt + answer]))[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum()
