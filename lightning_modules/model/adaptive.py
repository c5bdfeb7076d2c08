"""Adaptive input embedding and adaptive softmax with tied weights (Baevski & Auli 2019; docs/method.md §1.4).

The vocabulary (sorted by frequency) is split by `cutoffs` into a shortlist and tail clusters; cluster i has
width d_model // div_value**i. Our own module rather than torch.nn.AdaptiveLogSoftmaxWithLoss, because that
one owns its weights and cannot tie them to an adaptive input embedding (nor has the untied shortlist
projection of docs/method.md §1.4).
"""

import bisect
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.model.precision import at_least_fp32

IGNORE_INDEX = -100  # targets with this value are not scored: their NLL is exactly 0
# evaluation inputs of at most this many tokens (generation steps) are routed to their clusters on the host
HOST_ROUTED_TOKENS = 64


def cluster_dims(d_model: int, n_clusters: int, div_value: float) -> list[int]:
    """Embedding width of each cluster: d_model // div_value**i (the shortlist is cluster 0)."""
    return [int(d_model // (div_value**i)) for i in range(n_clusters)]


class AdaptiveEmbedding(nn.Module):
    """Token ids -> d_model vectors. Cluster i looks up a table of width d_model // div_value**i and, when
    there are cutoffs and div_value != 1, projects it up to d_model (no bias), the shortlist included.
    Without cutoffs it is a plain nn.Embedding(vocab_size, d_model).

    Word dropout (training only) drops whole rows of the tables, i.e. every occurrence of a word type in the
    batch, and rescales the kept ones by 1 / (1 - p).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        cutoffs: Sequence[int] = (),
        div_value: float = 1.0,
        word_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.d_model, self.word_dropout = vocab_size, d_model, word_dropout
        self.bounds = [0, *cutoffs, vocab_size]  # cluster i holds ids [bounds[i], bounds[i+1])
        dims = cluster_dims(d_model, len(self.bounds) - 1, div_value)
        self.embs = nn.ModuleList(
            nn.Embedding(hi - lo, dim) for (lo, hi), dim in zip(pairwise(self.bounds), dims, strict=True)
        )
        has_proj = len(cutoffs) > 0 and div_value != 1
        self.projs = nn.ModuleList(nn.Linear(dim, d_model, bias=False) for dim in dims) if has_proj else None

    def _cluster(self, i: int, ids: Tensor) -> Tensor:
        """Cluster-local ids [n] -> [n, d_model]."""
        e = self.embs[i](ids)
        return e if self.projs is None else self.projs[i](e)

    def _host_routed(self, ids: Tensor) -> Tensor | None:
        """The embedding of a few token ids (a generation step), each routed to its cluster on the host: only the
        clusters present run, without the cluster masks, nonzero and scatter of the general path; one token's row is
        read as a view of its table, so the projection is its one kernel. -> [n, d_model], or None when an id is
        outside the vocabulary (the general path embeds those as zeros)."""
        tokens = ids.reshape(-1).tolist()
        if not tokens or not all(0 <= t < self.vocab_size for t in tokens):
            return None
        clusters = [bisect.bisect_right(self.bounds, t) - 1 for t in tokens]
        weight = self.embs[0].weight
        if len(tokens) == 1:
            i = clusters[0]
            row = self.embs[i].weight[tokens[0] - self.bounds[i]].view(1, -1)  # (1, d_i)
            e = row.clone() if self.projs is None else F.linear(row, self.projs[i].weight)
            return e.to(weight.dtype)  # as the general path gives it, also under autocast
        h = None
        for i in sorted(set(clusters)):
            at = [j for j, c in enumerate(clusters) if c == i]
            local = torch.tensor([tokens[j] - self.bounds[i] for j in at], device=weight.device)
            e = self._cluster(i, local)  # (n_i, d)
            if len(at) == len(tokens):
                return e.to(weight.dtype)
            if h is None:
                h = weight.new_empty(len(tokens), self.d_model)
            h[torch.tensor(at, device=weight.device)] = e.to(h.dtype)
        return h

    def forward(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> [B, T, d_model]."""
        if len(self.embs) == 1:
            h = self._cluster(0, ids)  # (B, T, d)
        elif not self.training and ids.numel() <= HOST_ROUTED_TOKENS and (routed := self._host_routed(ids)) is not None:
            h = routed.view(*ids.shape, self.d_model)  # (B, T, d)
        else:
            flat = ids.reshape(-1)  # (B*T,)
            h = torch.zeros(flat.numel(), self.d_model, device=ids.device, dtype=self.embs[0].weight.dtype)
            for i, (lo, hi) in enumerate(pairwise(self.bounds)):
                # an empty cluster still runs (on 0 rows) so its weights get a zero gradient: DDP needs every
                # parameter to take part in every backward pass
                rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
                e = self._cluster(i, flat[rows] - lo)  # (n_i, d)
                h = h.index_copy(0, rows, e.to(h.dtype))
            h = h.view(*ids.shape, self.d_model)  # (B, T, d)
        if self.training and self.word_dropout > 0:
            keep = torch.empty(self.vocab_size, device=ids.device, dtype=h.dtype).bernoulli_(1 - self.word_dropout)
            h = h * (keep / (1 - self.word_dropout))[ids].unsqueeze(-1)
        return h


class AdaptiveSoftmax(nn.Module):
    """Adaptive softmax tied to an AdaptiveEmbedding (docs/method.md §1.4).

    Head: [shortlist logits ; one logit per tail cluster]. Shortlist logits = E0 · P_s h + b, with P_s an
    untied d x d projection (present iff the embedding has projections) and E0 tied to the shortlist table;
    the cluster logits come from their own Linear(d, n_tails) with bias, on h. Tail i: E_i · (W_i^T h) + b,
    with E_i tied to the tail table and W_i the tied input up-projection, used transposed as the
    down-projection. log p(w) = log p_head(cluster(w)) + log p_tail(w | cluster). Without cutoffs it is a
    full softmax whose weight is the embedding table, plus a bias.

    The tied weights are the embedding's own Parameter objects (also registered here, as nanoGPT ties
    wte/lm_head), so model.parameters() lists each once.
    """

    def __init__(self, embedding: AdaptiveEmbedding) -> None:
        super().__init__()
        self.d_model, self.bounds = embedding.d_model, embedding.bounds
        d = self.d_model
        self.n_clusters = len(self.bounds) - 1
        self.out_weights = nn.ParameterList([e.weight for e in embedding.embs])  # tied, [n_i, d_i]
        has_proj = embedding.projs is not None
        self.tail_projs = nn.ParameterList([p.weight for p in embedding.projs[1:]] if has_proj else [])  # [d, d_i]
        self.shortlist_proj = nn.Linear(d, d, bias=False) if has_proj else None
        self.cluster = nn.Linear(d, self.n_clusters - 1) if self.n_clusters > 1 else None
        self.bias = nn.Parameter(torch.zeros(self.bounds[-1]))  # output bias over the whole vocabulary, [V]

    def transposed_head(self) -> tuple[Tensor | None, Tensor]:
        """The head's weights transposed and contiguous, for `draw` in generation steps: the
        shortlist projection [d, d] (None without one) and the shortlist table [d_0, c1]. MKL runs a product of one
        row faster with the outputs contiguous: a W1 generation step 1.05-1.13x (docs/performance.md, "Generation")."""
        proj_t = None if self.shortlist_proj is None else self.shortlist_proj.weight.t().contiguous()
        return proj_t, self.out_weights[0].t().contiguous()

    def _head_log_probs(self, h: Tensor, head_t: tuple[Tensor | None, Tensor] | None = None) -> Tensor:
        """h [n, d] -> log-probs over [shortlist ; tail clusters], [n, c1 + n_tails] (>= fp32). ``head_t``: the
        `transposed_head` weights, to use instead of the stored ones."""
        if head_t is None:
            x = h if self.shortlist_proj is None else self.shortlist_proj(h)
            logits = F.linear(x, self.out_weights[0], self.bias[: self.bounds[1]])  # (n, c1)
        else:
            proj_t, table_t = head_t
            logits = torch.addmm(self.bias[: self.bounds[1]], h if proj_t is None else h @ proj_t, table_t)
        if self.cluster is not None:
            logits = torch.cat([logits, self.cluster(h).to(logits.dtype)], dim=-1)  # (n, c1 + n_tails)
        return at_least_fp32(logits).log_softmax(dim=-1)

    def _tail_log_probs(self, h: Tensor, i: int) -> Tensor:
        """h [n, d] -> log p(w | cluster i) (>= fp32) over the words of tail cluster i >= 1, [n, n_i]."""
        x = h if len(self.tail_projs) == 0 else F.linear(h, self.tail_projs[i - 1].t())  # (n, d_i)
        lo, hi = self.bounds[i], self.bounds[i + 1]
        return at_least_fp32(F.linear(x, self.out_weights[i], self.bias[lo:hi])).log_softmax(dim=-1)

    def nll(self, h: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood. h [B, T, d], targets [B, T] -> fp32 [B, T]; 0 where target is
        -100. Tail clusters are evaluated only for the tokens whose target falls in them."""
        flat_h, flat_t = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (n, d), (n,)
        head = self._head_log_probs(flat_h)  # (n, c1 + n_tails)
        c1 = self.bounds[1]
        cluster = torch.zeros_like(flat_t)  # (n,) 0 = shortlist, i = tail cluster i
        for cutoff in self.bounds[1:-1]:
            cluster += flat_t >= cutoff
        head_index = torch.where(cluster == 0, flat_t, c1 + cluster - 1).clamp(min=0)
        log_p = head.gather(1, head_index[:, None]).squeeze(1)  # (n,)
        for i in range(1, self.n_clusters):
            rows = (cluster == i).nonzero().squeeze(1)  # may be empty: see AdaptiveEmbedding.forward
            tail = self._tail_log_probs(flat_h[rows], i)  # (n_rows, n_i)
            word = (flat_t[rows] - self.bounds[i])[:, None]
            log_p = log_p.index_add(0, rows, tail.gather(1, word).squeeze(1))
        nll = (-log_p).masked_fill(flat_t == IGNORE_INDEX, 0.0)
        return nll.view(targets.shape)

    def log_probs(self, h: Tensor) -> Tensor:
        """Full distribution: h [B, T, d] -> fp32 log-probs [B, T, V]."""
        flat_h = h.reshape(-1, h.size(-1))
        head = self._head_log_probs(flat_h)
        c1 = self.bounds[1]
        parts = [head[:, :c1]]
        for i in range(1, self.n_clusters):
            parts.append(head[:, c1 + i - 1 : c1 + i] + self._tail_log_probs(flat_h, i))  # (n, n_i)
        return torch.cat(parts, dim=-1).view(*h.shape[:-1], self.bounds[-1])

    def draw(self, h: Tensor, temperature: float, top_k: int | None = None,
             generator: torch.Generator | None = None, head_t: tuple[Tensor | None, Tensor] | None = None) -> Tensor:
        """The next token of each row of the last hidden states ``h`` [B, d] -> long [B], computing as little of the
        adaptive softmax as gives exactly the result of the full distribution. ``head_t``: `transposed_head`, built
        once for the many draws of a generation.

        log p(w) = log p_head(cluster) + log p_tail(w | cluster) <= log p_head(cluster), so a tail cluster whose head
        log-probability is below what the shortlist already offers cannot hold the answer and is skipped:
          - greedy (``temperature`` 0): the argmax of the full distribution (ties to the lower id, as ``argmax``);
            a tail is computed (for every row) only when some row's cluster log-probability beats that row's best
            word so far;
          - ``top_k``: the k most likely words of the full distribution (a tail is computed only when its cluster
            log-probability beats the current k-th candidate), then one drawn from softmax(log p / temperature);
          - temperature 1, no top-k: the head's cluster first, then a word within that tail only, which is the
            full distribution by the chain rule;
          - any other temperature without top-k: p^(1/t) does not factor over clusters, so the full distribution is
            computed and drawn from.
        """
        head = self._head_log_probs(h, head_t)  # (B, c1 + n_tails), fp32
        c1, bounds = self.bounds[1], self.bounds
        tails = range(1, self.n_clusters)
        if temperature == 0:
            best, ids = head[:, :c1].max(-1)  # (B,), (B,)
            for i in tails:
                cluster_lp = head[:, c1 + i - 1]  # (B,)
                if bool((cluster_lp > best).any()):
                    # every row, rather than selecting those that passed: a row whose cluster log-prob is not above
                    # its best cannot pass below (log p_tail <= 0), and selecting rows costs more dispatches than
                    # the few rows of a generation step cost to compute
                    tail_best, tail_ids = (cluster_lp[:, None] + self._tail_log_probs(h, i)).max(-1)
                    better = tail_best > best
                    best, ids = torch.where(better, tail_best, best), torch.where(better, tail_ids + bounds[i], ids)
            return ids
        if top_k is not None and top_k < bounds[-1]:
            values, ids = head[:, :c1].topk(min(top_k, c1), dim=-1)  # (B, k') candidates, best first
            for i in tails:
                cluster_lp = head[:, c1 + i - 1 : c1 + i]  # (B, 1)
                floor = values[:, -1:] if values.size(1) == top_k else torch.full_like(cluster_lp, float("-inf"))
                if bool((cluster_lp > floor).any()):
                    tail = cluster_lp + self._tail_log_probs(h, i)  # (B, n_i)
                    tail_ids = torch.arange(bounds[i], bounds[i + 1], device=h.device).expand_as(tail)
                    values, pick = torch.cat([values, tail], -1).topk(min(top_k, values.size(1) + tail.size(1)), -1)
                    ids = torch.cat([ids, tail_ids], -1).gather(-1, pick)
            choice = torch.multinomial((values / temperature).softmax(-1), 1, generator=generator)  # (B, 1)
            return ids.gather(-1, choice).squeeze(1)
        if temperature == 1:
            first = torch.multinomial(head.exp(), 1, generator=generator).squeeze(1)  # (B,) word or cluster
            ids = first.clone()
            for i in tails:
                rows = (first == c1 + i - 1).nonzero().squeeze(1)
                if rows.numel():
                    tail = self._tail_log_probs(h[rows], i).exp()  # (n, n_i)
                    ids[rows] = torch.multinomial(tail, 1, generator=generator).squeeze(1) + bounds[i]
            return ids
        log_probs = self.log_probs(h)  # (B, V)
        return torch.multinomial((log_probs / temperature).softmax(-1), 1, generator=generator).squeeze(1)

    def forward(self, h: Tensor, targets: Tensor | None = None) -> Tensor:
        """nll(h, targets) [B, T] when targets are given, else log_probs(h) [B, T, V]."""
        return self.log_probs(h) if targets is None else self.nll(h, targets)

    def macs_per_token(self) -> dict[str, int | list[int]]:
        """Forward multiply-accumulates per token: `head` (always paid), `tails` (cluster i's cost, paid
        for a token whose target is in it, or for every token when the full distribution is needed) and
        `full` = head + all tails."""
        d = self.d_model
        head = self.bounds[1] * self.out_weights[0].size(1)
        head += 0 if self.shortlist_proj is None else d * d
        head += 0 if self.cluster is None else d * (self.n_clusters - 1)
        tails = []
        for i in range(1, self.n_clusters):
            n_i, d_i = self.out_weights[i].shape
            tails.append(n_i * d_i + (d * d_i if len(self.tail_projs) else 0))
        return {"head": head, "tails": tails, "full": head + sum(tails)}
