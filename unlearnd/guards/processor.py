"""The vLLM logits processor that applies a request's unlearning policy in the engine.

Per request, ``SamplingParams.extra_args`` carries (see docs/ARCHITECTURE.md):
``unlearnd_policy_dir`` (absent: the request is untouched), ``unlearnd_version``,
``unlearnd_in_scope`` (0/1), ``unlearnd_item`` (-1 or a forget item index),
``unlearnd_refusal_ids`` (token ids of the rendered refusal), ``unlearnd_mentioned``
(items the conversation names) and ``unlearnd_assist_prompt`` (for contrastive
policies: the conversation as the assistant was trained to read it, every text of it in
one user turn, so a question put in a system message, Responses ``instructions`` or an
earlier turn is read as a question; the base still reads the real prompt).

Each step, for every guarded row:

- in scope with ``refusal`` on: :class:`RefusalSteering` names the next refusal token
  (EOS at the end) and the row is *forced* onto it: that logit becomes 0, every other
  ``-inf``; such a row gets no firewall ban and no contrast (the refusal is our text);
- ``firewall`` on: the :class:`LeakFirewall` bans tokens continuing a distinctive
  span; a *suppression* is counted when the banned set holds the row's argmax as
  the logits arrived (``GuardBatch.suppressions``);
- ``contrastive`` on: the policy's assistant model gives its next-token logits
  (:func:`unlearnd.guards.assistant.get_runner`, rows batched per assistant) and the
  row is contrasted with weight ``contrastive_weight`` and plausibility
  ``contrastive_alpha``; tokens the assistant itself gives ``contrastive_ban_p`` or
  more become ``-inf`` (its confident tokens are the forget facts: a ban no client
  bias or mask outweighs, where the contrast is a shift that a large enough
  ``logit_bias`` can); then tokens below ``contrastive_min_p`` times the contrasted
  row's most likely token become ``-inf`` (a cut the client's temperature cannot undo).
  All of this is decided on the model's own scores: the client's ``logit_bias``,
  which vLLM added before us, is taken off the row first and put back after the
  cuts, so it can choose among the tokens the policy left plausible but never push
  the row outside them (neither +100 on a guessed answer nor -100 on the policy's
  own words, which used to send the base off the path the assistant knows: "in in
  Gdańsk"). ``-100`` there is a ban, as OpenAI documents it; a row whose plausible
  tokens the client banned all ends (EOS). Masks cannot be taken off (the
  allowed-token list, bad words and min-tokens leave ``-inf``, the scores are gone), so
  the edge refuses them for contrastive policies (``edge.contrastive_refused``); a
  structured-output grammar is such a mask too (not covered: docs/RELIABILITY.md §6).

Bans and contrast go through ONE call of the fused kernel
(:func:`unlearnd.kernels.contrastive.unlearning_logits_`) on the gathered guarded rows
(in place on the whole batch when every row is guarded), scattered back after; forced
rows are overwritten with a one-hot row. Unguarded rows are never touched
(bit-identical).

Policy decisions are hard constraints, applied last. vLLM's V1 sampler runs the
allowed-token mask, bad words and its built-in processors (min-tokens, the client's
``logit_bias``) *before* custom processors, and penalties, temperature, min-p and
top-k/top-p after; those later steps never turn ``-inf`` into a finite logit nor
demote a row's only finite logit, so neither a forced token nor a ban can be undone
by any client parameter. A guarded row left with no finite logit at all (a client's
allowed-token list that only holds banned tokens) is forced to EOS: the policy wins.
Logprobs are vLLM's ``processed_logprobs`` (set by :mod:`unlearnd.serve.engine`), so
what the client sees is this distribution, not the model's own.

Fail closed: a row whose policy cannot be loaded, or whose preparation raises, or a
batch whose kernel call raises, gets every logit ``-inf`` except EOS (so the request
ends at once, never with unguarded text); it is logged; ``apply`` never raises.

The bookkeeping and the work live in :class:`GuardBatch`, which knows nothing of vLLM
(add/remove/move/swap/apply on plain values), so it is unit-tested with fakes and can
back an adapter for vLLM's Model Runner V2 later. :class:`UnlearningLogitsProcessor`
is the thin V1 adapter. On GPU we pin ``VLLM_USE_V2_MODEL_RUNNER=0`` for now (Model
Runner V2 rejects V1 logits processors); on CPU vLLM uses V1 anyway.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from unlearnd.guards.firewall import FirewallState, LeakFirewall
from unlearnd.guards.policy import CompiledPolicy
from unlearnd.guards.refusal import RefusalSteering, refusal_token_ids
from unlearnd.guards.signing import SIG_KEY, env_key, verify

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

__all__ = ["GuardBatch", "UnlearningLogitsProcessor", "validate_extra_args", "EXTRA_KEYS"]

EXTRA_KEYS = ("unlearnd_policy_dir", "unlearnd_version", "unlearnd_in_scope",
              "unlearnd_item", "unlearnd_refusal_ids", "unlearnd_mentioned",
              "unlearnd_assist_prompt", SIG_KEY)

_keys = itertools.count(1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_extra_args(extra: dict[str, Any] | None) -> None:
    """Raise ValueError naming the bad ``unlearnd_*`` value (HTTP 400 in vLLM's server)."""
    if not extra or "unlearnd_policy_dir" not in extra:
        return
    d = extra["unlearnd_policy_dir"]
    if not isinstance(d, str) or not d:
        raise ValueError(f"unlearnd_policy_dir must be a non-empty str, got {d!r}")
    v = extra.get("unlearnd_version", "")
    if not isinstance(v, str):
        raise ValueError(f"unlearnd_version must be a str, got {v!r}")
    s = extra.get("unlearnd_in_scope", 0)
    if not (isinstance(s, bool) or (_is_int(s) and s in (0, 1))):
        raise ValueError(f"unlearnd_in_scope must be 0 or 1, got {s!r}")
    it = extra.get("unlearnd_item", -1)
    if not _is_int(it) or it < -1:
        raise ValueError(f"unlearnd_item must be an int >= -1, got {it!r}")
    for key in ("unlearnd_refusal_ids", "unlearnd_mentioned", "unlearnd_assist_prompt"):
        ids = extra.get(key, [])
        if not isinstance(ids, list | tuple) or any(not _is_int(t) or t < 0 for t in ids):
            raise ValueError(f"{key} must be a list of ints >= 0, got {ids!r}")


@dataclass
class _Row:
    """One guarded request in the persistent batch."""

    key: int
    policy_dir: str
    version: str
    in_scope: bool
    item: int
    prompt_ids: list[int]
    output_ids: Sequence[int]  # live reference to the request's output list
    mentioned: tuple[int, ...] = ()
    # what the ULD assistant reads instead of the prompt (None: the prompt itself)
    assist_prompt: list[int] | None = None
    policy: CompiledPolicy | None = None
    steering: RefusalSteering | None = None
    firewall: FirewallState | None = None
    assistant_dir: str | None = None
    failed: str | None = None
    runners: set[str] = field(default_factory=set)
    # contrastive_ban_p: fact tokens the assistant was sure of (and its continuation of
    # them), banned until the output reaches the given length
    fact_bans: dict[int, int] = field(default_factory=dict)
    # the client's logit_bias (token ids, values), which vLLM added before us: a
    # contrasted row's plausible set is decided on the model's own scores
    bias: tuple[list[int], list[float]] | None = None


def _default_kernel() -> Callable[..., torch.Tensor]:
    from unlearnd.kernels.contrastive import unlearning_logits_

    return unlearning_logits_


def _default_runner(model_dir: str, device: str) -> Any:
    from unlearnd.guards.assistant import get_runner

    return get_runner(model_dir, device=device)


class GuardBatch:
    """Engine-agnostic per-row guard state and the per-step work.

    Args:
        default_eos: EOS id for rows whose policy cannot tell (fail closed); None if
            unknown (then token 0 is the only one left).
        device: device of the logits (assistant runners are placed there).
        kernel: the fused op (default ``unlearning_logits_``), injectable for tests.
        runner_factory: ``(model_dir, device) -> AssistantRunner`` (default
            ``get_runner``).
        key: when set, every request must carry ``unlearnd_*`` arguments signed with
            it (:mod:`unlearnd.guards.signing`); any other request, with a client's own
            arguments or none at all (beam search), is forced to EOS. None: arguments
            are trusted as they come (unit tests, offline use).
    """

    def __init__(self, default_eos: int | None = None, device: torch.device | str = "cpu",
                 kernel: Callable[..., torch.Tensor] | None = None,
                 runner_factory: Callable[[str, str], Any] | None = None,
                 key: bytes | None = None) -> None:
        if default_eos is not None and (not _is_int(default_eos) or default_eos < 0):
            raise ValueError(f"default_eos must be an int >= 0 or None, got {default_eos!r}")
        self.default_eos = default_eos
        self.device = torch.device(device)
        self._kernel = kernel
        self._runner_factory = runner_factory or _default_runner
        self.rows: dict[int, _Row] = {}
        self.suppressions = 0
        """Steps at which the firewall banned the row's argmax (see module docstring)."""
        self.fail_closed = 0
        """Row-steps forced to EOS because something failed."""
        self.key = key

    # ------------------------------------------------------------ bookkeeping

    def add(self, index: int, extra: dict[str, Any] | None, prompt_ids: Sequence[int] | None,
            output_ids: Sequence[int], logit_bias: dict[int, float] | None = None) -> None:
        """A request now occupies row ``index`` (replacing whatever was there);
        ``logit_bias`` is its ``SamplingParams.logit_bias`` (already in the logits)."""
        self.remove(index)
        if self.key is not None and not verify(extra, self.key):
            row = _Row(key=next(_keys), policy_dir="", version="", in_scope=False, item=-1,
                       prompt_ids=[], output_ids=output_ids,
                       failed="its unlearnd arguments were not issued by the tenant edge "
                       "(missing or bad signature)")
            self.rows[index] = row
            logger.error("unlearnd: request %s fails closed: %s", row.key, row.failed)
            return
        if not extra or "unlearnd_policy_dir" not in extra:
            return
        row = _Row(key=next(_keys), policy_dir=str(extra.get("unlearnd_policy_dir")),
                   version=str(extra.get("unlearnd_version", "")),
                   in_scope=bool(extra.get("unlearnd_in_scope", 0)),
                   item=int(extra.get("unlearnd_item", -1)) if _is_int(
                       extra.get("unlearnd_item", -1)) else -1,
                   prompt_ids=list(prompt_ids or ()), output_ids=output_ids,
                   mentioned=tuple(int(i) for i in extra.get("unlearnd_mentioned") or ()
                                   if _is_int(i)))
        if logit_bias:
            toks = [int(t) for t in logit_bias]
            row.bias = (toks, [float(logit_bias[t]) for t in logit_bias])
        self.rows[index] = row
        try:
            validate_extra_args(extra)
            self._prepare(row, list(extra.get("unlearnd_refusal_ids") or ()), extra)
        except Exception as exc:  # noqa: BLE001 - fail closed, never raise
            row.failed = f"{type(exc).__name__}: {exc}"
            logger.error("unlearnd: request %s (policy %s) fails closed: %s", row.key,
                         row.policy_dir, row.failed)

    def _prepare(self, row: _Row, refusal_ids: list[int],
                 extra: dict[str, Any] | None = None) -> None:
        pol = CompiledPolicy.load(row.policy_dir)
        row.policy = pol
        if row.version and row.version.split("@")[-1] not in (pol.version, row.version):
            logger.debug("policy version %s vs compiled %s", row.version, pol.version)
        mech = pol.mechanisms
        if row.in_scope and "refusal" in mech:
            if not refusal_ids:
                from unlearnd.guards.scope import ScopeDecision

                # never name the subject here: the engine does not know whether the
                # user did (the API process always sends the ids it rendered)
                refusal_ids = refusal_token_ids(pol, ScopeDecision(
                    True, 1.0, -1, None, "The request falls under this policy."))
            row.steering = RefusalSteering(refusal_ids, pol.eos_token_id)
            return
        if "firewall" in mech:
            active = {i for i in (row.item, *row.mentioned) if 0 <= i < len(pol.items)}
            row.firewall = LeakFirewall.from_policy(pol).new_state(row.prompt_ids, active)
        if "contrastive" in mech:
            if pol.assistant_dir is None:
                raise ValueError(f"policy {pol.dir} has 'contrastive' but no assistant/")
            row.assistant_dir = str(pol.assistant_dir)
            ap = extra.get("unlearnd_assist_prompt") if extra else None
            row.assist_prompt = [int(t) for t in ap] if ap else None

    def remove(self, index: int) -> None:
        """The request at row ``index`` left the batch."""
        row = self.rows.pop(index, None)
        if row is not None:
            for d in row.runners:
                try:
                    self._runner_factory(d, str(self.device)).free(row.key)
                except Exception:  # noqa: BLE001
                    logger.exception("freeing assistant cache of request %s", row.key)

    def move(self, src: int, dst: int, swap: bool = False) -> None:
        """Row ``src`` moves to ``dst`` (overwriting it), or the two swap."""
        a = self.rows.pop(src, None)
        b = self.rows.pop(dst, None)
        if a is not None:
            self.rows[dst] = a
        if swap and b is not None:
            self.rows[src] = b
        elif not swap and b is not None:
            logger.debug("row %d overwritten by a move from %d", dst, src)

    def update(self, removed: Sequence[int], added: Sequence[tuple[int, Any, Any, Any]],
               moved: Sequence[tuple[int, int, bool]]) -> None:
        """One batch change, in vLLM's order: removed, added (index, extra, prompt,
        output[, logit_bias]), moved (src, dst, is_swap)."""
        for i in removed:
            self.remove(i)
        for index, extra, prompt, output, *bias in added:
            self.add(index, extra, prompt, output, *bias)
        for src, dst, swap in moved:
            self.move(src, dst, swap)

    # ------------------------------------------------------------ apply

    def _eos_only(self, logits: torch.Tensor, r: int, row: _Row | None, why: str) -> None:
        logits[r].fill_(float("-inf"))
        logits[r, self._eos_of(row, logits.shape[1])] = 0.0
        self.fail_closed += 1
        logger.error("unlearnd: row %d (request %s) fails closed: %s", r,
                     row.key if row else "?", why)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply every guarded row's policy to ``logits`` `[batch, vocab]` in place."""
        if not self.rows:
            return logits
        n, vocab = logits.shape
        work: list[int] = []
        bans: list[list[int]] = []
        contrast: list[tuple[int, _Row] | None] = []
        forced: list[tuple[int, int]] = []
        eos: list[int] = []
        for r in sorted(self.rows):
            if r >= n:
                continue
            row = self.rows[r]
            try:
                if row.failed is not None:
                    self._eos_only(logits, r, row, row.failed)
                    continue
                if row.steering is not None:
                    tok = row.steering.step(row.output_ids)
                    if not 0 <= tok < vocab:
                        self._eos_only(logits, r, row, f"refusal token {tok} outside the "
                                       f"vocabulary ({vocab})")
                    else:
                        forced.append((r, tok))
                    continue
                banned: list[int] = []
                if row.firewall is not None:
                    row.firewall.feed(row.output_ids)
                    bs = row.firewall.banned()
                    if bs:
                        banned = [t for t in bs if t < vocab]
                        if banned and int(torch.argmax(logits[r])) in bs:
                            self.suppressions += 1
                if row.fact_bans:
                    n_out = len(row.output_ids)
                    row.fact_bans = {t: u for t, u in row.fact_bans.items() if n_out <= u}
                    banned = banned + [t for t in row.fact_bans if t < vocab]
                work.append(r)
                bans.append(banned)
                contrast.append((r, row) if row.assistant_dir is not None else None)
                eos.append(self._eos_of(row, vocab))
            except Exception as exc:  # noqa: BLE001 - fail closed, never raise
                self._eos_only(logits, r, row, f"{type(exc).__name__}: {exc}")
        if forced:
            try:
                _force(logits, forced)
            except Exception as exc:  # noqa: BLE001 - fail closed, never raise
                for r, _ in forced:
                    self._eos_only(logits, r, self.rows.get(r), f"forcing: {exc}")
        if not work:
            return logits
        try:
            self._run_kernel(logits, work, bans, contrast, eos)
        except Exception as exc:  # noqa: BLE001 - fail closed, never raise
            for r in work:
                self._eos_only(logits, r, self.rows.get(r), f"kernel: {exc}")
        return logits

    def _eos_of(self, row: _Row | None, vocab: int) -> int:
        """The row's EOS id (its policy's, else the model's; 0 when neither fits)."""
        eos = row.policy.eos_token_id if row is not None and row.policy is not None \
            else self.default_eos
        return eos if eos is not None and 0 <= eos < vocab else 0

    def _run_kernel(self, logits: torch.Tensor, work: list[int], bans: list[list[int]],
                    contrast: list[tuple[int, _Row] | None], eos: list[int]) -> None:
        from unlearnd.kernels.contrastive import pack_banned

        kernel = self._kernel or _default_kernel()
        n, vocab = logits.shape
        dev = logits.device
        whole = work == list(range(n))
        sub = logits if whole else logits[torch.tensor(work, device=dev)]
        kwargs: dict[str, Any] = {}
        min_p: torch.Tensor | None = None
        if any(c is not None for c in contrast):
            assist = torch.zeros((len(work), vocab), dtype=torch.float32, device=dev)
            weight = torch.zeros(len(work), dtype=torch.float32)
            alpha = torch.zeros(len(work), dtype=torch.float32)
            ban_at = torch.full((len(work),), math.inf, dtype=torch.float32)
            # rows batched per runner: policies with the same assistant content share one
            # (the factory is asked once per assistant dir and step, not once per row)
            by_dir: dict[str, Any] = {}
            groups: dict[int, tuple[Any, str, list[tuple[int, _Row]]]] = {}
            for pos, c in enumerate(contrast):
                if c is not None:
                    adir = c[1].assistant_dir or ""
                    if adir not in by_dir:
                        by_dir[adir] = self._runner_factory(adir, str(dev))
                    runner = by_dir[adir]
                    groups.setdefault(id(runner), (runner, adir, []))[2].append((pos, c[1]))
            for runner, adir, members in groups.values():
                reqs = []
                for _pos, row in members:
                    row.runners.add(adir)
                    head = row.prompt_ids if row.assist_prompt is None else row.assist_prompt
                    reqs.append((row.key, [*head, *row.output_ids]))
                # Log-probabilities, not raw logits: the contrast must not depend on the
                # assistant's arbitrary logit offset (a uniform assistant then shifts
                # every plausible token alike and changes nothing).
                a = torch.log_softmax(runner.logits(reqs).float(), dim=-1)
                width = min(int(a.shape[1]), vocab)
                gates = [_gain_gate(row) for _pos, row in members]
                floors = [_floor(row) for _pos, row in members]
                gain = self._lora_gain(runner, a, reqs, gates)
                # a gated row contrasts what the LoRA added (never below 0), a floored
                # row log p_A no lower than C nats below uniform, the others log p_A
                contrasted = a
                if any(f is not None for f in floors):
                    low = torch.tensor([-math.inf if f is None else -math.log(width) - f
                                        for f in floors], device=a.device)
                    contrasted = torch.maximum(a, low.unsqueeze(1))
                if gain is not None:
                    contrasted = torch.where(
                        torch.tensor([g is not None for g in gates], device=a.device)
                        .unsqueeze(1), gain.clamp_min(0.0), contrasted)
                if width < vocab:
                    for p, g in zip((p for p, _ in members), gates, strict=True):
                        assist[p, width:] = 0.0 if g is not None else -math.log(width)
                idx = torch.tensor([p for p, _ in members], device=dev)
                assist[idx, :width] = contrasted[:, :width].to(device=dev, dtype=torch.float32)
                sure_rows: list[tuple[int, int, _Row, float, float | None, bool]] = []
                for i, ((pos, row), gate, floor) in enumerate(
                        zip(members, gates, floors, strict=True)):
                    pol = row.policy
                    weight[pos] = float(pol.setting("contrastive_weight", 1.5)) if pol else 0.0
                    alpha[pos] = float(pol.setting("contrastive_alpha", 1e-5)) if pol else 0.0
                    # policies compiled before the setting existed keep their behaviour
                    ban_p = float(pol.setting("contrastive_ban_p", 0.0)) if pol else 0.0
                    if ban_p > 0:
                        # a gated or floored row's sure tokens are banned by list
                        # (_ban_facts): the kernel's assist_ban sees the contrasted
                        # values (the gain, or log p floored), not log p
                        listed = gate is not None or floor is not None
                        if not listed:
                            ban_at[pos] = math.log(ban_p)
                        sure_rows.append((i, pos, row, math.log(ban_p), gate, listed))
                if sure_rows:
                    self._ban_facts(runner, a[:, :width], sure_rows, reqs, bans, sub, eos,
                                    None if gain is None else gain[:, :width])
            kwargs.update(assist=assist, weight=weight.to(dev), alpha=alpha.to(dev))
            if bool(torch.isfinite(ban_at).any()):
                kwargs["assist_ban"] = ban_at.to(dev)
            cut = [float(c[1].policy.setting("contrastive_min_p", 0.0)) if c is not None
                   and c[1].policy is not None else 0.0 for c in contrast]
            if any(v > 0 for v in cut):
                min_p = torch.tensor(cut, dtype=torch.float32)
        if any(bans):
            kwargs["banned"] = pack_banned(bans, vocab, dev)
        bias = _client_bias(contrast, vocab, dev)
        if bias is not None:  # the model's own scores decide what is plausible
            sub[bias[0], bias[1]] -= bias[2]
        out = kernel(sub, **kwargs)
        if min_p is not None:
            _min_p_cut_(out, min_p.to(dev))
        if bias is not None:
            _rebias_(out, *bias)
        _eos_if_dead_(out, torch.tensor(eos, dtype=torch.long, device=dev))
        if not whole:
            logits[torch.tensor(work, device=dev)] = out

    @staticmethod
    def _lora_gain(runner: Any, a: torch.Tensor, reqs: list[tuple[int, list[int]]],
                   gates: list[float | None]) -> torch.Tensor | None:
        """``log p_A - log p_S`` for the rows with a ``contrastive_gain_gate`` (``S``:
        the assistant's base layers without its LoRA, :meth:`AssistantRunner.shallow`),
        0 on the other rows; None when no row has a gate."""
        rows = [i for i, g in enumerate(gates) if g is not None]
        if not rows:
            return None
        s = torch.log_softmax(runner.shallow().logits([reqs[i] for i in rows]).float(), dim=-1)
        gain = torch.zeros_like(a)
        width = min(int(s.shape[1]), int(a.shape[1]))
        gain[rows, :width] = a[rows, :width] - s[:, :width].to(a.device)
        return gain

    def _ban_facts(self, runner: Any, a: torch.Tensor,
                   sure_rows: list[tuple[int, int, _Row, float, float | None, bool]],
                   reqs: list[tuple[int, list[int]]], bans: list[list[int]],
                   sub: torch.Tensor, eos: list[int],
                   gain: torch.Tensor | None = None) -> None:
        """Where the assistant is sure of a token (``log p >= log contrastive_ban_p``:
        a forget fact), ban the fact's rest too: the assistant's own greedy
        continuation (:meth:`AssistantRunner.rollout`) from now on, and every one of
        these tokens for the next ``contrastive_ban_window`` output tokens (the sure
        tokens themselves are the kernel's ``assist_ban`` this step). That ban
        only stops the token the assistant is sure of *now*; skipping it
        (" Laurel Prize" for " Cobalt Laurel Prize") or stuttering ("in in Gdańsk")
        would put the base back on the fact where the assistant, off its training
        text, no longer recognises it. With a gain gate (``gain``: :meth:`_lora_gain`)
        a token is sure only where the LoRA also raised it by the gate, and the sure
        tokens themselves are banned here (the kernel does not see them), and so are a
        floored row's (``contrastive_floor``: the kernel sees log p floored). One host
        sync per step (the row maxima)."""
        idx = torch.tensor([i for i, *_ in sure_rows], device=a.device)
        thr = torch.tensor([r[3] for r in sure_rows], device=a.device)
        hit = a[idx] >= thr.unsqueeze(1)
        if gain is not None:
            gate = torch.tensor([-math.inf if r[4] is None else r[4] for r in sure_rows],
                                device=a.device)
            hit &= gain[idx] >= gate.unsqueeze(1)
        flags = hit.any(dim=1).tolist()
        for (i, pos, row, t, g, listed), flag, h in zip(sure_rows, flags, hit, strict=True):
            if not flag:
                continue
            pol = row.policy
            window = int(pol.setting("contrastive_ban_window", 0)) if pol else 0
            sure = [int(x) for x in torch.nonzero(h).flatten().tolist()]
            # from the surest token it bans (with a gate, not the name any text completes)
            first = int(torch.argmax(a[i].masked_fill(~h, -math.inf)))
            cont = runner.rollout(reqs[i][0], reqs[i][1], first, window,
                                  t, **({} if g is None else {"gain_gate": g})) \
                if window > 0 else []
            until = len(row.output_ids) + window
            new = [x for x in (*sure, *cont) if x != eos[pos] and x < sub.shape[1]]
            for x in new:
                row.fact_bans[x] = max(row.fact_bans.get(x, 0), until)
            bans[pos] = sorted({*bans[pos], *(x for x in new if listed or x not in sure)})
            if int(torch.argmax(sub[pos])) in new:
                self.suppressions += 1


def _gain_gate(row: _Row) -> float | None:
    """The row's policy's ``contrastive_gain_gate`` (None: contrast log p as always)."""
    gate = row.policy.setting("contrastive_gain_gate") if row.policy is not None else None
    return None if gate is None else float(gate)


def _floor(row: _Row) -> float | None:
    """The row's policy's ``contrastive_floor`` (None: log p_A is not floored)."""
    floor = row.policy.setting("contrastive_floor") if row.policy is not None else None
    return None if floor is None else float(floor)


def _force(logits: torch.Tensor, forced: list[tuple[int, int]]) -> None:
    """Rows ``forced[i][0]`` become one-hot on token ``forced[i][1]``: that logit 0,
    every other ``-inf`` (whatever came before: bias, masks, the model)."""
    dev = logits.device
    rows = torch.tensor([r for r, _ in forced], dtype=torch.long, device=dev)
    toks = torch.tensor([t for _, t in forced], dtype=torch.long, device=dev)
    logits.index_fill_(0, rows, float("-inf"))
    logits[rows, toks] = 0.0


def _client_bias(contrast: list[tuple[int, _Row] | None], vocab: int, dev: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(positions, token ids, values) of the contrasted rows' ``logit_bias``, or None."""
    pos: list[int] = []
    toks: list[int] = []
    vals: list[float] = []
    for p, c in enumerate(contrast):
        if c is not None and c[1].bias is not None:
            for t, v in zip(*c[1].bias, strict=True):
                if 0 <= t < vocab and v != 0.0:
                    pos.append(p)
                    toks.append(t)
                    vals.append(v)
    if not pos:
        return None
    return (torch.tensor(pos, device=dev), torch.tensor(toks, device=dev),
            torch.tensor(vals, dtype=torch.float32, device=dev))


def _rebias_(z: torch.Tensor, pos: torch.Tensor, toks: torch.Tensor,
             vals: torch.Tensor) -> None:
    """In place: the client's ``logit_bias`` back on a contrasted row, *after* the
    policy's cuts, so it chooses among the tokens the policy left finite and never
    revives one (``-inf + v`` stays ``-inf``). ``-100``, the most vLLM accepts, is
    the ban OpenAI documents it as: with only banned tokens left, the row ends (EOS),
    where vLLM would emit the one finite token."""
    cur = z[pos, toks]
    z[pos, toks] = torch.where(vals <= -100.0, torch.full_like(cur, float("-inf")),
                               cur + vals.to(z.dtype))


def _min_p_cut_(z: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: ``z[i, x] = -inf`` where ``p_i(x) < min_p[i] * max_x p_i(x)``
    (``z >= zmax + log(min_p)`` keeps; rows with ``min_p = 0`` are untouched)."""
    zmax = z.max(dim=1, keepdim=True).values.float()
    thresh = zmax + torch.log(min_p.clamp_min(1e-30)).unsqueeze(1)
    keep = (z.float() >= thresh) | (min_p <= 0).unsqueeze(1)
    z.masked_fill_(~keep, float("-inf"))


def _eos_if_dead_(z: torch.Tensor, eos: torch.Tensor) -> None:
    """In place, no host sync: a row with no finite logit gets ``z[eos] = 0`` (the
    policy's bans met a client mask that allowed nothing else: end, never leak)."""
    dead = torch.isneginf(z).all(dim=1, keepdim=True)
    idx = eos.unsqueeze(1)
    cur = z.gather(1, idx)
    z.scatter_(1, idx, torch.where(dead, torch.zeros_like(cur), cur))


def _find_eos(vllm_config: Any) -> int | None:
    """The served model's EOS id from vLLM's config (hf config, generation config,
    tokenizer), None when nothing says."""
    mc = getattr(vllm_config, "model_config", None)
    if mc is None:
        return None
    for cfg in (getattr(mc, "hf_config", None), getattr(mc, "hf_text_config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, list | tuple) and eos:
            eos = eos[0]
        if _is_int(eos):
            return int(eos)
    for loader in ("generation", "tokenizer"):
        try:
            if loader == "generation":
                from transformers import GenerationConfig

                eos = GenerationConfig.from_pretrained(str(mc.model)).eos_token_id
            else:
                from transformers import AutoTokenizer

                eos = AutoTokenizer.from_pretrained(str(getattr(mc, "tokenizer", None)
                                                        or mc.model)).eos_token_id
            if isinstance(eos, list | tuple) and eos:
                eos = eos[0]
            if _is_int(eos):
                return int(eos)
        except Exception:  # noqa: BLE001
            continue
    return None


class UnlearningLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor applying ``unlearnd_*`` per-request policies."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """At submission, in the serving process: arguments the edge did not issue are
        refused (a 400 there; the engine would force EOS on them anyway)."""
        extra = getattr(sampling_params, "extra_args", None)
        key = env_key()
        if key is not None and not verify(extra, key):
            raise ValueError("this request's generation path is not covered by the tenant "
                             "edge (unsigned unlearnd arguments); it was not served")
        validate_extra_args(extra)

    def __init__(self, vllm_config: VllmConfig, device: torch.device,
                 is_pin_memory: bool) -> None:
        eos = None
        try:
            eos = _find_eos(vllm_config)
        except Exception:  # noqa: BLE001
            logger.exception("could not find the model's EOS id")
        if eos is None:
            logger.warning("unlearnd: no EOS id in the model config; fail-closed rows use 0")
        key = env_key()
        if key is None:
            logger.warning("unlearnd: no %s in the environment: per-request arguments are "
                           "not authenticated (only `unlearnd serve` sets it)", "signing key")
        self.batch = GuardBatch(default_eos=eos, device=device, key=key)

    def is_argmax_invariant(self) -> bool:
        """Forced refusals, bans and contrast all change the argmax."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        try:
            self.batch.update(
                batch_update.removed,
                [(i, getattr(p, "extra_args", None), prompt, out,
                  getattr(p, "logit_bias", None))
                 for i, p, prompt, out in batch_update.added],
                [(a, b, d == MoveDirectionality.SWAP) for a, b, d in batch_update.moved])
        except Exception:  # noqa: BLE001 - bookkeeping must not take the engine down
            logger.exception("unlearnd: batch update failed")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        try:
            return self.batch.apply(logits)
        except Exception:  # noqa: BLE001 - never raise out of apply
            logger.exception("unlearnd: apply failed; guarded rows fail closed")
            for r, row in list(self.batch.rows.items()):
                if r < logits.shape[0]:
                    self.batch._eos_only(logits, r, row, "apply failed")
            return logits
