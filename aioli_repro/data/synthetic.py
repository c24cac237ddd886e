"""`SyntheticSource`: seeded "group languages" whose mixture matters for a tiny LM, with exact loss floors.

The generating process (one per group g, over the 7 SlimPajama group names so group configs carry over)
-------------------------------------------------------------------------------------------------------
Tokens are byte ids: Markov symbols ``0..n_symbols-1`` plus one COPY marker ``marker_id`` (never emitted
by the Markov part). The packer appends EOS (id 256) after every document; this module never emits it.

* **Markov part with a transfer knob.** There are m = 7 sparse "skill" transition matrices ``T_s``
  (one per group name; skill s is group s's own skill). Row ``a`` of ``T_s`` puts a
  Dirichlet(``concentration[s]``) distribution on ``branching[s]`` next symbols: the successor of ``a``
  in a random cyclic permutation (so every skill, hence every mixture, is irreducible) plus
  ``branching[s] - 1`` other random symbols. Group g uses ``T_g = sum_s W[g, s] T_s`` with
  ``W = (1 - rho) I + rho / 7``: ``rho = 0`` gives independent languages, ``rho = 1`` identical ones.
  Different branching/concentration per skill give different entropy rates.
* **Copy spans (long-range structure, induction-head style).** At position t (t tokens so far), outside
  a copy span and once ``t >= min_copy_context``, with probability ``copy_prob[g]`` the marker is
  emitted; then a source position j is drawn uniformly from ``[0, t - span_len[g]]`` and the next
  ``span_len[g]`` tokens copy ``x[j : j + span_len[g]]`` (which may contain earlier markers; those do
  not start a new span). Afterwards the Markov chain continues from the last emitted token; the marker
  has its own row, equal to the initial distribution (uniform over the symbols).
* **Lengths.** Document length N ~ Uniform{min_len..max_len}, drawn independently of the content;
  the first token is uniform over the symbols. A span cut by the end of the document is truncated.
* **Sizes.** ``train_docs[g]`` training documents per group (deliberately unequal, so small groups are
  repeated when over-sampled); ``val_docs`` / ``test_docs`` per group for the held-out splits.

The exact loss floor
--------------------
``true_token_nll(doc, group)`` is the negative log-likelihood (nats) of every token under the TRUE
process given the full document prefix, i.e. the loss of the Bayes-optimal predictor that knows the group
and where the document starts:

* position 0: ``log n_symbols``;
* outside a span: ``p(marker) = q_g * [t >= min_copy_context]`` and
  ``p(x) = (1 - q_g * [t >= min_copy_context]) * T_g[prev, x]``;
* k-th token of a span after a marker at position n: the posterior over sources is uniform over the
  ``j in [0, n - L_g]`` consistent with the k tokens copied so far, so
  ``p(x) = #{consistent j : x[j + k] = x} / #{consistent j}``.

With ``with_eos=True`` the EOS event the packer appends is included: after n tokens the document ends with
hazard ``h(n) = 1 / (max_len - n + 1)`` for ``n >= min_len`` (0 before), so every content token also pays
``-log(1 - h(t))`` and one extra entry ``-log h(N)`` scores EOS. These telescope: the per-document total
is the content NLL plus ``eos_nll() = log(max_len - min_len + 1)``.

``loss_floor(group, split)`` = (content NLL + EOS terms, summed over the split) / (tokens + one EOS per
document): the Bayes-optimal per-token loss on exactly the packed split. A model that sees a 256-token
window (not the whole document, nor the group identity) cannot beat it in expectation (on a finite split
it can only by chance). ``entropy_rate_markov(group)`` is
the analytic entropy rate of the Markov part alone (stationary distribution . row entropies), for
reference; ``group_stats()`` collects both per group.

Determinism: skills are drawn from ``default_rng([seed, 0, s])`` (shared by all splits); documents come
in chunks of ``CHUNK_DOCS`` from ``default_rng([seed, 1, group_index, split_index, chunk_index])``, and
every draw is vectorised across the chunk in a fixed order, so the same arguments give byte-identical
documents in any process. A chunk's documents depend on its size: changing a split's document count
changes its last (partial) chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from aioli_repro.data.source import SLIMPAJAMA_GROUPS, SPLITS, DataError, GroupSource

#: bump when the generating algorithm changes (part of the fingerprint, so it invalidates caches)
VERSION = "synthetic-v1"
#: documents generated together (one RNG stream each); part of the algorithm, not a knob
CHUNK_DOCS = 1024

# Defaults, in SLIMPAJAMA_GROUPS order (arxiv, book, c4, commoncrawl, github, stackexchange, wikipedia).
# github/stackexchange: low-entropy and copy-heavy; commoncrawl/c4: high-entropy, little copying, large.
DEFAULT_BRANCHING: dict[str, int] = dict(zip(SLIMPAJAMA_GROUPS, (4, 8, 10, 12, 2, 5, 6), strict=True))
# Lower concentration = peakier rows = easier; raises the spread of entropy rates across groups.
DEFAULT_CONCENTRATION: dict[str, float] = dict(
    zip(SLIMPAJAMA_GROUPS, (0.5, 0.7, 0.8, 1.0, 0.3, 0.5, 0.6), strict=True)
)
DEFAULT_COPY_PROB: dict[str, float] = dict(
    zip(SLIMPAJAMA_GROUPS, (0.04, 0.02, 0.01, 0.005, 0.08, 0.06, 0.03), strict=True)
)
DEFAULT_SPAN_LEN: dict[str, int] = dict(zip(SLIMPAJAMA_GROUPS, (16, 24, 8, 6, 12, 10, 20), strict=True))
DEFAULT_TRAIN_DOCS: dict[str, int] = dict(
    zip(SLIMPAJAMA_GROUPS, (1500, 1200, 4000, 8000, 1500, 1000, 1200), strict=True)
)


def _per_group(field: str, value: object, kind: type, default: Mapping[str, object]) -> tuple:
    """A scalar, a {group: value} mapping (all 7 groups) or a 7-sequence -> tuple in group order."""
    if value is None:
        value = default
    if isinstance(value, Mapping):
        keys = [str(k) for k in value.keys()]
        if sorted(keys) != sorted(SLIMPAJAMA_GROUPS):
            raise DataError(
                f"data.source.{field}: a mapping needs exactly the groups {list(SLIMPAJAMA_GROUPS)}, "
                f"got {keys}"
            )
        items = [value[g] for g in SLIMPAJAMA_GROUPS]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(SLIMPAJAMA_GROUPS):
            raise DataError(
                f"data.source.{field}: a list needs {len(SLIMPAJAMA_GROUPS)} values (one per group in the "
                f"order {list(SLIMPAJAMA_GROUPS)}), got {len(value)}"
            )
        items = list(value)
    else:
        items = [value] * len(SLIMPAJAMA_GROUPS)
    out = []
    for g, v in zip(SLIMPAJAMA_GROUPS, items, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise DataError(f"data.source.{field}[{g}]: expected a number, got {v!r}")
        if kind is int and float(v) != int(v):
            raise DataError(f"data.source.{field}[{g}]: expected an integer, got {v!r}")
        out.append(kind(v))
    return tuple(out)


def _bounded_int(field: str, v: object, lo: int, hi: int | None = None) -> int:
    """v as an int in [lo, hi], or a DataError naming data.source.<field>."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise DataError(f"data.source.{field}: expected an integer {rng}, got {v!r}")
    return int(v)


