"""Do repeated speed measurements of one model agree? (issue: Compare's tokens/s varied 2x)

    .venv/bin/python -m bench.bench_speed [--model default] [--clicks 5] [--device cpu]
        [--prompt-tokens 64] [--decode-tokens 16] [--budget-s 3]

Calls compact.evaluate.speed with the Compare tab's sizes, as it does on every click, `--clicks`
times in a row on the loaded model and reports each click's prefill and decode tokens/s and the spread
(max / min - 1) of each; the goal is within 10% on an idle machine. The load average is
recorded beside it, because on a shared machine other processes' work shows up here.
Writes bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import device_name, write_json
from compact import evaluate, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=3.0)
    parser.add_argument("--out", default="bench/results/speed.json")
    args = parser.parse_args()
    loaded = models.load(args.model, device=args.device)
    clicks = []
    for _ in range(args.clicks):
        clicks.append(evaluate.speed(loaded.model, args.prompt_tokens, args.decode_tokens, args.budget_s))
        print(clicks[-1], flush=True)

    def spread(key: str) -> float:
        values = [c[key] for c in clicks]
        return max(values) / min(values) - 1

    result = {"model": args.model, "device": device_name(loaded.device), "dtype": str(loaded.model.dtype),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average": os.getloadavg()[0], "clicks": clicks,
              "summary": {"prefill_spread": spread("prefill_tokens_per_s"),
                          "decode_spread": spread("decode_tokens_per_s"),
                          "prefill_tokens_per_s_median": sorted(c["prefill_tokens_per_s"] for c in clicks)[
                              len(clicks) // 2],
                          "decode_tokens_per_s_median": sorted(c["decode_tokens_per_s"] for c in clicks)[
                              len(clicks) // 2]}}
    write_json(args.out, result)
    print(result["summary"])


if __name__ == "__main__":
    main()
