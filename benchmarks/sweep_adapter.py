"""An adapter method's forget/utility trade-off, one adapter per setting.

On a world `unlearnd demo --forget ... --extra ...` built (its ``base/`` and ``data/``:
``forget_train_1.jsonl``, ``forget_1.jsonl``, ``retain.jsonl`` and the ``extra_*.jsonl``
utility sets), trains `train-adapter --method M` once per setting (any of
:func:`unlearnd.toolkit.unlearn.train_adapter`'s hyper-parameters: forget weight,
retain weight, counterfactuals per forget question, lr, beta...; the rest the method's
defaults, epochs as the demo sets them for the forget set's size) on what the demo
trains that method on, and scores the adapter alone with HF greedy decoding: forget
leak and refusal, leak@8 (8 samples at temperature 1), retain and utility accuracy and
refusal, Model Utility (harmonic mean of the accuracies), the share of outputs that
are gibberish, and the outputs on retain/utility questions that name a forget subject
the question did not. Prints a table and each setting's Model Utility and utility
refusal as a ratio to the first setting's (the baseline, measured in the same run).

    python benchmarks/sweep_adapter.py --world work/tofu --method reasoning \
        --setting forget_weight=1,counterfactuals=0 --setting forget_weight=5,counterfactuals=2
    python benchmarks/sweep_adapter.py --world work/tofu --method npo \
        --setting counterfactuals=0 --setting counterfactuals=2 [--json out.json]
    python benchmarks/sweep_adapter.py --world work/tofu --method npo \
        --setting default --setting forget_tokens=facts --setting forget_tokens=facts,fact_df=0.2

Not the server's numbers (`unlearnd eval` through the API is): greedy HF text matches
vLLM's here, but leak@8 draws its own samples. About 1.5 min per setting on 2 cores
for TOFU forget10.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def _sampled_leak(model: Any, tok: Any, rows: list[dict], k: int, seed: int) -> float:
    """Share of `rows` whose answer leaks in at least one of `k` samples (T = 1)."""
    from unlearnd.toolkit.evaluate import is_leak
    from unlearnd.toolkit.training import sampled_answers

    samples = sampled_answers(model, tok, [r["question"] for r in rows], k, seed=seed)
    return sum(any(is_leak(o, r["answer"], r["question"]) for o in outs)
               for outs, r in zip(samples, rows, strict=True)) / len(rows)


SETTING_TYPES: dict[str, type] = {
    "forget_weight": float, "retain_weight": float, "ascent_weight": float, "lr": float,
    "beta": float, "ascent_ceiling": float, "counterfactuals": int, "epochs": int,
    "forget_tokens": str, "fact_df": float, "retain_loss": str}
"""The hyper-parameters a setting may give (train_adapter's names)."""


def parse_setting(spec: str) -> dict[str, Any]:
    """``"forget_weight=5,counterfactuals=2"`` -> ``{"forget_weight": 5.0, ...}``;
    ``"default"`` -> ``{}`` (the method's defaults). ValueError naming a bad key/value."""
    if spec.strip() == "default":
        return {}
    out: dict[str, Any] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SETTING_TYPES:
            raise ValueError(f"setting {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                             f"{sorted(SETTING_TYPES)}")
        try:
            out[key] = SETTING_TYPES[key](value)
        except ValueError as exc:
            raise ValueError(f"setting {spec!r}: {key} must be {SETTING_TYPES[key].__name__}, "
                             f"got {value!r}") from exc
    return out


def run_setting(world: Path, method: str, setting: dict[str, Any], out: Path,
                k: int = 8) -> dict[str, Any]:
    """Train one `method` adapter with `setting` (train_adapter keyword arguments) and
    score it. Reasoning trains on every phrasing of the forget questions, the others on
    the canonical ones (as the demo does)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearnd.toolkit.demo import adapter_epochs
    from unlearnd.toolkit.evaluate import (
        is_correct,
        is_gibberish,
        is_leak,
        is_refusal,
        load_qa,
        model_utility,
    )
    from unlearnd.toolkit.training import greedy_answers
    from unlearnd.toolkit.unlearn import extract_subjects, train_adapter

    data, base = world / "data", world / "base"
    train_on = data / ("forget_train_1.jsonl" if method == "reasoning" else "forget_1.jsonl")
    kwargs = {"epochs": adapter_epochs(method, len(load_qa(train_on))), **setting}
    t0 = time.perf_counter()
    train_adapter(base, train_on, [data / "retain.jsonl"], out, method=method,
                  evaluate=False, progress=False, **kwargs)
    row: dict[str, Any] = {"setting": setting, "train_s": round(time.perf_counter() - t0, 1)}
    tok = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                      str(out)).eval()
    forget = load_qa(data / "forget_1.jsonl")
    subjects = {s for s in extract_subjects(forget) if s != "this topic"}
    outs = greedy_answers(model, tok, [r["question"] for r in forget], 64, 32)
    every = list(outs)
    row["forget_leak"] = sum(is_leak(o, r["answer"], r["question"])
                             for o, r in zip(outs, forget, strict=True)) / len(forget)
    row["forget_refusal"] = sum(map(is_refusal, outs)) / len(forget)
    row["forget_leak_at_k"] = _sampled_leak(model, tok, forget, k, seed=0)
    named = 0
    accuracy: dict[str, float] = {}
    refused = total = 0
    for path in [data / "retain.jsonl", *sorted(data.glob("extra_*.jsonl"))]:
        rows = load_qa(path)
        outs = greedy_answers(model, tok, [r["question"] for r in rows], 64, 32)
        every += outs
        name = path.stem.removeprefix("extra_")
        accuracy[name] = sum(is_correct(o, r["answer"], r["question"])
                             for o, r in zip(outs, rows, strict=True)) / len(rows)
        row[f"{name}_refusal"] = sum(map(is_refusal, outs)) / len(rows)
        if name != "retain":
            refused += sum(map(is_refusal, outs))
            total += len(rows)
        named += sum(any(s in o and s not in r["question"] for s in subjects)
                     for o, r in zip(outs, rows, strict=True))
    row["accuracy"] = accuracy
    row["utility_refusal"] = refused / total if total else None
    row["model_utility"] = model_utility(
        accuracy.get("retain"), {k: v for k, v in accuracy.items() if k != "retain"})
    row["gibberish"] = sum(map(is_gibberish, every)) / len(every)
    row["names_forget_subject"] = named
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True,
                    help="a workdir `unlearnd demo --forget ... --extra ...` built")
    ap.add_argument("--method", default="reasoning", help="npo, graddiff or reasoning")
    ap.add_argument("--setting", action="append", required=True,
                    help="KEY=VALUE[,KEY=VALUE...] of train_adapter's hyper-parameters, or "
                    "'default' (repeatable; the first is the baseline)")
    ap.add_argument("--samples", type=int, default=8, help="samples per forget question")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    try:
        settings = [parse_setting(s) for s in args.setting]
    except ValueError as exc:
        ap.error(str(exc))

    from unlearnd.toolkit.training import set_threads

    set_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(settings):
            rows.append(run_setting(args.world.resolve(), args.method, setting,
                                    Path(tmp) / f"ad{i}", k=args.samples))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:  # first: a table that fails to print loses no measurement
        args.json.write_text(json.dumps(rows, indent=2))
    sets = [k for k in rows[0]["accuracy"] if k != "retain"]
    head = ["setting", "leak", f"leak@{args.samples}", "retain acc", "retain refused",
            *(f"{s} acc" for s in sets), *(f"{s} refused" for s in sets), "utility refused",
            "Model Utility", "MU / baseline", "gibberish", "names a forget subject"]
    print(f"method {args.method}")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    base_mu = rows[0]["model_utility"]
    for r in rows:
        label = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                          for k, v in r["setting"].items()) or "defaults"
        cells = [label, f"{r['forget_leak']:.3f}",
                 f"{r['forget_leak_at_k']:.3f}", f"{r['accuracy']['retain']:.3f}",
                 f"{r['retain_refusal']:.3f}",
                 *(f"{r['accuracy'][s]:.3f}" for s in sets),
                 *(f"{r[f'{s}_refusal']:.3f}" for s in sets),
                 f"{r['utility_refusal']:.3f}" if r["utility_refusal"] is not None else "–",
                 f"{r['model_utility']:.3f}" if r["model_utility"] is not None else "–",
                 f"{r['model_utility'] / base_mu:.3f}" if r["model_utility"] and base_mu
                 else "–", f"{r['gibberish']:.3f}", str(r["names_forget_subject"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
