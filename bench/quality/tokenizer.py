"""Byte-level BPE tokenizer + ChatML template for SmolLM2, read from GGUF metadata.

Pure Python (plus the ``regex`` package for ``\\p{L}`` / ``\\p{N}`` classes).

Pre-tokenization follows llama.cpp's ``smollm`` pre-tokenizer (identical to the
HF tokenizer.json of SmolLM2: ``Digits(individual_digits=True)`` followed by the
GPT-2 ``ByteLevel`` regex):

  1. split the text at control/special tokens (``<|im_start|>`` ...), which
     map to their single id when ``allow_special`` is true;
  2. isolate every ``\\p{N}`` character;
  3. split the rest with the GPT-2 regex;
  4. byte-level BPE inside each piece, merges ranked by their order in
     ``tokenizer.ggml.merges``.

Every token knows the character span of the input that produced it, so
``encode_parts`` can report exact [start, end) token ranges per named part of
a prompt while the token sequence stays *identical* to encoding the whole
concatenated string.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex

# GPT-2 pre-tokenizer regex (HF ByteLevel variant, i.e. with the trailing \s+
# alternative; llama.cpp keeps unmatched whitespace as its own piece, which is
# the same thing).
_GPT2_PAT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_DIGIT_PAT = regex.compile(r"\p{N}")

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {v: k for k, v in BYTE_ENCODER.items()}


@dataclass
class PartsEncoding:
    ids: List[int]
    spans: Dict[str, Tuple[int, int]]  # part name -> [start, end) token range
    text: str


class Tokenizer:
    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        bos_id: int,
        eos_id: int,
        chat_template: Optional[str] = None,
        pre: str = "smollm",
    ):
        if pre not in ("smollm", "gpt2"):
            raise ValueError(f"unsupported pre-tokenizer {pre!r}")
        self.pre = pre
        self.tokens = list(tokens)
        self.token_types = list(int(t) for t in token_types)
        self.vocab: Dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            a, b = m.split(" ")
            self.bpe_ranks[(a, b)] = rank
        self.bos_id = int(bos_id)
        self.eos_id = int(eos_id)
        self.chat_template = chat_template
        self.special: Dict[str, int] = {
            t: i
            for i, t in enumerate(self.tokens)
            if self.token_types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        }
        # Longest first so that overlapping special strings resolve greedily.
        alts = sorted(self.special, key=len, reverse=True)
        self._special_pat = (
            regex.compile("|".join(regex.escape(s) for s in alts)) if alts else None
        )
        self._bpe_cached = functools.lru_cache(maxsize=200_000)(self._bpe)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_gguf(cls, reader_or_path) -> "Tokenizer":
        import gguf

        r = reader_or_path
        if not isinstance(r, gguf.GGUFReader):
            r = gguf.GGUFReader(str(r))
        f = r.fields

        def get(key, default=None):
            return f[key].contents() if key in f else default

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model={model!r}, expected 'gpt2'")
        return cls(
            tokens=get("tokenizer.ggml.tokens"),
            token_types=get("tokenizer.ggml.token_type"),
            merges=get("tokenizer.ggml.merges"),
            bos_id=get("tokenizer.ggml.bos_token_id"),
            eos_id=get("tokenizer.ggml.eos_token_id"),
            chat_template=get("tokenizer.chat_template"),
            pre=get("tokenizer.ggml.pre", "gpt2"),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------- BPE
    def _bpe(self, piece: str) -> Tuple[str, ...]:
        """BPE-merge one pre-token (already byte->unicode mapped)."""
        word = list(piece)
        if len(word) <= 1:
            return tuple(word)
        ranks = self.bpe_ranks
        while True:
            best = None
            best_rank = None
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank = r
                    best = i
            if best is None:
                break
            a, b = word[best], word[best + 1]
            # merge every occurrence of the best pair, left to right
            new = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    new.append(a + b)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
            if len(word) == 1:
                break
        return tuple(word)

    def _pretokenize(self, text: str, base: int) -> Iterable[Tuple[str, int, int]]:
        """Yield (piece, char_start, char_end) for a special-token-free chunk."""
        if self.pre == "smollm":
            chunks = []
            pos = 0
            for m in _DIGIT_PAT.finditer(text):
                if m.start() > pos:
                    chunks.append((text[pos : m.start()], pos))
                chunks.append((m.group(), m.start()))
                pos = m.end()
            if pos < len(text):
                chunks.append((text[pos:], pos))
        else:
            chunks = [(text, 0)]
        for chunk, off in chunks:
            for m in _GPT2_PAT.finditer(chunk):
                yield m.group(), base + off + m.start(), base + off + m.end()

    def _encode_ordinary(self, text: str, base: int, out_ids, out_spans) -> None:
        for piece, cs, ce in self._pretokenize(text, base):
            raw = piece.encode("utf-8")
            mapped = "".join(BYTE_ENCODER[b] for b in raw)
            toks = self._bpe_cached(mapped)
            # character span per token: walk bytes, map byte offsets to chars
            byte_to_char = []
            for ci, ch in enumerate(piece):
                byte_to_char.extend([ci] * len(ch.encode("utf-8")))
            bpos = 0
            for t in toks:
                tid = self.vocab.get(t)
                if tid is None:  # cannot happen with a complete byte vocab
                    raise KeyError(f"BPE produced unknown token {t!r}")
                nb = len(t)  # one unicode char per byte
                c0 = byte_to_char[bpos]
                c1 = byte_to_char[bpos + nb - 1] + 1
                out_ids.append(tid)
                out_spans.append((cs + c0, cs + c1))
                bpos += nb

    def encode_with_offsets(
        self, text: str, allow_special: bool = True
    ) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids and, per token, the [start, end) character span it came from.

        A token made of part of a multi-byte character gets the span of that
        whole character (so neighbouring spans can overlap in that case)."""
        ids: List[int] = []
        spans: List[Tuple[int, int]] = []
        pos = 0
        if allow_special and self._special_pat is not None:
            for m in self._special_pat.finditer(text):
                if m.start() > pos:
                    self._encode_ordinary(text[pos : m.start()], pos, ids, spans)
                ids.append(self.special[m.group()])
                spans.append((m.start(), m.end()))
                pos = m.end()
        if pos < len(text):
            self._encode_ordinary(text[pos:], pos, ids, spans)
        return ids, spans

    def encode(self, text: str, allow_special: bool = True) -> List[int]:
        return self.encode_with_offsets(text, allow_special)[0]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            t = self.tokens[i]
            if self.token_types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
                if not skip_special:
                    out.extend(t.encode("utf-8"))
                continue
            out.extend(BYTE_DECODER[c] for c in t)
        return out.decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- parts
    def encode_parts(
        self, parts: Sequence[Tuple[str, str]], allow_special: bool = True
    ) -> PartsEncoding:
        """Encode the concatenation of ``parts`` ([(name, text), ...]).

        The ids are exactly ``encode("".join(texts))``. ``spans[name]`` is the
        [start, end) token range of that part. Raises ValueError if a token
        straddles a part border (e.g. a part ends with a space that BPE glues
        to the next word: put such whitespace at the *start* of the next part).
        Part borders at newlines, at special tokens, or before a leading
        space of the next part are always clean."""
        names = [n for n, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError("part names must be unique")
        text = "".join(t for _, t in parts)
        ids, tok_spans = self.encode_with_offsets(text, allow_special)
        bounds = []
        c = 0
        for _, t in parts:
            bounds.append((c, c + len(t)))
            c += len(t)
        # token index where each char border falls
        starts = [s for s, _ in tok_spans]
        ends = [e for _, e in tok_spans]
        result: Dict[str, Tuple[int, int]] = {}
        for (name, t), (c0, c1) in zip(parts, bounds):
            # first token starting at/after c0, first token starting at/after c1
            t0 = _first_at_or_after(starts, c0)
            t1 = _first_at_or_after(starts, c1)
            for border, ti in ((c0, t0), (c1, t1)):
                if 0 < ti <= len(ids) and ends[ti - 1] > border:
                    raise ValueError(
                        f"token {ti - 1} ({self.tokens[ids[ti - 1]]!r}) straddles "
                        f"the border of part {name!r} at char {border}"
                    )
            result[name] = (t0, t1)
        return PartsEncoding(ids=ids, spans=result, text=text)

    # ------------------------------------------------------------------ chat
    # ChatML, as in tokenizer.chat_template of SmolLM2-Instruct:
    #   {{'<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n'}}
    #   add_generation_prompt -> '<|im_start|>assistant\n'
    # (the template only injects a default system prompt when the first
    # message is not a system message; we always pass one.)
    IM_START = "<|im_start|>"
    IM_END = "<|im_end|>"

    def render_chat(self, messages: Sequence[Dict[str, str]], add_generation_prompt=True) -> str:
        out = []
        if messages and messages[0]["role"] != "system":
            out.append(
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                "trained by Hugging Face<|im_end|>\n"
            )
        for m in messages:
            out.append(f"{self.IM_START}{m['role']}\n{m['content']}{self.IM_END}\n")
        if add_generation_prompt:
            out.append(f"{self.IM_START}assistant\n")
        return "".join(out)

    def system_prompt_parts(self, parts: Sequence[Tuple[str, str]]) -> PartsEncoding:
        """The system turn built from content parts, with template header and
        footer as parts named 'header' and 'footer':

            <|im_start|>system\\n  + parts... +  <|im_end|>\\n
        """
        full = [("header", f"{self.IM_START}system\n")] + list(parts) + [
            ("footer", f"{self.IM_END}\n")
        ]
        return self.encode_parts(full)

    def user_turn(self, text: str, add_generation_prompt=True) -> List[int]:
        """Token ids of '<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n'."""
        s = f"{self.IM_START}user\n{text}{self.IM_END}\n"
        if add_generation_prompt:
            s += f"{self.IM_START}assistant\n"
        return self.encode(s)


def _first_at_or_after(sorted_vals: List[int], x: int) -> int:
    import bisect

    return bisect.bisect_left(sorted_vals, x)
