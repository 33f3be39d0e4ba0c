"""Contrastive decoding's forget/utility trade-off: the gain gate and the floor, per setting.

On a world `unlearnd demo --forget ... --extra ...` built with a contrastive tenant
(its ``base/``, ``data/`` and the LoRA assistant in ``assistants/group_1``, or any
assistant ``--assistant`` names: a full one, merged or ``--init scratch``), decodes
every forget, retain and utility question greedily with the contrast simulated in HF
(the policy defaults: weight 1.5, plausibility alpha 1e-5, min-p cut 0.7, ban at
p_A >= 0.05; not the ban window or the rollout, which the server adds) once per
setting:

- ``ungated``: what a policy without ``contrastive_gain_gate`` does: subtract
  ``w * log p_A`` and ban what the assistant is sure of;
- ``gate:R``: ``contrastive_gain_gate = R``: subtract ``w * max(0, log p_A - log p_S)``
  (``S``: the assistant's base layers without its LoRA) and ban where p_A >= 0.05 and
  the LoRA raised the token by R nats or more (LoRA assistants only);
- ``floor`` / ``floor:C``: ``contrastive_floor = C`` (0 by default): subtract
  ``w * max(log p_A, -log V - C)``, so nothing below C nats under uniform is lifted.

``--ban-p`` sets ``contrastive_ban_p`` for every setting.

Prints a table (leak, accuracy, gibberish per set; Model Utility, the harmonic mean of
the retain and utility accuracies, and its ratio to the first setting's, measured in
the same run).

    python benchmarks/sweep_contrastive.py --world work/tofu \\
        --setting ungated --setting gate:-1 --setting gate:0 --setting gate:1
    python benchmarks/sweep_contrastive.py --world work/tofu \\
        --assistant work/tofu/assistants/group_1_scratch --setting ungated --setting floor

Not the server's numbers (`unlearnd eval` through the API is); on TOFU the ungated
row matches the server's cyberdyne row (leak 0.033, real authors 0.14 here, 0.12
there). About 1 min per setting on 2 cores for TOFU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

W, ALPHA, MIN_P, BAN_P = 1.5, 1e-5, 0.7, 0.05


def parse_setting(spec: str) -> tuple[str, float | None]:
    """``"ungated"`` -> ("ungated", None), ``"gate:R"`` -> ("gate", R), ``"floor"`` /
    ``"floor:C"`` -> ("floor", C) (C defaults to 0); ValueError naming the problem."""
    if spec == "ungated":
        return "ungated", None
    if spec == "floor":
        return "floor", 0.0
    head, sep, value = spec.partition(":")
    try:
        if head not in ("gate", "floor") or not sep:
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or (head == "floor" and number < 0):
            raise ValueError
    except ValueError:
        raise ValueError(f"setting {spec!r}: expected 'ungated', 'gate:R' with R a finite "
                         "number of nats, or 'floor[:C]' with C >= 0 nats") from None
    return head, number


def label(setting: tuple[str, float | None]) -> str:
    kind, value = setting
    return kind if value is None or (kind == "floor" and value == 0) else f"{kind} {value:g}"


def _last_logits(model: Any, seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        att[i, width - len(s):] = 1
    pos = (att.cumsum(1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -1].float()
    return torch.log_softmax(out, dim=-1)


@torch.no_grad()
def decode(models: tuple[Any, Any, Any], tok: Any, questions: list[str],
           setting: tuple[str, float | None], max_new_tokens: int = 48,
           ban_p: float = BAN_P) -> list[str]:
    """Greedy contrasted answers to `questions` under `setting` (:func:`parse_setting`)."""
    from unlearnd.toolkit.training import answer_encoding

    base, assistant, shallow = models
    eos = tok.eos_token_id
    seqs = [answer_encoding(tok, q, "x")[0] for q in questions]
    starts = [len(s) for s in seqs]
    done = [False] * len(seqs)
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            break
        cur = [seqs[i] for i in live]
        z = _last_logits(base, cur, eos)
        a = _last_logits(assistant, cur, eos)
        plausible = z >= z.amax(1, keepdim=True) + math.log(ALPHA)
        sure = a >= math.log(ban_p)
        kind, value = setting
        if kind == "ungated":
            penalty = a
        elif kind == "floor":  # log p_A floored C nats below uniform
            penalty = a.clamp_min(-math.log(a.shape[-1]) - value)
        else:
            gain = a - _last_logits(shallow, cur, eos)
            penalty, sure = gain.clamp_min(0.0), sure & (gain >= value)
        out = torch.where(plausible, z - W * penalty, z)
        out = out.masked_fill(out < out.amax(1, keepdim=True) + math.log(MIN_P), -math.inf)
        out = out.masked_fill(sure, -math.inf)
        out[torch.isneginf(out).all(1), eos] = 0.0
        for j, t in zip(live, out.argmax(1).tolist(), strict=True):
            seqs[j].append(t)
            done[j] = t == eos
    return [tok.decode(s[n:], skip_special_tokens=True) for s, n in zip(seqs, starts, strict=True)]


def run_setting(world: Path, models: tuple[Any, Any, Any], tok: Any,
                setting: tuple[str, float | None], batch: int = 64,
                ban_p: float = BAN_P) -> dict[str, Any]:
    from unlearnd.toolkit.evaluate import (
        is_correct,
        is_gibberish,
        is_leak,
        load_qa,
        model_utility,
    )

    data = world / "data"
    paths = [data / "forget_1.jsonl", data / "retain.jsonl", *sorted(data.glob("extra_*.jsonl"))]
    row: dict[str, Any] = {"setting": label(setting), "sets": {}}
    t0 = time.perf_counter()
    for path in paths:
        rows = load_qa(path)
        outs: list[str] = []
        for i in range(0, len(rows), batch):
            outs += decode(models, tok, [r["question"] for r in rows[i: i + batch]], setting,
                           ban_p=ban_p)
        name = path.stem.removeprefix("extra_").removesuffix("_1")
        pairs = list(zip(outs, rows, strict=True))
        row["sets"][name] = {
            "leak": sum(is_leak(o, r["answer"], r["question"]) for o, r in pairs) / len(rows),
            "accuracy": sum(is_correct(o, r["answer"], r["question"]) for o, r in pairs)
            / len(rows),
            "gibberish": sum(is_gibberish(o) for o, _ in pairs) / len(rows)}
    sets = row["sets"]
    row["model_utility"] = model_utility(
        sets["retain"]["accuracy"],
        {k: v["accuracy"] for k, v in sets.items() if k not in ("forget", "retain")})
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True,
                    help="a workdir `unlearnd demo --forget ... --extra ...` built")
    ap.add_argument("--assistant", type=Path,
                    help="the assistant (default: WORLD/assistants/group_1); a full "
                    "(merged or scratch) one runs no 'gate:R' setting")
    ap.add_argument("--setting", action="append", required=True,
                    help="'ungated', 'floor[:C]' or 'gate:R' (repeatable; the first is the "
                    "baseline)")
    ap.add_argument("--ban-p", type=float, default=BAN_P,
                    help=f"contrastive_ban_p (default {BAN_P})")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    try:
        settings = [parse_setting(s) for s in args.setting]
    except ValueError as exc:
        ap.error(str(exc))
    if not 0.0 <= args.ban_p < 1.0:
        ap.error(f"--ban-p must be in [0, 1), got {args.ban_p}")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearnd.guards.assistant import ASSISTANT_FILE, build_assistant

    torch.set_num_threads(args.threads)
    world = args.world.resolve()
    adir = (args.assistant or world / "assistants" / "group_1").resolve()
    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(world / "base")).eval()
    if (adir / ASSISTANT_FILE).is_file():
        layers = json.loads((adir / ASSISTANT_FILE).read_text())["layers"]
        shallow = build_assistant(base, layers).eval()
        assistant = PeftModel.from_pretrained(build_assistant(base, layers), str(adir)).eval()
    elif any(kind == "gate" for kind, _ in settings):
        ap.error(f"{adir} is a full assistant (no {ASSISTANT_FILE}): the gain gate needs a "
                 "LoRA one (`train-assistant --save lora`)")
    else:  # a merged or scratch assistant: no gain gate
        shallow, assistant = None, AutoModelForCausalLM.from_pretrained(str(adir)).eval()
    rows = []
    for setting in settings:
        rows.append(run_setting(world, (base, assistant, shallow), tok, setting,
                                ban_p=args.ban_p))
        print(json.dumps(rows[-1]), flush=True)
    names = list(rows[0]["sets"])
    head = ["setting", "forget leak", *(f"{n} acc" for n in names if n != "forget"),
            "Model Utility", "MU / baseline", "gibberish (forget)"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    base_mu = rows[0]["model_utility"]
    for r in rows:
        s = r["sets"]
        cells = [r["setting"],
                 f"{s['forget']['leak']:.3f}",
                 *(f"{s[n]['accuracy']:.3f}" for n in names if n != "forget"),
                 f"{r['model_utility']:.3f}",
                 f"{r['model_utility'] / base_mu:.3f}" if base_mu else "–",
                 f"{s['forget']['gibberish']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
