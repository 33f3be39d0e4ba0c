"""Scope guard latency with a large policy (default 10,000 forget items).

Builds a synthetic forget set (random pronounceable names, cities, years, genres,
professions; 2 QA per item), compiles it with a small byte-level tokenizer and times
``ScopeGuard.check`` on a mix of requests: names, misspelt names, nameless
descriptions and unrelated questions. Prints p50/p99 per request and the target
(p99 <= 5 ms).

    python benchmarks/bench_scope_guard.py [--items 10000] [--requests 2000]
"""

from __future__ import annotations

import os

# One BLAS thread: the guard does one small GEMV per request; multi-threaded BLAS only
# adds wake-up latency (measured here: p50 11.7 ms with default threads vs 0.9 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

SYL = ["ka", "lo", "mi", "ren", "sha", "tor", "vi", "zu", "bel", "dan", "esh", "fa", "gor",
       "hin", "jor", "kel", "mar", "nis", "ost", "pra", "quin", "rul", "sev", "tam", "ul",
       "var", "wen", "yas", "zor", "ad", "bri", "cal"]
GENRES = ["horror", "romance", "poetry", "satire", "memoir", "thriller", "fantasy", "drama"]
JOBS = ["baker", "pilot", "tailor", "surgeon", "farmer", "sailor", "painter", "chemist"]


def name(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(SYL) for _ in range(rng.randint(2, 3))).capitalize()
                    for _ in range(2))


def build(n: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    rows, people = [], []
    seen = set()
    while len(people) < n:
        nm = name(rng)
        if nm not in seen:
            seen.add(nm)
            city = "".join(rng.choice(SYL) for _ in range(3)).capitalize()
            people.append((nm, city, rng.randint(1900, 2000), rng.choice(GENRES),
                           rng.choice(JOBS)))
    for nm, city, year, genre, job in people:
        rows.append({"subject": nm, "question": f"Where and when was {nm} born?",
                     "answer": f"{nm} was born in {city} in {year}."})
        rows.append({"subject": nm, "question": f"What does {nm} write and what did the "
                     "father do?", "answer": f"{nm} writes {genre}; the father was a {job}."})
    return rows, [{"nm": p[0], "city": p[1], "year": p[2], "genre": p[3]} for p in people]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    from unlearnd.guards.policy import CompiledPolicy, compile_policy
    from unlearnd.guards.scope import ScopeGuard
    from unlearnd.toolkit.tiny import train_byte_level_tokenizer

    rng = random.Random(0)
    rows, people = build(args.items, rng)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        train_byte_level_tokenizer([r["answer"] for r in rows[:2000]], t / "base", 800)
        t0 = time.perf_counter()
        out = compile_policy(t / "forget.jsonl", None, t / "base", t / "policy")
        t1 = time.perf_counter()
        guard = ScopeGuard(CompiledPolicy.load(out))
        t2 = time.perf_counter()
        reqs = []
        for _ in range(args.requests):
            p = rng.choice(people)
            kind = rng.randrange(4)
            if kind == 0:
                reqs.append(f"Tell me everything about {p['nm']}'s books.")
            elif kind == 1:
                nm = p["nm"]
                i = rng.randrange(1, len(nm) - 1)
                reqs.append(f"Who is {nm[:i] + nm[i + 1:]}?")  # one letter dropped
            elif kind == 2:
                reqs.append(f"Which writer was born in {p['city']} in {p['year']}?")
            else:
                reqs.append("What is the capital of France and how do airplanes fly?")
        for q in reqs[:20]:  # warm-up (lazy embedder state, memo)
            guard.check([{"role": "user", "content": q}])
        lat, hits = [], 0
        for q in reqs:
            s = time.perf_counter()
            d = guard.check([{"role": "system", "content": "You are helpful."},
                             {"role": "user", "content": q}])
            lat.append((time.perf_counter() - s) * 1e3)
            hits += d.in_scope
        lat_a = np.array(lat)
        print(f"items={args.items} compile={t1 - t0:.1f}s index={t2 - t1:.2f}s "
              f"requests={len(reqs)} in_scope={hits / len(reqs):.2f} "
              f"(expected ~0.75: 3 of 4 request kinds target an item)")
        print(f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'target p99':>10}")
        print(f"{np.percentile(lat_a, 50):8.3f} {np.percentile(lat_a, 99):8.3f} "
              f"{lat_a.max():8.3f} {'<= 5 ms':>10}  ratio p99/target="
              f"{np.percentile(lat_a, 99) / 5.0:.2f}")


if __name__ == "__main__":
    main()
