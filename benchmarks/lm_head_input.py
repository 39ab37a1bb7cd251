"""The LM head on the last position of a batch of prompts, as ``logits_to_keep=1`` hands it over (a strided view of
the final hidden states) against the same rows made contiguous (what ``models.contiguous_head_input`` does), in
one run (run by hand; not a test). Random weights of each offline model's head shape; prints the best of
``--repeats`` for each layout, their ratio and the largest difference of the logits:

    .venv/bin/python benchmarks/lm_head_input.py
"""

from __future__ import annotations

import argparse
import timeit

import torch

# (name, vocabulary, hidden width) of the offline models' LM heads
HEADS = (("gemma3-270m", 262_144, 640), ("smollm2-135m", 49_152, 576))


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` single runs, in seconds."""
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="prompts per forward (facts.batch_size)")
    parser.add_argument("--positions", type=int, default=20, help="padded prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the model jobs get 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.batch} prompts of {args.positions} positions, {args.threads} threads")
    with torch.inference_mode():
        for name, vocab, width in HEADS:
            head = torch.nn.Linear(width, vocab, bias=False)
            torch.nn.init.normal_(head.weight, generator=generator)
            hidden = torch.randn(args.batch, args.positions, width, generator=generator)
            strided = hidden[:, -1:, :]  # what logits_to_keep=1 slices
            contiguous = strided.contiguous()
            before = best(lambda: head(strided), args.repeats)
            after = best(lambda: head(contiguous), args.repeats)
            diff = (head(strided) - head(contiguous)).abs().max().item()
            print(f"{name}: head {vocab} x {width}: strided {before:.3f} s, contiguous {after:.3f} s, "
                  f"{before / after:.1f}x; largest logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