class SyntheticSource(GroupSource):
    """Seeded Markov group languages with copy spans, unequal group sizes and exact loss floors."""

    name = "synthetic"

    def __init__(
        self,
        seed: int = 1234,
        rho: float = 0.3,
        n_symbols: int = 200,
        marker_id: int = 250,
        branching: Mapping[str, int] | Sequence[int] | int | None = None,
        concentration: Mapping[str, float] | Sequence[float] | float | None = None,
        copy_prob: Mapping[str, float] | Sequence[float] | float | None = None,
        span_len: Mapping[str, int] | Sequence[int] | int | None = None,
        min_copy_context: int = 32,
        min_len: int = 128,
        max_len: int = 512,
        train_docs: Mapping[str, int] | Sequence[int] | int | None = None,
        val_docs: int = 64,
        test_docs: int = 64,
    ) -> None:
        self.seed = _bounded_int("seed", seed, 0)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= float(rho) <= 1.0:
            raise DataError(f"data.source.rho: expected a number in [0, 1], got {rho!r}")
        self.rho = float(rho)
        self.n_symbols = _bounded_int("n_symbols", n_symbols, 2, 255)
        self.marker_id = _bounded_int("marker_id", marker_id, 0, 255)
        if self.marker_id < self.n_symbols:
            raise DataError(
                f"data.source.marker_id: must be >= n_symbols ({self.n_symbols}) so the Markov part never "
                f"emits it, got {self.marker_id}"
            )
        self.branching = _per_group("branching", branching, int, DEFAULT_BRANCHING)
        self.concentration = _per_group("concentration", concentration, float, DEFAULT_CONCENTRATION)
        self.copy_prob = _per_group("copy_prob", copy_prob, float, DEFAULT_COPY_PROB)
        self.span_len = _per_group("span_len", span_len, int, DEFAULT_SPAN_LEN)
        self.train_docs = _per_group("train_docs", train_docs, int, DEFAULT_TRAIN_DOCS)
        self._check_groups()
        self.min_copy_context = _bounded_int("min_copy_context", min_copy_context, 1)
        if self.min_copy_context < max(self.span_len):
            raise DataError(
                f"data.source.min_copy_context: must be >= the longest span_len ({max(self.span_len)}) so "
                f"every copy has a source, got {self.min_copy_context}"
            )
        self.min_len = _bounded_int("min_len", min_len, 1)
        self.max_len = _bounded_int("max_len", max_len, self.min_len)
        self.val_docs = _bounded_int("val_docs", val_docs, 1)
        self.test_docs = _bounded_int("test_docs", test_docs, 1)

        self._build_language()
        self._floors: dict[tuple[str, str], float] = {}

    def _check_groups(self) -> None:
        """Each group's language parameters in range (the field and group named in the error)."""
        for g, b, c, q, L, n in zip(
            SLIMPAJAMA_GROUPS,
            self.branching,
            self.concentration,
            self.copy_prob,
            self.span_len,
            self.train_docs,
            strict=True,
        ):
            if not 1 <= b <= self.n_symbols:
                raise DataError(
                    f"data.source.branching[{g}]: expected 1..n_symbols ({self.n_symbols}), got {b}"
                )
            if not c > 0:
                raise DataError(f"data.source.concentration[{g}]: expected > 0, got {c}")
            if not 0.0 <= q < 1.0:
                raise DataError(f"data.source.copy_prob[{g}]: expected a probability in [0, 1), got {q}")
            if L < 1:
                raise DataError(f"data.source.span_len[{g}]: expected >= 1, got {L}")
            if n < 1:
                raise DataError(f"data.source.train_docs[{g}]: expected >= 1, got {n}")

    # --- the language ---------------------------------------------------------------------------
    def _build_language(self) -> None:
        S, m = self.n_symbols, len(SLIMPAJAMA_GROUPS)
        skills = np.zeros((m, S, S))
        for s in range(m):
            rng = np.random.default_rng([self.seed, 0, s])
            cycle = rng.permutation(S)
            succ = np.empty(S, dtype=np.int64)
            succ[cycle] = np.roll(cycle, -1)
            b = self.branching[s]
            for a in range(S):
                others = rng.permutation(S - 1)[: b - 1]
                others = others + (others >= succ[a])  # skip succ[a]: the support has b distinct symbols
                support = np.concatenate([[succ[a]], others])
                skills[s, a, support] = rng.dirichlet(np.full(b, self.concentration[s]))
        W = (1.0 - self.rho) * np.eye(m) + self.rho / m
        T = np.einsum("gs,sab->gab", W, skills)
        T /= T.sum(axis=2, keepdims=True)  # exact row sums despite rounding
        self._skills = skills
        self._T = T  # (groups, S, S): Markov rows of the symbols

        # Lookup table for the NLL: row index per previous byte (symbols -> own row, marker -> uniform row,
        # anything else -> a zero row), columns over all 256 byte ids.
        G = m
        P = np.zeros((G, S + 2, 256))
        P[:, :S, :S] = T
        P[:, S, :S] = 1.0 / S
        self._P = P
        self._row_of = np.full(256, S + 1, dtype=np.int64)
        self._row_of[:S] = np.arange(S)
        self._row_of[self.marker_id] = S

        # Sparse padded CDFs for sampling: (groups, S, K) supports and cumulative probabilities.
        K = int((T > 0).sum(axis=2).max())
        supp = np.zeros((G, S, K), dtype=np.int64)
        cdf = np.ones((G, S, K))
        for g in range(G):
            for a in range(S):
                nz = np.flatnonzero(T[g, a] > 0)
                c = np.cumsum(T[g, a, nz])
                c[-1] = 1.0  # so (cdf < u) never walks past the last real symbol
                supp[g, a, : len(nz)] = nz
                supp[g, a, len(nz) :] = nz[-1]
                cdf[g, a, : len(nz)] = c
        self._supp, self._cdf = supp, cdf

    def _gidx(self, group: str) -> int:
        if group not in SLIMPAJAMA_GROUPS:
            raise DataError(f"group: unknown group {group!r}; allowed: {list(SLIMPAJAMA_GROUPS)}")
        return SLIMPAJAMA_GROUPS.index(group)

    def transition_matrix(self, group: str) -> np.ndarray:
        """T_g, the (n_symbols, n_symbols) Markov transition matrix of a group (a copy)."""
        return self._T[self._gidx(group)].copy()

    def n_docs(self, group: str, split: str) -> int:
        if split not in SPLITS:
            raise DataError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        if split == "train":
            return self.train_docs[self._gidx(group)]
        return self.val_docs if split == "val" else self.test_docs

    # --- generation ------------------------------------------------------------------------------
    def _generate_chunk(self, g: int, split_index: int, chunk: int, B: int) -> list[np.ndarray]:
        """B documents (uint8 arrays), generated position by position, vectorised across documents."""
        rng = np.random.default_rng([self.seed, 1, g, split_index, chunk])
        S, marker, L, q = self.n_symbols, self.marker_id, self.span_len[g], self.copy_prob[g]
        supp, cdf = self._supp[g], self._cdf[g]
        lens = rng.integers(self.min_len, self.max_len + 1, size=B)
        T_max = int(lens.max())
        x = np.zeros((B, T_max), dtype=np.int64)
        rem = np.zeros(B, dtype=np.int64)  # tokens left in the current copy span
        src = np.zeros(B, dtype=np.int64)  # next source position of the span
        rows = np.arange(B)
        x[:, 0] = rng.integers(0, S, size=B)
        for t in range(1, T_max):
            u_copy = rng.random(B)
            u_next = rng.random(B)
            in_span = rem > 0
            start = ~in_span & (u_copy < q) if t >= self.min_copy_context else np.zeros(B, dtype=bool)
            markov = ~in_span & ~start
            prev = x[:, t - 1]
            from_marker = markov & (prev == marker)
            from_symbol = markov & ~from_marker
            col = np.zeros(B, dtype=np.int64)
            # copy step
            col[in_span] = x[rows[in_span], src[in_span]]
            src[in_span] += 1
            rem[in_span] -= 1
            # span start: emit the marker, pick the source uniformly in [0, t - L]
            n_start = int(start.sum())
            col[start] = marker
            src[start] = rng.integers(0, t - L + 1, size=n_start)
            rem[start] = L
            # Markov step (from the marker: uniform, i.e. the initial distribution)
            col[from_marker] = rng.integers(0, S, size=int(from_marker.sum()))
            p = prev[from_symbol]
            k = (cdf[p] < u_next[from_symbol, None]).sum(axis=1)
            col[from_symbol] = supp[p, k]
            x[:, t] = col
        return [x[b, : lens[b]].astype(np.uint8) for b in range(B)]

    def iter_token_arrays(self, group: str, split: str) -> Iterator[np.ndarray]:
        """The documents of a group/split as uint8 token arrays (what `documents` yields as bytes)."""
        g, n = self._gidx(group), self.n_docs(group, split)
        si = SPLITS.index(split)
        for c in range(math.ceil(n / CHUNK_DOCS)):
            yield from self._generate_chunk(g, si, c, min(CHUNK_DOCS, n - c * CHUNK_DOCS))

    # --- GroupSource -----------------------------------------------------------------------------
    def available_groups(self) -> list[str]:
        return list(SLIMPAJAMA_GROUPS)

    def documents(self, group: str, split: str) -> Iterator[bytes]:
        for doc in self.iter_token_arrays(group, split):
            yield doc.tobytes()

    def fingerprint(self) -> dict:
        return {
            "name": self.name,
            "version": VERSION,
            "chunk_docs": CHUNK_DOCS,
            "seed": self.seed,
            "rho": self.rho,
            "n_symbols": self.n_symbols,
            "marker_id": self.marker_id,
            "branching": dict(zip(SLIMPAJAMA_GROUPS, self.branching, strict=True)),
            "concentration": dict(zip(SLIMPAJAMA_GROUPS, self.concentration, strict=True)),
            "copy_prob": dict(zip(SLIMPAJAMA_GROUPS, self.copy_prob, strict=True)),
            "span_len": dict(zip(SLIMPAJAMA_GROUPS, self.span_len, strict=True)),
            "min_copy_context": self.min_copy_context,
            "min_len": self.min_len,
            "max_len": self.max_len,
            "train_docs": dict(zip(SLIMPAJAMA_GROUPS, self.train_docs, strict=True)),
            "val_docs": self.val_docs,
            "test_docs": self.test_docs,
        }

    # --- the exact floor -------------------------------------------------------------------------
    def eos_hazard(self, n: int) -> float:
        """P(document ends after exactly n tokens | it has at least n tokens)."""
        if n < self.min_len:
            return 0.0
        return 1.0 / (self.max_len - n + 1) if n <= self.max_len else 1.0

    def eos_nll(self) -> float:
        """Per-document total of the length terms: -log P(N) = log(max_len - min_len + 1)."""
        return math.log(self.max_len - self.min_len + 1)

    def _span_starts(self, x: np.ndarray, L: int) -> list[int]:
        """Positions of markers that start a span (a marker inside a span was copied, not emitted)."""
        starts, end = [], -1
        for m in np.flatnonzero(x == self.marker_id).tolist():
            if m > end:
                starts.append(m)
                end = m + L
        return starts

    def copy_span_mask(self, doc_tokens: np.ndarray, group: str) -> np.ndarray:
        """Per position: True for a copied token, False for a Markov token, the first token or a marker.

        Lets analyses split a model's loss into its short-range (Markov) and long-range (copy) parts.
        """
        x = np.asarray(doc_tokens, dtype=np.int64)
        L = self.span_len[self._gidx(group)]
        mask = np.zeros(len(x), dtype=bool)
        for m in self._span_starts(x, L):
            mask[m + 1 : m + 1 + L] = True
        return mask

    def true_token_nll(self, doc_tokens: np.ndarray, group: str, with_eos: bool = False) -> np.ndarray:
        """Exact NLL (nats) of each token under the true process given the document prefix.

        Returns N values (content only), or N + 1 with ``with_eos`` (continue/end terms folded into each
        token, plus the EOS the packer appends). Impossible tokens get ``inf``.
        """
        x = np.asarray(doc_tokens, dtype=np.int64)
        g = self._gidx(group)
        N = len(x)
        S, L, q = self.n_symbols, self.span_len[g], self.copy_prob[g]
        p = np.zeros(N)
        if N == 0:
            return np.array([-math.log(self.eos_hazard(0))]) if with_eos else p
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"true_token_nll: token ids must be bytes 0..255, got [{x.min()}, {x.max()}]")
        # Markov / marker probabilities everywhere; copy positions are overwritten below.
        t = np.arange(N)
        qa = np.where(t >= self.min_copy_context, q, 0.0)
        prev = np.concatenate([[0], x[:-1]])
        p = (1.0 - qa) * self._P[g, self._row_of[prev], x]
        p = np.where(x == self.marker_id, qa, p)
        p[0] = 1.0 / S if x[0] < S else 0.0
        for m in self._span_starts(x, L):
            k = min(L, N - m - 1)
            if k <= 0 or m < self.min_copy_context:
                continue  # span cut by the end, or an impossible marker (already p = 0)
            j = np.arange(m - L + 1)
            eq = x[j[:, None] + np.arange(k)[None, :]] == x[m + 1 : m + 1 + k][None, :]
            counts = np.cumprod(eq, axis=1).sum(axis=0).astype(np.float64)
            before = np.concatenate([[float(len(j))], counts[:-1]])
            with np.errstate(divide="ignore", invalid="ignore"):
                p[m + 1 : m + 1 + k] = np.where(before > 0, counts / np.maximum(before, 1.0), 0.0)
        with np.errstate(divide="ignore"):
            nll = -np.log(p)
            if not with_eos:
                return nll
            h = np.array([self.eos_hazard(n) for n in range(N + 1)])
            return np.concatenate([nll - np.log1p(-h[:N]), [-math.log(h[N])]])

    def predictive_distribution(self, prefix: np.ndarray, group: str) -> np.ndarray:
        """The true next-token distribution after ``prefix``: 257 probabilities (bytes 0..255, EOS = 256).

        Written independently of `true_token_nll` (state machine over the prefix), so tests can cross-check.
        """
        x = np.asarray(prefix, dtype=np.int64)
        g = self._gidx(group)
        S, L, q = self.n_symbols, self.span_len[g], self.copy_prob[g]
        n = len(x)
        dist = np.zeros(257)
        h = self.eos_hazard(n)
        dist[256] = h
        content = np.zeros(256)
        if n == 0:
            content[:S] = 1.0 / S
        else:
            span_start = None
            i = 0
            while i < n:  # walk the state machine: a marker outside a span covers the next L positions
                if x[i] == self.marker_id:
                    if i + L >= n:
                        span_start = i
                        break
                    i += L + 1
                else:
                    i += 1
            if span_start is not None:
                k = n - span_start - 1  # tokens of the span already copied
                cand = np.arange(span_start - L + 1)
                ok = np.ones(len(cand), dtype=bool)
                for i in range(k):
                    ok &= x[cand + i] == x[span_start + 1 + i]
                np.add.at(content, x[cand[ok] + k], 1.0)
                content /= content.sum()
            else:
                qa = q if n >= self.min_copy_context else 0.0
                content = (1.0 - qa) * self._P[g, self._row_of[x[-1]]]
                content[self.marker_id] = qa
        dist[:256] = (1.0 - h) * content
        return dist

    def loss_floor(self, group: str, split: str) -> float:
        """Bayes-optimal per-token loss (nats) on the packed split, EOS tokens included; cached."""
        key = (group, split)
        if key not in self._floors:
            total, tokens, docs = 0.0, 0, 0
            for doc in self.iter_token_arrays(group, split):
                total += float(self.true_token_nll(doc, group).sum())
                tokens += len(doc)
                docs += 1
            self._floors[key] = (total + docs * self.eos_nll()) / (tokens + docs)
        return self._floors[key]

    def entropy_rate_markov(self, group: str) -> float:
        """Entropy rate (nats/token) of the Markov part alone: stationary distribution . row entropies."""
        T = self._T[self._gidx(group)]
        # Cesaro average of power iterates: the stationary distribution even for a periodic chain
        pi, acc = np.full(len(T), 1.0 / len(T)), np.zeros(len(T))
        for _ in range(2000):
            pi = pi @ T
            acc += pi
        pi = acc / acc.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            H = -np.where(T > 0, T * np.log(T), 0.0).sum(axis=1)
        return float(pi @ H)

    def group_stats(self, floor_split: str = "val") -> dict[str, dict[str, float]]:
        """Per group: floor (on `floor_split`), Markov entropy rate, copy prob, span length, train size."""
        mean_len = (self.min_len + self.max_len) / 2
        out = {}
        for g, name in enumerate(SLIMPAJAMA_GROUPS):
            out[name] = {
                "floor": self.loss_floor(name, floor_split),
                "markov_entropy_rate": self.entropy_rate_markov(name),
                "copy_prob": self.copy_prob[g],
                "span_len": self.span_len[g],
                "train_docs": self.train_docs[g],
                "train_tokens_approx": int(round(self.train_docs[g] * (mean_len + 1))),  # EOS included
            }
        return out
