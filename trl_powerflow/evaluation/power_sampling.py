"""Power sampling: Metropolis-Hastings samples of the sequence-level α-power p(y|x)^α / Z(x), the exact sampler
of the distribution PowerFlow learns, at a much higher inference cost."""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..decoding import eval_mode, sample_continuations
from ..sampling import GenerationResult, sampling_inputs


@dataclass
class PowerSamplingResult(GenerationResult):
    """[`GenerationResult`] of [`power_sampling`], plus its Metropolis-Hastings statistics.

    Attributes:
        proposals: MH proposals made (all chains, all blocks).
        accepted: proposals accepted.
        acceptance_rate: `accepted / proposals`.
        proposal_temperature: temperature of the suffix proposals and of the initial draws.
    """

    proposals: int = 0
    accepted: int = 0
    acceptance_rate: float = float("nan")
    proposal_temperature: float = 1.0


def power_sampling(
    model,
    tokenizer,
    prompts,
    alpha: float = 4.0,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    mcmc_steps: int = 10,
    block_size: int | None = None,
    proposal_temperature: float | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    progress: bool = True,
) -> PowerSamplingResult:
    """Samples the sequence-level α-power `p(y|x)^α / Z(x)` of `model` with Metropolis-Hastings (Karan & Du 2025).

    The chains (`num_samples` per prompt, independent) live on completions y of at most `max_new_tokens` tokens
    (ending with EOS, or cut at the cap, exactly as [`generate_samples`] defines them). One MH step of a chain
    at state y (|y| = L tokens):

    1. pick a position t uniformly in {0, ..., L-1};
    2. keep y_<t and resample the suffix from the proposal q: the model at `proposal_temperature`, token by
       token, until EOS or the cap, giving y';
    3. accept y' with probability
       `A = min(1, [p(y')^α q(y|y')] / [p(y)^α q(y'|y)])`, where `q(y'|y) = (1/L) · q(y'_≥t | y_<t)` and
       `q(y|y') = (1/L') · q(y_≥t | y_<t)`; p-terms of the common prefix cancel, so
       `log A = α (log p(y'_≥t|y_<t) − log p(y_≥t|y_<t)) + log q(y_≥t|y_<t) − log q(y'_≥t|y_<t) + log L − log L'`.

    Every step satisfies detailed balance for p^α (the 1/L factors are the position choice; the per-token
    log-probs of the current state are cached, so a step costs one suffix generation and no rescoring), so the
    chain's distribution approaches p^α / Z as the number of steps grows (checked exactly on a toy in the tests).

    Blocks (Karan & Du): with `block_size = B`, a chain first samples B tokens from q and runs `mcmc_steps`
    steps on completions capped at B tokens (target p^α of the prefix), then extends unfinished chains by B more
    tokens and runs `mcmc_steps` steps with the cap at 2B, and so on up to `max_new_tokens`. Only the last stage
    targets the final distribution; the earlier ones give it a good start. `block_size=None` is one block (all
    steps at the final cap). Karan & Du use α = 4, proposal temperature 1/α, B = T/16 and 10 steps per block.

    Args:
        alpha: the power α (> 0).
        mcmc_steps: MH steps per chain in each block.
        block_size: tokens per block (`None`: one block of `max_new_tokens`).
        proposal_temperature: temperature of q (initial draws, block extensions and suffix resampling). `None`
            (default) uses 1/α as in Karan & Du (proposals close to the target, higher acceptance); 1.0 proposes
            from the base model itself. Both are exact: the MH ratio accounts for q.
        batch_size: chains advanced together (one forward pass per proposed token).
        seed, progress: as in [`generate_samples`].

    Returns:
        [`PowerSamplingResult`]: the final state of every chain, as a [`GenerationResult`] (`logps` are log p(y|x)
        at temperature 1) plus `proposals`, `accepted`, `acceptance_rate`; `forward_tokens` counts every token
        position the model processed (initial draws, extensions and all proposals, padding included; compare it
        with `generate_samples(...).forward_tokens`: about `mcmc_steps × blocks` times more).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tau = 1.0 / alpha if proposal_temperature is None else float(proposal_temperature)
    if tau <= 0:
        raise ValueError(f"proposal_temperature must be > 0, got {tau}")
    block_size = max_new_tokens if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    caps = list(range(block_size, max_new_tokens, block_size)) + [max_new_tokens]

    prompt_ids, stop_ids, pad_id, generator = sampling_inputs(model, tokenizer, prompts, num_samples, seed)
    cpu_generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def sample(prefixes, limits):
        return sample_continuations(model, prefixes, limits, tau, stop_ids, pad_id, generator)

    tokens, logps, stopped = [], [], []
    forward_tokens = proposals = accepted = 0
    total = len(prompt_ids) * len(caps) * (mcmc_steps + 1)
    with eval_mode(model), tqdm(total=total, desc="Power sampling", unit="chain-step", disable=not progress) as bar:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            n = len(chunk)
            y, lp, lq, done = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
            for cap in caps:
                # Draw (first block) or extend (later blocks) the chains that have not stopped
                grow = [i for i in range(n) if not done[i] and len(y[i]) < cap]
                if grow:
                    out = sample([chunk[i] + y[i] for i in grow], [cap - len(y[i]) for i in grow])
                    forward_tokens += out.forward_tokens
                    for j, i in enumerate(grow):
                        y[i] += out.tokens[j]
                        lp[i] += out.logps[j]
                        lq[i] += out.logqs[j]
                        done[i] = out.stopped[j]
                bar.update(n)
                for _ in range(mcmc_steps):
                    lengths = torch.tensor([len(s) for s in y], dtype=torch.float64)
                    t = (torch.rand(n, generator=cpu_generator, dtype=torch.float64) * lengths).long().tolist()
                    out = sample([chunk[i] + y[i][: t[i]] for i in range(n)], [cap - t[i] for i in range(n)])
                    forward_tokens += out.forward_tokens
                    log_u = torch.rand(n, generator=cpu_generator, dtype=torch.float64).log().tolist()
                    for i in range(n):
                        new_len = t[i] + len(out.tokens[i])
                        log_a = (
                            alpha * (sum(out.logps[i]) - sum(lp[i][t[i] :]))
                            + sum(lq[i][t[i] :])
                            - sum(out.logqs[i])
                            + math.log(len(y[i]))
                            - math.log(new_len)
                        )
                        proposals += 1
                        if log_u[i] < log_a:
                            accepted += 1
                            y[i] = y[i][: t[i]] + out.tokens[i]
                            lp[i] = lp[i][: t[i]] + out.logps[i]
                            lq[i] = lq[i][: t[i]] + out.logqs[i]
                            done[i] = out.stopped[i]
                    bar.update(n)
            tokens += y
            logps += [sum(row) for row in lp]
            stopped += done
    return PowerSamplingResult.from_rows(
        tokenizer,
        num_samples,
        tokens,
        logps,
        stopped,
        forward_tokens,
        proposals=proposals,
        accepted=accepted,
        acceptance_rate=accepted / proposals if proposals else float("nan"),
        proposal_temperature=tau,
    )
