"""What a contrastive tenant costs in the engine process: merged assistants against LoRAs
over one shared copy of the base's first K layers.

One run, in two child processes (so each starts from the same empty state):

- **merged**: ``--tenants`` assistants as ``train-assistant`` writes them by default,
  each a full copy of the base's first K layers with its LoRA merged in, loaded through
  :func:`unlearnd.guards.assistant.get_runner` as the engine does;
- **shared**: the same assistants saved as ``--save lora`` writes them (``assistant.json``
  + the LoRA only), loaded the same way: one copy of the K layers, each tenant's LoRA
  attached unmerged;
- **scratch**: ``--tenants`` scratch assistants (``train-assistant``'s default: K random
  layers, different per tenant, over the base's embeddings and head), loaded the same
  way, whose runners keep one copy of the embeddings and head
  (``share_lexical_weights``), and the same with that sharing off (the baseline).
  ``--vocab`` widens the base's vocabulary (random rows), where that copy is what costs.

Each tenant's LoRA is a random rank-``--rank`` LoRA on every linear layer of the K-layer
assistant and its head (the layers ``train-assistant`` trains), different per tenant;
each runner also answers one prefill so lazily built state exists. Table: resident
memory after loading 1 and ``--tenants`` assistants, the growth per extra tenant, the
size of one LoRA's tensors, and the ratio growth / LoRA size (goal: about 1 for shared).

    python benchmarks/bench_assistant_memory.py                 # 8 tenants, 4-layer base
    python benchmarks/bench_assistant_memory.py --hidden 1024 --layers 8 --tenants 16
    python benchmarks/bench_assistant_memory.py --vocab 32000   # where scratch ones cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE") / 2**20


def make_assistants(base: Path, root: Path, n: int, layers: int, rank: int) -> dict:
    """n (merged dir, lora dir) pairs of random LoRAs over the base's first `layers`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from unlearnd.guards.assistant import ASSISTANT_FILE, ASSISTANT_FORMAT, build_assistant
    from unlearnd.toolkit.assistant_train import TARGET_MODULES

    full = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    out = {"merged": [], "lora": [], "scratch": [], "lora_bytes": 0}
    for i in range(n):
        torch.manual_seed(200 + i)
        scratch_dir = root / f"scratch{i}"
        build_assistant(full, layers, init="scratch").save_pretrained(str(scratch_dir))
        out["scratch"].append(str(scratch_dir))
        torch.manual_seed(100 + i)
        model = get_peft_model(build_assistant(full, layers), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES),
            lora_dropout=0.0, bias="none"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)  # peft starts B at zero: make each LoRA count
        lora_dir = root / f"lora{i}"
        model.save_pretrained(str(lora_dir), save_embedding_layers=False)
        (lora_dir / ASSISTANT_FILE).write_text(json.dumps(
            {"format": ASSISTANT_FORMAT, "base": str(base.resolve()), "layers": layers}))
        out["lora_bytes"] = sum(p.numel() * p.element_size()
                                for n_, p in model.named_parameters() if "lora_" in n_)
        merged_dir = root / f"merged{i}"
        model.merge_and_unload().save_pretrained(str(merged_dir))
        out["merged"].append(str(merged_dir))
        out["lora"].append(str(lora_dir))
    return out


def widen_vocab(base: Path, vocab: int) -> None:
    """Resize the saved base's embeddings and head to ``vocab`` rows (random new rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(str(base))


def vocab_of(base: Path) -> int:
    return int(json.loads((base / "config.json").read_text())["vocab_size"])


def child(kind: str, dirs: list[str]) -> None:
    """Load the assistants one by one (as the engine's get_runner does); print RSS."""
    import torch

    import unlearnd.guards.assistant as assistant
    from unlearnd.guards.assistant import get_runner

    torch.set_num_threads(1)
    if kind == "scratch-unshared":
        assistant.share_lexical_weights = lambda model, model_dir: 0
    before = rss_mib()
    sizes = []
    for i, d in enumerate(dirs):
        get_runner(d).logits([(f"k{i}", [1, 2, 3, 4, 5])])
        sizes.append(rss_mib())
    print(json.dumps({"kind": kind, "before": before, "after": sizes}))


def add_assistant_args(p: argparse.ArgumentParser) -> None:
    """The world both assistant-memory benchmarks build: ``--tenants`` random LoRAs of
    rank ``--rank`` over the first ``--assistant-layers`` of a ``--layers``-layer,
    ``--hidden``-wide random base."""
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8, help="base decoder layers")
    p.add_argument("--assistant-layers", type=int, default=2, help="K")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--vocab", type=int, default=None,
                   help="widen the base's vocabulary to this many tokens (random rows)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_assistant_args(p)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1:])
        return 0
    if args.tenants < 2:
        p.error("--tenants must be >= 2")
    from unlearnd.toolkit.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-assistant-memory-"))
    base = make_tiny_model(root / "base", seed=0, hidden=args.hidden, layers=args.layers)
    if args.vocab:
        widen_vocab(base, args.vocab)
    made = make_assistants(base, root, args.tenants, args.assistant_layers, args.rank)
    rows = {}
    for kind in ("merged", "lora", "scratch", "scratch-unshared"):
        dirs = made["scratch" if kind.startswith("scratch") else kind]
        res = subprocess.run([sys.executable, __file__, "--child", kind, *dirs],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        rows[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    lora_mib = made["lora_bytes"] / 2**20
    merged_size = sum(f.stat().st_size for f in Path(made["merged"][0]).glob("*.safetensors"))
    print(f"\n## Assistant memory per contrastive tenant ({args.tenants} tenants; base "
          f"hidden {args.hidden}, {args.layers} layers; assistant K = "
          f"{args.assistant_layers}; LoRA rank {args.rank}; vocabulary "
          f"{vocab_of(base)})\n")
    print("| assistants as | RSS after 1 MiB | RSS after all MiB | per extra tenant MiB | "
          "one LoRA MiB | per tenant / LoRA |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, label in (("merged", "base layers + LoRA, merged copies (`--init base`)"),
                        ("lora", "LoRAs over a shared base (`--save lora`)"),
                        ("scratch-unshared", "scratch, each its own embeddings and head"),
                        ("scratch", "scratch (the default), embeddings and head shared")):
        after = rows[kind]["after"]
        per = (after[-1] - after[0]) / (len(after) - 1)
        print(f"| {label} | {after[0]:.0f} | {after[-1]:.0f} | {per:.2f} | {lora_mib:.2f} | "
              f"{per / lora_mib:.2f} |")
    growth = {k: (rows[k]["after"][-1] - rows[k]["after"][0]) / (len(rows[k]["after"]) - 1)
              for k in rows}
    print(f"\none merged assistant's weights on disk: {merged_size / 2**20:.1f} MiB")
    print(f"scratch per extra tenant, shared / unshared embeddings and head: "
          f"{growth['scratch']:.2f} / {growth['scratch-unshared']:.2f} MiB = "
          f"{growth['scratch'] / max(growth['scratch-unshared'], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
