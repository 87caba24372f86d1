"""Prompt-to-prompt token alignment (Hertz et al. 2022), as FateZero's cross-attention fusion uses it.

A cross-attention map has one column per text token. To reuse the source prompt's maps under the
target prompt, every target token needs the source token(s) it stands for:

* Refine (p2p `get_refinement_mapper`, FateZero `is_replace_controller: False`): a global alignment of
  the two token sequences; a target token aligned to a source token reads that token's map, a new
  token (alpha 0) keeps its own.
* Replace (p2p `get_replacement_mapper`): prompts with the same number of words, word i <-> word i;
  a (source, target) matrix, `new = source_maps @ matrix`.
* Equalizer (p2p `get_equalizer`): a per-token multiplier on the maps of chosen target words.

Positions count from the start token (position 0) up to `length` (the text encoder's 77), as the
prompt embeddings are laid out. A tokenizer is anything with the Hugging Face call
`tokenizer(text, truncation=True, max_length=n).input_ids` and `tokenizer.encode(word,
add_special_tokens=False)`: CLIP's BPE, the builtin tiny byte-level one, or a word-level one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# p2p's ScoreParams(gap=0, match=1, mismatch=-1) for the token alignment.
GAP, MATCH, MISMATCH = 0, 1, -1
LEFT, UP, DIAG = 1, 2, 3  # traceback moves: a target-only token, a source-only token, a pair


# --- tokens and words --------------------------------------------------------------------------

def token_ids(tokenizer, text: str, length: int) -> list[int]:
    """The ids the text encoder sees (start and end tokens included, cut at `length`), unpadded."""
    return list(tokenizer(text, truncation=True, max_length=length).input_ids)


def word_groups(tokenizer, text: str, length: int) -> list[list[int]]:
    """For each whitespace-separated word of `text`, the positions of its tokens.

    Each word is tokenized alone (BPE never merges across spaces), which gives the same tokens as in
    context; words cut off by the length limit get the positions that remain (possibly none).
    """
    ids = token_ids(tokenizer, text, length)
    groups, position = [], 1
    pieces = []
    for word in text.split():
        word_ids = list(tokenizer.encode(word, add_special_tokens=False))
        pieces += word_ids
        groups.append([p for p in range(position, position + len(word_ids)) if p < len(ids) - 1])
        position += len(word_ids)
    if pieces[: len(ids) - 2] != ids[1:-1]:
        raise ValueError(f"cannot tell which tokens belong to which word of {text!r} with this tokenizer")
    return groups


def word_positions(tokenizer, text: str, words: Sequence[str], length: int) -> list[int]:
    """Token positions of every occurrence of each of `words` in `text` (p2p `get_word_inds`)."""
    if not words:
        return []
    split = [w.lower() for w in text.split()]
    groups = word_groups(tokenizer, text, length)
    positions = []
    for word in words:
        hits = [i for i, w in enumerate(split) if w == word.lower()]
        if not hits:
            raise ValueError(f"the word {word!r} is not in the prompt {text!r}; give words exactly as they appear there")
        positions += [p for i in hits for p in groups[i]]
    return sorted(set(positions))


# --- refine: global alignment --------------------------------------------------------------------

def align(source: Sequence, target: Sequence) -> list[int]:
    """Needleman-Wunsch alignment (gap 0, match 1, mismatch -1; ties prefer a target-only step, then a
    source-only one, as p2p's `global_align`): for each target item, its source index or -1."""
    n, m = len(source), len(target)
    score = np.zeros((n + 1, m + 1))
    move = np.zeros((n + 1, m + 1), dtype=np.int8)
    move[0, 1:], move[1:, 0] = LEFT, UP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1] + GAP, score[i - 1, j] + GAP
            diag = score[i - 1, j - 1] + (MATCH if source[i - 1] == target[j - 1] else MISMATCH)
            score[i, j] = max(left, up, diag)
            move[i, j] = LEFT if score[i, j] == left else UP if score[i, j] == up else DIAG
    mapped = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == DIAG:
            i, j = i - 1, j - 1
            mapped[j] = i
        elif move[i, j] == LEFT:
            j -= 1
        else:
            i -= 1
    return mapped


def refine_mapper(source_ids: Sequence[int], target_ids: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas), both of size `length`: target position j reads source position mapper[j] where
    alphas[j] == 1; alphas[j] == 0 marks a token new in the target, which keeps its own map.

    Padding after the end token pairs with the source's padding in order. (p2p pairs it by absolute
    position, which for prompts of different lengths reads a source word's map into a padding slot.)
    """
    mapped = align(source_ids, target_ids)
    mapper = torch.zeros(length, dtype=torch.long)
    alphas = torch.ones(length)
    for j, i in enumerate(mapped[:length]):
        mapper[j], alphas[j] = max(i, 0), float(i >= 0)
    for j in range(len(target_ids), length):
        mapper[j] = min(len(source_ids) + j - len(target_ids), length - 1)
    return mapper, alphas


# --- replace: word-for-word matrix ----------------------------------------------------------------

def replace_mapper(source_groups: Sequence[Sequence[int]], target_groups: Sequence[Sequence[int]],
                   source_len: int, target_len: int, length: int) -> torch.Tensor:
    """(length, length) matrix, source position x target position, with `new = maps @ matrix`.

    Word k of the source maps onto word k of the target token by token; where the two words split
    into different numbers of tokens, each target token gets the source word's maps / its token count
    (p2p's ratio, which keeps the word's total attention). The start token, the end token and the
    padding pair up in order.
    """
    if len(source_groups) != len(target_groups):
        raise ValueError(f"replace needs source and target prompts with the same number of words "
                         f"({len(source_groups)} vs {len(target_groups)}); use refine")
    matrix = torch.zeros(length, length)
    matrix[0, 0] = 1.0
    for src, tgt in zip(source_groups, target_groups):
        if len(src) == len(tgt):
            matrix[list(src), list(tgt)] = 1.0
        elif src and tgt:
            for t in tgt:
                matrix[list(src), t] = 1.0 / len(tgt)
    for j in range(target_len - 1, length):  # end token and padding
        matrix[min(source_len - 1 + j - (target_len - 1), length - 1), j] = 1.0
    return matrix


# --- equalizer -------------------------------------------------------------------------------------

def equalizer(length: int, positions: Sequence[Sequence[int]], values: Sequence[float]) -> torch.Tensor:
    """A (length,) multiplier: 1 everywhere, values[k] at the positions of word k."""
    if len(positions) != len(values):
        raise ValueError(f"the equalizer needs one value per word ({len(positions)} words, {len(values)} values)")
    scale = torch.ones(length)
    for where, value in zip(positions, values):
        scale[list(where)] = float(value)
    return scale


# --- from prompts ----------------------------------------------------------------------------------

def refinement(tokenizer, source: str, target: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return refine_mapper(token_ids(tokenizer, source, length), token_ids(tokenizer, target, length), length)


def replacement(tokenizer, source: str, target: str, length: int) -> torch.Tensor:
    return replace_mapper(word_groups(tokenizer, source, length), word_groups(tokenizer, target, length),
                          len(token_ids(tokenizer, source, length)), len(token_ids(tokenizer, target, length)),
                          length)


def word_equalizer(tokenizer, text: str, words: Sequence[str], values: Sequence[float], length: int) -> torch.Tensor:
    return equalizer(length, [word_positions(tokenizer, text, [w], length) for w in words], values)
